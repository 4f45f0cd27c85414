"""gRPC channels to the coordinator, and turning its refusals into one-line errors.

Trust comes from the federation's CA (pinned by fingerprint at enrolment), never from the address, so every
channel overrides the TLS target name with the name in the coordinator's certificate.
"""

from __future__ import annotations

import grpc

from dume.shared.errors import DumeError
from dume.shared.trust.pki import TLS_SERVER_NAME

MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]
# Failures worth retrying: the coordinator is away (restarting, network), asked us to start the upload over, or
# is out of room for now (a quota, a stream limit or its disk: RESOURCE_EXHAUSTED).
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def mutual_tls_channel(address: str, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                               certificate_chain=cert_pem)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def server_tls_channel(address: str, ca_pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem),
                               options=CHANNEL_OPTIONS)


def refusal(error: grpc.RpcError, doing: str) -> DumeError:
    """A coordinator's refusal as the one line a user sees."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return DumeError(f"{doing}: the coordinator is not reachable ({error.details()}): check that it runs and "
                         "the address is right")
    return DumeError(f"{doing}: {error.details()}")
