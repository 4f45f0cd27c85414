"""The protocol version in the handshake: every call to a dume service says which version of the wire contract the
caller speaks, and the coordinator refuses any other one before the call reaches it.

The version is sent as call metadata (``dume-protocol: N``) by an interceptor on every channel the command lines
open, enrolment included, so no message of ``proto/dume/v1`` carries it and every call is checked the same way.
It changes only when the meaning of the contract changes incompatibly (a field's meaning, a required step), not
with each release. A refused call ends with UNIMPLEMENTED, which nodes do not retry: a node of another protocol
version stops at once with exit code 3 and a line naming both versions. The gRPC health service is not checked,
so probes that know nothing of dume keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

PROTOCOL_VERSION = 2  # 2: experts, contributions and datasets (StatisticsHeader.dataset, expert_hash)
METADATA_KEY = "dume-protocol"
CHECKED_PREFIX = "/dume.v1."


def mismatch(spoken: str) -> str | None:
    """Why a caller speaking ``spoken`` ("" when it sent no version) is refused; None when it speaks ours."""
    if spoken == str(PROTOCOL_VERSION):
        return None
    caller = (f"DUME protocol {spoken}" if spoken else
              "no DUME protocol version (a release from before protocol versions)")
    return (f"the caller speaks {caller} and this coordinator speaks protocol {PROTOCOL_VERSION}: use a dume "
            f"release that speaks protocol {PROTOCOL_VERSION} on the node (or move the coordinator to the node's)")


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class ProtocolHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``dume-protocol: PROTOCOL_VERSION`` to every call of the channel it wraps."""

    def _with_version(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), (METADATA_KEY, str(PROTOCOL_VERSION))]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_version(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_version(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._with_version(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._with_version(details), requests)


class ProtocolCheck(grpc.ServerInterceptor):
    """Refuses a call to a dume service whose caller speaks another protocol version, before any servicer runs."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(CHECKED_PREFIX):
            return handler
        spoken = next((value for key, value in details.invocation_metadata or () if key == METADATA_KEY), "")
        why = mismatch(spoken if isinstance(spoken, str) else spoken.decode(errors="replace"))
        if why is None:
            return handler

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, why)

        kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
