"""The standard gRPC health service (``grpc.health.v1.Health``) on both of the daemon's ports, and its client.

Every service name the daemon serves, and "" for the daemon as a whole, is NOT_SERVING while it starts (until
publication has caught up with the ledger) and from the moment it begins to drain; SERVING in between. Load
balancers and orchestrators read it with any stock health-check client; ``dume-coordinator health`` is one.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dume.shared.errors import DumeError

SERVICES = ("", "dume.v1.Federation", "dume.v1.Admin", "dume.v1.Enrolment")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """One health servicer shared by both listeners, so that they always report the same status."""

    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        for service in SERVICES:
            self.servicer.set(service, NOT_SERVING)

    def add_to(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def serving(self) -> None:
        """Called once recovery is done; ignored once draining began."""
        for service in SERVICES:
            self.servicer.set(service, SERVING)

    def draining(self) -> None:
        """NOT_SERVING for good: watchers are told at once, and nothing can set SERVING again."""
        self.servicer.enter_graceful_shutdown()


def check(channel: grpc.Channel, service: str = "", timeout: float = 10.0) -> str:
    """The status name (SERVING, NOT_SERVING, ...) the daemon reports for ``service``."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=timeout)
    except grpc.RpcError as error:
        raise DumeError(f"the coordinator's health service did not answer ({error.code().name}: {error.details()}): "
                        "check that `dume-coordinator serve` runs on this state directory") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
