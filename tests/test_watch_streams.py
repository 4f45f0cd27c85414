"""Watch streams cannot starve the coordinator: each member holds at most a few, all of them together are capped
below the server's threads, each ends after a bounded lifetime (the node reconnects), and client and server agree
on keepalive pings. A real daemon process on loopback, real mutual TLS, one member's certificate doing the flooding.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import grpc
import pytest

from dume.coordinator.cli import admin_stubs
from dume.coordinator.limits import Limits
from dume.coordinator.state_dir import StateDir
from dume.node.agent import enrol
from dume.node.workdir import Workdir
from dume.shared.lab.harness import Federation
from dume.shared.transport import channels
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

pytestmark = pytest.mark.scenario("watch streams")
STREAMS = 40  # more than the 32 threads the server used to have in all
LIFETIME = 8.0


def open_stream(stub: rpc.FederationStub) -> tuple[object, str]:
    """Opens a Watch stream and reads its first event; returns the live stream, or the refusal's code and text."""
    stream = stub.Watch(pb.WatchRequest(), timeout=120)
    try:
        next(stream)
    except grpc.RpcError as error:
        return None, f"{error.code().name}: {error.details()}"
    return stream, "open"


def wait_for_first_refusal(calls: list, timeout: float = 30.0) -> grpc.Call:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for call in calls:
            if call.done():
                return call.exception()
        time.sleep(0.05)
    raise AssertionError("no call was refused")


def test_many_watch_streams_of_one_member_leave_status_responsive_and_the_extra_ones_are_refused(
        expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    fed = Federation(tmp_path / "federation", pipe_nodes=True)
    try:
        fed.init("--sequence-length", "64")
        StateDir(fed.state).update_config(limits={**asdict(Limits()), "watch_streams_total": 3,
                                                  "watch_stream_seconds": LIFETIME})
        fed.serve()
        stubs = {}
        for name in ("code", "math"):
            workdir = Workdir(tmp_path / name)
            enrol(JoinToken.decode(fed.token(name)), workdir, spec.model_dir, {"default": spec.data_path})
            stubs[name] = [rpc.FederationStub(workdir.channel()) for _ in range(4)]
        with ThreadPoolExecutor(STREAMS) as pool:
            opened = list(pool.map(lambda i: open_stream(stubs["code"][i % 4]), range(STREAMS)))
        outcomes = [outcome for _, outcome in opened]
        assert outcomes.count("open") == Limits().watch_streams_per_member
        refused = [outcome for outcome in outcomes if outcome != "open"]
        assert len(refused) == STREAMS - 2
        assert all(o.startswith("RESOURCE_EXHAUSTED: code already holds 2 Watch streams") for o in refused)

        with pytest.raises(grpc.RpcError) as negative:  # a request no stream needs: refused, not an exception
            list(stubs["math"][0].ReadBlob(pb.BlobRequest(sha256="0" * 64, offset=-1), timeout=30))
        assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "negative" in negative.value.details()

        admin, _ = admin_stubs(StateDir(fed.state))
        started = time.monotonic()
        status = admin.Status(pb.StatusRequest(), timeout=10)
        assert time.monotonic() - started < 2.0
        assert [(m.name, m.online) for m in status.members] == [("code", True), ("math", False)]

        held, outcome = open_stream(stubs["math"][0])  # the third stream of all: under the total limit
        assert outcome == "open"
        _, outcome = open_stream(stubs["math"][1])
        assert outcome.startswith("RESOURCE_EXHAUSTED: the coordinator serves 3 Watch streams, its limit")

        release = threading.Event()

        def stalled():  # a client that opens an upload stream and never sends: it holds a server thread
            release.wait(60)
            yield from ()

        uploads = [stubs["code"][0].SendChunks.future(stalled(), timeout=60)
                   for _ in range(Limits().transfers_per_member + 1)]
        refused = wait_for_first_refusal(uploads)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "transfers open" in refused.details()
        assert admin.Status(pb.StatusRequest(), timeout=10).members  # still answers
        release.set()
        assert sum(1 for upload in uploads if upload.exception() is None) == Limits().transfers_per_member

        started = time.monotonic()
        assert list(held) == []  # the stream ends cleanly (OK, no error) after its lifetime; a node reconnects
        assert time.monotonic() - started < LIFETIME + 10
        assert fed.stop() == 0
    finally:
        fed.close()


def test_client_keepalive_pings_are_within_what_the_server_accepts():
    """The server ends a connection whose pings come faster than its floor (GOAWAY too_many_pings): the client's
    interval must be above the floor, and both must allow pings while no call is open."""
    client, server = dict(channels.CHANNEL_OPTIONS), dict(channels.SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] > server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # a quiet Watch stream keeps being checked
