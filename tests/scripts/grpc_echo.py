#!/usr/bin/python3
"""A real gRPC server and client (Debian's python3-grpcio, run with /usr/bin/python3), with
generic handlers on raw bytes so no protoc is needed.

  grpc_echo.py server PORT ID     serve echo.Echo until killed; prints "listening"
  grpc_echo.py client TARGET      run the checks below through TARGET, print one JSON line

Methods of echo.Echo: Unary (answers ID + ":" + request), ServerStream (request = count as
text; streams that many messages), Bidi (echoes each message), Fail (aborts with
INVALID_ARGUMENT "bad thing").
"""
import json
import sys
from concurrent import futures

import grpc


def handlers(instance):
    def unary(request, context):
        return instance.encode() + b":" + request

    def server_stream(request, context):
        for i in range(int(request)):
            yield b"%d" % i

    def bidi(requests, context):
        for request in requests:
            yield request

    def fail(request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing")

    return grpc.method_handlers_generic_handler("echo.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })


def serve(port, instance):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handlers(instance),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def status_of(call):
    try:
        call()
        return ["OK", ""]
    except grpc.RpcError as error:
        return [error.code().name, error.details()]


def client(target):
    channel = grpc.insecure_channel(target)
    unary = channel.unary_unary("/echo.Echo/Unary")
    spread = {}
    for i in range(100):
        answer = unary(b"%d" % i, timeout=10).decode()
        instance, echoed = answer.split(":", 1)
        assert echoed == str(i), answer
        spread[instance] = spread.get(instance, 0) + 1
    streamed = list(channel.unary_stream("/echo.Echo/ServerStream")(b"10", timeout=10))
    bidi = list(channel.stream_stream("/echo.Echo/Bidi")(
        iter([b"m%d" % i for i in range(10)]), timeout=10))
    result = {
        "spread": spread,
        "server_stream": [m.decode() for m in streamed],
        "bidi": [m.decode() for m in bidi],
        "fail": status_of(lambda: channel.unary_unary("/echo.Echo/Fail")(b"x", timeout=10)),
        "no_instance": status_of(
            lambda: channel.unary_unary("/empty.Empty/Call")(b"x", timeout=10)),
        "no_route": status_of(lambda: channel.unary_unary("/nope.Nope/Call")(b"x", timeout=10)),
    }
    print(json.dumps(result), flush=True)


def main():
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        client(sys.argv[2])


if __name__ == "__main__":
    main()
