#!/usr/bin/env python3
"""One client's requests on new TLS connections, timed from connect to the last byte.

wrk's latency on the handshake row starts when wrk writes the request, after its own
handshake: it leaves out the time a new connection waits for the server's handshake, which
is most of what a client opening a connection sees under load. This probe opens one
connection at a time for `seconds` (a pause of `gap_ms` after each, so it adds little load),
sends `GET / HTTP/1.1` with `Connection: close`, reads the answer to its end and prints one
tab-separated line per request: seconds from start to TCP connected, to handshake done, to
the answer's first byte, to its last byte. It verifies the certificate against `cafile`
(OpenSSL through Python's `ssl`, as wrk and h2load; TLS 1.3, no session resumed).

Usage: tls_probe.py host port cafile seconds gap_ms > probe.tsv
"""

import socket
import ssl
import sys
import time


def one_request(host, port, context):
    """Timings (s) of one request on a new connection: connected, handshake, first, last."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected = time.perf_counter()
        with context.wrap_socket(raw, server_hostname=host) as tls:
            handshake = time.perf_counter()
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = tls.recv(65536)
            first = time.perf_counter()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {answer[:80]!r}")
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    break
                if not chunk:
                    break
            last = time.perf_counter()
    return [t - start for t in (connected, handshake, first, last)]


def main():
    host, port, cafile, seconds, gap_ms = sys.argv[1:6]
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        print("\t".join(f"{t:.6f}" for t in one_request(host, int(port), context)), flush=True)
        time.sleep(int(gap_ms) / 1000)


if __name__ == "__main__":
    main()
