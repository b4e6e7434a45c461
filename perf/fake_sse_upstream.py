#!/usr/bin/env python3
"""A fake OpenAI-compatible streaming upstream for perf/upstream-compare.sh.

Any request gets an SSE chat completion: the response head and the first
event in one write, then CHUNKS more events PAUSE_MS apart, the last one with
usage, then [DONE]. Thread per connection, keep-alive. Only for measuring time
to first streamed byte at low rates; not for throughput.

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
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunk(event(0)))
            for i in range(1, CHUNKS):
                time.sleep(PAUSE)
                conn.sendall(chunk(event(i)))
            time.sleep(PAUSE)
            last = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
                    b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
                    b'"total_tokens":%d}}\n\ndata: [DONE]\n\n' % (CHUNKS, 12 + CHUNKS))
            conn.sendall(chunk(last) + b"0\r\n\r\n")
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
