"""``dume-coordinator serve``: the daemon. Two listeners (mutual TLS for members and admins, server TLS for
enrolment) in front of one ``Coordinator`` and its publisher thread, and a clean drain on SIGTERM or SIGINT."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from dume.coordinator.federation import Coordinator
from dume.coordinator.servicers import AdminService, EnrolmentService, FederationService
from dume.coordinator.state_dir import StateDir
from dume.shared.errors import DumeError
from dume.shared.transport.channels import SERVER_OPTIONS
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


def serve(state: StateDir) -> int:
    config = state.config()
    coordinator = Coordinator(state)
    key, cert = coordinator.ca_key, coordinator.ca_cert
    # Each Watch stream holds a thread for its life: the pool has one per stream allowed, plus the unary workers,
    # so streams never starve the other calls (Coordinator.watching refuses streams past the limits).
    limits = coordinator.limits
    members = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.watch_streams_total + limits.unary_workers),
                          options=SERVER_OPTIONS)
    rpc.add_FederationServicer_to_server(FederationService(coordinator), members)
    rpc.add_AdminServicer_to_server(AdminService(coordinator), members)
    enrolment = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    rpc.add_EnrolmentServicer_to_server(EnrolmentService(coordinator), enrolment)
    listen = _bind(members, config["listen"],
                   grpc.ssl_server_credentials([(key, cert)], root_certificates=cert, require_client_auth=True),
                   "members")
    enrol = _bind(enrolment, config["enrolment_listen"], grpc.ssl_server_credentials([(key, cert)]), "enrolment")
    if (listen, enrol) != (config["listen"], config["enrolment_listen"]):
        state.update_config(listen=listen, enrolment_listen=enrol)  # port 0: keep the port picked, for restarts
    coordinator.addresses = {"listen": config.get("advertise") or listen,
                             "enrolment": config.get("enrolment_advertise") or enrol}
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    members.start()
    enrolment.start()
    write_private(state.daemon, json.dumps({"pid": os.getpid(), "listen": listen, "enrolment": enrol}).encode())
    log.info("serving members on %s and enrolment on %s", listen, enrol)
    coordinator.publisher.request()  # catch up with anything recorded before a restart
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    log.info("draining")
    coordinator.begin_drain()
    enrolment.stop(DRAIN_SECONDS)
    members.stop(DRAIN_SECONDS).wait()
    coordinator.close()
    state.daemon.unlink(missing_ok=True)
    log.info("stopped")
    return 0
