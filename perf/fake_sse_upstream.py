#!/usr/bin/env python3
"""A fake streaming upstream for perf/upstream-compare.sh and perf/routes-compare.sh.

A request for /v1/responses gets a streamed Responses call (response.created, then
response.output_text.delta events, then response.completed with usage); one for /v1/messages
an Anthropic Messages stream (message_start with the input usage, content_block_start,
content_block_delta events, content_block_stop, message_delta with the output usage,
message_stop); any other an SSE chat completion (the last event with usage, then [DONE]).
The response head and the first event go in one write, then CHUNKS more events PAUSE_MS
apart. Thread per connection, keep-alive. Only for measuring time to first streamed byte or
event at low rates; not for throughput.

    python3 perf/fake_sse_upstream.py PORT [CHUNKS] [PAUSE_MS]
"""
import socket
import sys
import threading
import time

PORT = int(sys.argv[1])
CHUNKS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
PAUSE = (int(sys.argv[3]) if len(sys.argv) > 3 else 20) / 1000.0


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i: int) -> bytes:
    return (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
            b'"choices":[{"index":0,"delta":{"content":"t%d"}}],"usage":null}\n\n' % i)


def sse(name: bytes, data: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


def responses_events() -> list:
    out = [sse(b"response.created",
               b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_p",'
               b'"object":"response","status":"in_progress","model":"gpt-4o-mini","output":[],'
               b'"usage":null}}')]
    for i in range(CHUNKS):
        out.append(sse(b"response.output_text.delta",
                       b'{"type":"response.output_text.delta","sequence_number":%d,'
                       b'"item_id":"msg_p","output_index":0,"content_index":0,"delta":"t%d"}'
                       % (i + 1, i)))
    out.append(sse(b"response.completed",
                   b'{"type":"response.completed","sequence_number":%d,"response":{"id":"resp_p",'
                   b'"object":"response","status":"completed","model":"gpt-4o-mini","output":[],'
                   b'"usage":{"input_tokens":12,"output_tokens":%d,"total_tokens":%d}}}'
                   % (CHUNKS + 1, CHUNKS, 12 + CHUNKS)))
    return out


def messages_events() -> list:
    out = [sse(b"message_start",
               b'{"type":"message_start","message":{"id":"msg_p","type":"message",'
               b'"role":"assistant","model":"claude-3-5-haiku","content":[],"stop_reason":null,'
               b'"usage":{"input_tokens":12,"output_tokens":1}}}')
           + sse(b"content_block_start",
                 b'{"type":"content_block_start","index":0,'
                 b'"content_block":{"type":"text","text":""}}')]
    for i in range(CHUNKS):
        out.append(sse(b"content_block_delta",
                       b'{"type":"content_block_delta","index":0,'
                       b'"delta":{"type":"text_delta","text":"t%d"}}' % i))
    out.append(sse(b"content_block_stop", b'{"type":"content_block_stop","index":0}')
               + sse(b"message_delta",
                     b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
                     b'"usage":{"output_tokens":%d}}' % CHUNKS)
               + sse(b"message_stop", b'{"type":"message_stop"}'))
    return out


def chat_events() -> list:
    out = [event(i) for i in range(CHUNKS)]
    out.append(b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
               b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
               b'"total_tokens":%d}}\n\ndata: [DONE]\n\n' % (CHUNKS, 12 + CHUNKS))
    return out


def handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                buf += conn.recv(65536)
            buf = buf[length:]
            path = head.split(b" ", 2)[1] if b" " in head else b""
            if path.endswith(b"/responses"):
                events = responses_events()
            elif path.endswith(b"/messages"):
                events = messages_events()
            else:
                events = chat_events()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunk(events[0]))
            for n, e in enumerate(events[1:], 2):
                time.sleep(PAUSE)
                conn.sendall(chunk(e) + (b"0\r\n\r\n" if n == len(events) else b""))
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
