"""gRPC channels to the coordinator, and turning its refusals into one-line errors.

Trust comes from the federation's CA (pinned by fingerprint at enrolment), never from the address, so every
channel overrides the TLS target name with the name in the coordinator's certificate. Every channel says which
protocol version it speaks (``protocol``).
"""

from __future__ import annotations

import grpc

from dume.shared.errors import CoordinatorRefused, CoordinatorUnreachable, DumeError, IdentityRefused
from dume.shared.transport.protocol import ProtocolHeader
from dume.shared.trust.pki import TLS_SERVER_NAME

MESSAGE_BYTES = 8 << 20
REFUSAL_KEY = "dume-refusal"  # trailing metadata of every refusal: its kind
DEFAULT_CHUNK_BYTES = 1 << 20  # an upload's chunk: the most the coordinator takes
# An upload or a download runs this many blob streams side by side, so that one stream's hashing and disk writes
# overlap another's network reads (the coordinator allows limits.transfers_per_member, 4 by default, at once).
TRANSFER_STREAMS = 2
# Keepalive, one policy for both ends: a client pings every CLIENT_PING_MS (also with no call open, so a dead
# connection is found before the next call), and the server accepts pings that come at least SERVER_PING_FLOOR_MS
# apart. The floor must stay below the client's interval, or the server counts the pings as abuse and ends the
# connection with GOAWAY too_many_pings (which used to drop idle Watch streams).
CLIENT_PING_MS = 30_000
SERVER_PING_FLOOR_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 20_000
CHANNEL_OPTIONS = [
    ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", CLIENT_PING_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # a quiet Watch stream keeps pinging
    ("grpc.max_reconnect_backoff_ms", 30_000),  # after an outage, notice the coordinator is back within 30 s
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 2 * CLIENT_PING_MS),  # the server's own pings find clients that vanished
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_PING_FLOOR_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),  # a second daemon (or anything else) on the same port fails to bind, never shares it
]
# Failures worth retrying: the coordinator is away (restarting, network), asked us to start the upload over, or
# is out of room for now (a quota, a stream limit or its disk: RESOURCE_EXHAUSTED).
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def mutual_tls_channel(address: str, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                               certificate_chain=cert_pem)
    return grpc.intercept_channel(grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS),
                                  ProtocolHeader())


def server_tls_channel(address: str, ca_pem: bytes) -> grpc.Channel:
    return grpc.intercept_channel(grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem),
                                                      options=CHANNEL_OPTIONS), ProtocolHeader())


def is_refusal(error: grpc.RpcError) -> bool:
    """Whether the coordinator itself ended the call (a refusal carries REFUSAL_KEY in its trailers), rather than
    the network or the gRPC runtime."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return any(key == REFUSAL_KEY for key, _ in trailers or ())


def refusal(error: grpc.RpcError, doing: str) -> DumeError:
    """A coordinator's refusal as the one line a user sees, typed by what the caller can do about it: wait and
    retry (unreachable), enrol again (identity refused) or change the request (refused)."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE and is_refusal(error):  # it answered: it cannot do this for now
        return CoordinatorUnreachable(f"{doing}: {error.details()}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CoordinatorUnreachable(f"{doing}: the coordinator is not reachable ({code.name}: {error.details()}): "
                                      "check that it runs and the address is right")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return IdentityRefused(f"{doing}: {error.details()}")
    return CoordinatorRefused(f"{doing}: {error.details()}")


def spread(sizes: dict[str, int], streams: int = TRANSFER_STREAMS) -> list[list[str]]:
    """The blobs (sha256 -> bytes to move) dealt to at most ``streams`` streams with about equal bytes each, the
    largest first; no stream is empty."""
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, min(streams, len(sizes))))]
    for sha256 in sorted(sizes, key=lambda sha: (-sizes[sha], sha)):
        index = min(range(len(groups)), key=lambda position: groups[position][0])
        total, members = groups[index]
        groups[index] = (total + sizes[sha256], [*members, sha256])
    return [members for _, members in groups if members]
