#!/usr/bin/env python3
"""Time to the first SSE event of a streamed call, for perf/routes-compare.sh.

One keep-alive HTTP/1.1 connection, N calls in sequence: each is timed from just before the
request is written to the moment the first complete event (its blank line) has been read, then
the rest of the stream is read to its end (so the connection is reused). Prints one JSON object
with p50/p99/max in µs and the calls that were not 200 or had no event.

    python3 perf/sse_first_event.py NAME PORT PATH BODY N [Header: value ...]
"""
import json
import socket
import sys
import time


def read_chunked(f, first_event_at):
    """Reads a chunked body to its end; returns when the first event was complete (or None)."""
    seen = b""
    first = None
    while True:
        size_line = f.readline()
        if not size_line:
            raise OSError("closed mid-body")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            return first
        data = f.read(size)
        f.readline()
        if first is None:
            seen += data
            if b"\n\n" in seen:
                first = first_event_at()
    return first


def main() -> None:
    name, port, path, body, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    headers = sys.argv[6:]
    payload = body.encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    times, bad = [], 0
    for _ in range(n):
        start = time.perf_counter()
        sock.sendall(head + payload)
        status_line = f.readline()
        status = int(status_line.split()[1])
        chunked = False
        length = None
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            if k.strip().lower() == "content-length":
                length = int(v)
        if chunked:
            first = read_chunked(f, time.perf_counter)
        else:
            f.read(length or 0)
            first = None
        if status != 200 or first is None:
            bad += 1
            continue
        times.append((first - start) * 1e6)
    times.sort()
    pct = lambda p: times[min(len(times) - 1, int(len(times) * p))] if times else -1
    print(json.dumps({"first_event": name, "path": path, "calls": n, "bad": bad,
                      "p50_us": round(pct(0.5)), "p99_us": round(pct(0.99)),
                      "max_us": round(times[-1]) if times else -1}))


if __name__ == "__main__":
    main()
