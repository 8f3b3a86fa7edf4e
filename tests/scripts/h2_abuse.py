#!/usr/bin/python3
"""HTTP/2 abuse on one connection (Debian's python3-h2, run with /usr/bin/python3); prints
one line saying how the server reacted.

  h2_abuse.py flood HOST PORT PATH COUNT     COUNT x (HEADERS + RST_STREAM) on one connection
  h2_abuse.py bigframe HOST PORT             a HEADERS frame header announcing 20,000 bytes
                                             (the maximum is 16,384)
  h2_abuse.py bigheaders HOST PORT PATH N    a request with an N-byte header value

Prints "goaway CODE", "reset CODE", "status CODE" or "closed".
"""
import socket
import struct
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events


def connect(host, port):
    sock = socket.create_connection((host, port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def headers(host, port, path, extra=()):
    return [(":method", "GET"), (":path", path), (":scheme", "http"),
            (":authority", f"{host}:{port}"), *extra]


def outcome(sock, conn):
    """Reads until the server ends the stream, resets it or ends the connection."""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return "closed"
        if not data:
            return "closed"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                return f"goaway {int(event.error_code)}"
            if isinstance(event, h2.events.StreamReset):
                return f"reset {int(event.error_code)}"
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers).get(b":status", b"?").decode()
                return f"status {status}"
        sock.sendall(conn.data_to_send())


def flood(host, port, path, count):
    sock, conn = connect(host, port)
    try:
        for _ in range(count):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, headers(host, port, path), end_stream=True)
            conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        pass
    return outcome(sock, conn)


def bigframe(host, port):
    sock, conn = connect(host, port)
    # The frame header alone announces the oversize; sending no payload leaves nothing
    # unread at the server, so its GOAWAY is not lost to a reset.
    length = 20000
    frame = struct.pack(">I", length)[1:] + bytes([0x1, 0x4]) + struct.pack(">I", 1)
    try:
        sock.sendall(frame)
    except OSError:
        pass
    return outcome(sock, conn)


def bigheaders(host, port, path, size):
    sock, conn = connect(host, port)
    extra = [("x-big", "a" * size)]
    conn.send_headers(1, headers(host, port, path, extra), end_stream=True)
    sock.sendall(conn.data_to_send())
    return outcome(sock, conn)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "flood":
        print(flood(host, port, sys.argv[4], int(sys.argv[5])))
    elif mode == "bigframe":
        print(bigframe(host, port))
    else:
        print(bigheaders(host, port, sys.argv[4], int(sys.argv[5])))


if __name__ == "__main__":
    main()
