#!/usr/bin/python3
"""A real WebSocket echo server and client (Debian's python3-websockets, run with
/usr/bin/python3), so the gateway's upgrade path is tested against code it did not write.

  ws_echo.py server PORT            echo every message back, until killed; prints "listening"
  ws_echo.py client URL COUNT       send COUNT messages, check each echo, print "echoed N",
                                    then wait for a line on stdin before closing
"""
import asyncio
import logging
import sys

import websockets


async def echo(websocket, path=None):
    async for message in websocket:
        await websocket.send(message)


async def serve(port):
    # A connection the gateway cuts at shutdown has no close frame: expected, not news.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    async with websockets.serve(echo, "127.0.0.1", port):
        print("listening", flush=True)
        await asyncio.Future()


async def client(url, count):
    async with websockets.connect(url) as websocket:
        for i in range(count):
            message = f"message {i} " + "x" * (i % 200)
            await websocket.send(message)
            answer = await websocket.recv()
            if answer != message:
                print(f"mismatch at {i}: {answer!r}", flush=True)
                sys.exit(1)
        print(f"echoed {count}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def main():
    if sys.argv[1] == "server":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))


if __name__ == "__main__":
    main()
