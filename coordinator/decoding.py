"""Requests that do not parse are the caller's mistake: INVALID_ARGUMENT with one line, not grpc's INTERNAL.

grpc parses a request before any interceptor or servicer sees it, and when the bytes are not the method's message it
answers INTERNAL "Exception deserializing request!" and logs a traceback: to a node that is a fault of the
coordinator, and a hostile client can fill the daemon's log with tracebacks. ``RequestDecoding`` hands grpc the raw
bytes instead and parses them itself, on the servicer's side, where a malformed request ends the call cleanly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

# The dume services, and the stock health service on both ports (grpc would answer its malformed requests INTERNAL).
CHECKED_PREFIXES = ("/dume.v1.", "/grpc.health.v1.")


def _decoded(parse: Callable[[bytes], Any], raw: bytes, context: grpc.ServicerContext, method: str) -> Any:
    try:
        return parse(raw)
    except DecodeError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request to {method.rpartition('/')[2]} is not a valid protobuf message of this method: "
                      "use a dume release of this coordinator's protocol")


class RequestDecoding(grpc.ServerInterceptor):
    """Parses the requests of the dume and health services in the handler, so that malformed ones are
    INVALID_ARGUMENT.

    Register it last (innermost): the interceptors before it then see a handler that takes raw bytes."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        checked = details.method.startswith(CHECKED_PREFIXES)
        if handler is None or not checked or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def unary_request(behaviour: Callable) -> Callable:
            def run(raw: bytes, context: grpc.ServicerContext) -> Any:
                return behaviour(_decoded(parse, raw, context, method), context)
            return run

        def streamed_request(behaviour: Callable) -> Callable:
            def run(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                return behaviour((_decoded(parse, raw, context, method) for raw in raws), context)
            return run

        codec = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_request(handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(unary_request(handler.unary_stream), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(streamed_request(handler.stream_unary), **codec)
        return grpc.stream_stream_rpc_method_handler(streamed_request(handler.stream_stream), **codec)
