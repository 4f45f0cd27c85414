"""``dume-coordinator serve``: the daemon. Two listeners (mutual TLS for members and admins, server TLS for
enrolment) in front of one ``Coordinator`` and its publisher thread, and a clean drain on SIGTERM or SIGINT.

It holds the state directory's lock for its whole life (one daemon per state directory), reports its health on
both ports (``health``), and serves Prometheus metrics when asked to (``metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from dume.coordinator import failpoints
from dume.coordinator.decoding import RequestDecoding
from dume.coordinator.federation import Coordinator
from dume.coordinator.health import Health
from dume.coordinator.lock import StateLock
from dume.coordinator.metrics import Metrics, MetricsInterceptor
from dume.coordinator.probe import ProbeSettings
from dume.coordinator.servicers import AdminService, EnrolmentService, FederationService
from dume.coordinator.state_dir import StateDir, split_address
from dume.shared.errors import DumeError
from dume.shared.transport.channels import SERVER_OPTIONS
from dume.shared.transport.protocol import ProtocolCheck
from dume.shared.trust.pki import write_private
from dume.v1 import federation_pb2_grpc as rpc

log = logging.getLogger("dume.coordinator")
DRAIN_SECONDS = 10.0


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials, what: str) -> str:
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise DumeError(f"cannot listen on {address} for {what}: the port is taken or the host is not local; "
                        "choose another address with `dume-coordinator init --listen/--enrolment-listen`")
    return f"{address.rpartition(':')[0]}:{port}"


def serve(state: StateDir, drain_seconds: float = DRAIN_SECONDS, metrics_listen: str | None = None,
          probe: ProbeSettings | None = None) -> int:
    config = state.config()
    metrics_address = split_address(metrics_listen) if metrics_listen else None
    with StateLock(state.root / "daemon.lock"):
        return _serve_locked(state, config, drain_seconds, metrics_address, probe)


def _serve_locked(state: StateDir, config: dict, drain_seconds: float,
                  metrics_address: tuple[str, int] | None, probe: ProbeSettings | None) -> int:
    metrics, health = Metrics(), Health()
    if armed := failpoints.arm(state.root):
        log.warning("%s arms the test failpoints %s: this daemon stops for good when it reaches one; never set it "
                    "outside tests", failpoints.VARIABLE, ", ".join(armed))
    coordinator = Coordinator(state, metrics, probe)
    key, cert = coordinator.ca_key, coordinator.ca_cert
    # Each Watch stream holds a thread for its life: the pool has one per stream allowed, plus the unary workers,
    # so streams never starve the other calls (Coordinator.watching refuses streams past the limits).
    limits = coordinator.limits
    # Refusals of another protocol are counted too; requests are parsed last, so malformed ones are INVALID_ARGUMENT.
    interceptors = [MetricsInterceptor(metrics), ProtocolCheck(), RequestDecoding()]
    members = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.watch_streams_total + limits.unary_workers),
                          options=SERVER_OPTIONS, interceptors=interceptors)
    rpc.add_FederationServicer_to_server(FederationService(coordinator), members)
    rpc.add_AdminServicer_to_server(AdminService(coordinator), members)
    enrolment = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS,
                            interceptors=interceptors)
    rpc.add_EnrolmentServicer_to_server(EnrolmentService(coordinator), enrolment)
    health.add_to(members)
    health.add_to(enrolment)
    listen = _bind(members, config["listen"],
                   grpc.ssl_server_credentials([(key, cert)], root_certificates=cert, require_client_auth=True),
                   "members")
    enrol = _bind(enrolment, config["enrolment_listen"], grpc.ssl_server_credentials([(key, cert)]), "enrolment")
    if (listen, enrol) != (config["listen"], config["enrolment_listen"]):
        state.update_config(listen=listen, enrolment_listen=enrol)  # port 0: keep the port picked, for restarts
    coordinator.addresses = {"listen": config.get("advertise") or listen,
                             "enrolment": config.get("enrolment_advertise") or enrol}
    addresses = {"pid": os.getpid(), "listen": listen, "enrolment": enrol}
    if metrics_address:
        port = metrics.serve_http(*metrics_address)
        addresses["metrics"] = f"{metrics_address[0]}:{port}"
        log.info("serving metrics on http://%s/metrics", addresses["metrics"])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    members.start()
    enrolment.start()
    write_private(state.daemon, json.dumps(addresses).encode())
    log.info("serving members on %s and enrolment on %s", listen, enrol)
    caught_up = coordinator.publisher.request()  # catch up with anything recorded before a restart
    threading.Thread(target=lambda: (coordinator.publisher.wait(caught_up), health.serving()), daemon=True).start()
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    log.info("draining: calls in flight have %.0f s to finish", drain_seconds)
    health.draining()
    coordinator.begin_drain()
    enrolment.stop(drain_seconds)
    members.stop(drain_seconds).wait()
    metrics.stop_http()
    coordinator.close()
    try:
        state.daemon.unlink(missing_ok=True)
    except OSError as error:  # a state directory gone read-only: the daemon still stops as asked
        log.warning("cannot remove %s (%s): the next start replaces it", state.daemon, error)
    log.info("stopped")
    return 0
