"""A real coordinator daemon with a hostile member, for the fuzzing and the table of hostile inputs: what calls it
takes, and the checks that a refused call changed nothing.

`dume-coordinator serve` runs as its own process on loopback with real TLS. ``code`` is a member whose model and
statistics are in and published (version 1, exact); ``mallory`` is an enrolled member with an open, unsent upload of
another expert's model; ``eve`` was enrolled and revoked. Calls go out as raw bytes on either port, so a test sends
exactly what a modified node would, malformed protobuf included.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dume.coordinator.cli import admin_stubs
from dume.coordinator.state_dir import StateDir
from dume.coordinator.uploads import MEMBER_FILE, PLAN_FILE, planned_sizes, upload_id
from dume.node.agent import Agent, enrol, model_upload
from dume.node.workdir import Workdir
from dume.shared.lab.harness import Federation
from dume.shared.transport.channels import server_tls_channel
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb

CALL_SECONDS = 20.0  # a call past this is a hang (the daemon answers the others in milliseconds)
ABNORMAL = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
FEDERATION = "/dume.v1.Federation/"
ADMIN = "/dume.v1.Admin/"
ENROL = "/dume.v1.Enrolment/Enrol"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # on both ports
# method -> (request streams, response streams). Leave is not here: it takes no field, so every request that
# parses is a real departure.
MEMBER_METHODS = {
    FEDERATION + "BeginUpload": (False, False), FEDERATION + "SendChunks": (True, False),
    FEDERATION + "CommitUpload": (False, False), FEDERATION + "Watch": (False, True),
    FEDERATION + "GetBasis": (False, False), FEDERATION + "GetVersion": (False, False),
    FEDERATION + "ReadBlob": (False, True), FEDERATION + "NoSuchMethod": (False, False),
    ADMIN + "CreateToken": (False, False), ADMIN + "Status": (False, False), ADMIN + "Revoke": (False, False),
    ADMIN + "Audit": (False, False), ADMIN + "CollectGarbage": (False, False), ADMIN + "Approve": (False, False),
    HEALTH_CHECK: (False, False),
}
ENROLMENT_METHODS = {ENROL: (False, False), "/dume.v1.Enrolment/NoSuchMethod": (False, False),
                     FEDERATION + "Watch": (False, True), ADMIN + "Status": (False, False), HEALTH_CHECK: (False, False)}
SHAPES = {**MEMBER_METHODS, **ENROLMENT_METHODS}


@dataclass(repr=False)
class Hostile:
    """The daemon under test and the real values hostile calls are made of."""

    fed: Federation
    channels: dict[str, grpc.Channel]  # "code", "mallory", "eve" (mutual TLS), "enrolment" (server TLS)
    admin: Any
    plan: pb.UploadPlan  # mallory's open (never sent) model plan
    upload_id: str
    sources: dict  # sha256 -> where mallory's model holds that blob
    code_upload_id: str  # code's model upload, committed long ago
    used_secret: str  # code's join token secret, used
    expired_secret: str
    hashes: list[str]  # blobs the store holds: published, basis, code's private statistics
    answers: Counter[str] = field(default_factory=Counter)  # "method CODE" -> calls, for the scorecard


@contextmanager
def serving(experts: dict, root: Path) -> Iterator[Hostile]:
    fed = Federation(root, say=lambda line: None)
    fed.init("--sequence-length", "64")
    fed.serve()
    try:
        code = joined(fed, "code", experts["code"])
        Agent(code).run(once=True)
        fed.wait_exact(["code"])
        mallory = joined(fed, "mallory", experts["math"])
        eve = joined(fed, "eve", experts["prose"])
        admin, _ = admin_stubs(StateDir(fed.state))
        admin.Revoke(pb.RevokeRequest(node="eve", reason="hostile"), timeout=CALL_SECONDS)
        expired = JoinToken.decode(fed.token("late", ttl_seconds=0.2)).secret
        enrolment = json.loads((fed.state / "daemon.json").read_text())["enrolment"]
        channels = {"code": code.channel(), "mallory": mallory.channel(), "eve": eve.channel(),
                    "enrolment": server_tls_channel(enrolment, (fed.state / "ca" / "cert.pem").read_bytes())}
        upload = model_upload(experts["math"].model_dir, "mallory")
        opened = channels["mallory"].unary_unary(FEDERATION + "BeginUpload", pb.UploadPlan.SerializeToString,
                                                 pb.UploadState.FromString)(upload.plan, timeout=CALL_SECONDS)
        hostile = Hostile(fed, channels, admin, upload.plan, opened.upload_id, upload.sources,
                          upload_id("code", model_upload(experts["code"].model_dir, "code").plan),
                          code.state()["used_secret"], expired,
                          sorted(Path(path).name for path in stored_blobs(fed.state)))
        time.sleep(0.3)  # the short-lived token is now expired
        yield hostile
    finally:
        fed.close()


def joined(fed: Federation, name: str, spec) -> Workdir:
    """An enrolled node's workdir; the secret of the token it used is kept in its state for replays."""
    workdir = Workdir(fed.root / name)
    token = JoinToken.decode(fed.token(name))
    enrol(token, workdir, spec.model_dir, {"default": spec.data_path})
    workdir.update(used_secret=token.secret)
    return workdir


def call(hostile: Hostile, who: str, method: str, body: bytes | list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Sends raw request bytes as ``who``; returns the status code and message, after checking the answer is a
    clean one: a status within the deadline, never UNKNOWN or INTERNAL, one line, no traceback, no internal path."""
    request_streams, response_streams = SHAPES[method]
    channel = hostile.channels[who]
    code, details = grpc.StatusCode.OK, ""
    try:
        if request_streams:
            channel.stream_unary(method)(iter(body), timeout=CALL_SECONDS)
        elif response_streams:
            responses = channel.unary_stream(method)(body, timeout=CALL_SECONDS)
            try:
                for _ in responses:
                    if method.endswith("/Watch"):
                        break  # a Watch stream stays open: its first event is the answer
            finally:
                responses.cancel()
        else:
            channel.unary_unary(method)(body, timeout=CALL_SECONDS)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in ABNORMAL, f"{method} as {who} answered {code.name}: {details}"
        assert details and "\n" not in details and "Traceback" not in details, details
        assert str(hostile.fed.root) not in details, f"an internal path in the answer: {details}"
    hostile.answers[f"{method.rpartition('/')[2]} {code.name}"] += 1
    return code, details


# -- what no hostile call may change --------------------------------------------------------------------------------
def ledger_rows(state: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the ledger, read-only."""
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr) for table in tables}
    finally:
        db.close()


def stored_blobs(state: Path) -> set[str]:
    return {path.relative_to(state / "blobs").as_posix() for path in (state / "blobs").rglob("*")
            if path.is_file() and path.parent.name != "tmp"}


def snapshot(hostile: Hostile) -> dict[str, Any]:
    """The admin's status, every ledger row (members, statistics, versions, audit...) and the blob store; reading
    it also proves the daemon answers its admin."""
    status = hostile.admin.Status(pb.StatusRequest(), timeout=CALL_SECONDS)
    for member in status.members:
        member.online = False  # a stream a test opened may still be closing
    state = hostile.fed.state
    return {"status": status.SerializeToString(deterministic=True), "ledger": ledger_rows(state),
            "blobs": stored_blobs(state)}


def assert_unchanged(hostile: Hostile, before: dict[str, Any]) -> None:
    """The daemon is healthy on both ports and logged no traceback, nothing durable changed since ``before``, and
    staging is bounded."""
    for port in ("mallory", "enrolment"):
        health = health_pb2_grpc.HealthStub(hostile.channels[port]).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=CALL_SECONDS)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    log = hostile.fed.log("coordinator").read_text(errors="replace")
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    assert snapshot(hostile) == before
    assert_staging_bounded(hostile.fed.state)


def assert_staging_bounded(state: Path) -> None:
    """Staging holds only plans the coordinator accepted, at most the open plans a member may hold, each with no
    more bytes than it declares."""
    limits = StateDir(state).limits()
    plans: Counter[str] = Counter()
    for directory in (state / "uploads").iterdir():
        plans[(directory / MEMBER_FILE).read_text()] += 1
        plan = pb.UploadPlan.FromString((directory / PLAN_FILE).read_bytes())
        declared = sum(planned_sizes(plan, limits.max_file_bytes).values())
        staged = sum(path.stat().st_size for path in directory.iterdir() if path.name not in (PLAN_FILE, MEMBER_FILE))
        assert staged <= declared
    assert all(count <= limits.open_uploads_per_member for count in plans.values()), plans
