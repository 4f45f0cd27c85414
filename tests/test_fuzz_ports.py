"""Fuzzing both of the daemon's ports with hypothesis: a real `dume-coordinator serve` process on loopback with real
TLS, one member (``code``) whose model and statistics are in and published, and a hostile enrolled member
(``mallory``) with an open upload. Every example is one call: random bytes and malformed protobuf to each method of
either port, or a structurally valid but hostile message (plans with random names, dtypes, shapes, sizes and
path-traversal file names; chunks, commits and blob reads with random ids, hashes and offsets; enrolments with
random secrets and garbage requests).

After every example: the call ended with a gRPC status within its deadline, never UNKNOWN or INTERNAL and never
with a traceback or an internal path in its message; the daemon answers its health check on both ports and an admin
``Status``, and logged no traceback; the ledger (every row of every table), the blob store and the latest version
are what they were, and staging holds only plans the coordinator accepted, each within what it declares.

``Leave`` is not fuzzed: it takes no field, so every request that parses is a real departure.
Examples are derandomized, so a run draws the same calls everywhere.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dume.coordinator.cli import admin_stubs
from dume.coordinator.state_dir import StateDir
from dume.coordinator.uploads import MEMBER_FILE, PLAN_FILE, planned_sizes
from dume.node.agent import Agent, enrol, model_upload
from dume.node.workdir import Workdir
from dume.shared.lab.harness import Federation
from dume.shared.transport.channels import server_tls_channel
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import tensors_pb2

pytestmark = pytest.mark.scenario("fuzzing both ports", "random bytes, malformed protobuf and hostile messages on "
                                  "every method: a status within the deadline, never UNKNOWN/INTERNAL, the daemon "
                                  "healthy, the ledger, blobs and versions unchanged, staging bounded")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CALL_SECONDS = 20.0  # a call past this is a hang (the daemon answers the others in milliseconds)
ABNORMAL = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
FEDERATION = "/dume.v1.Federation/"
ADMIN = "/dume.v1.Admin/"
# method -> (request streams, response streams); Leave is left out (see the module's docstring).
MEMBER_METHODS = {
    FEDERATION + "BeginUpload": (False, False), FEDERATION + "SendChunks": (True, False),
    FEDERATION + "CommitUpload": (False, False), FEDERATION + "Watch": (False, True),
    FEDERATION + "GetBasis": (False, False), FEDERATION + "GetVersion": (False, False),
    FEDERATION + "ReadBlob": (False, True), FEDERATION + "NoSuchMethod": (False, False),
    ADMIN + "CreateToken": (False, False), ADMIN + "Status": (False, False), ADMIN + "Revoke": (False, False),
    ADMIN + "Audit": (False, False), ADMIN + "CollectGarbage": (False, False),
}
ENROLMENT_METHODS = {"/dume.v1.Enrolment/Enrol": (False, False), "/dume.v1.Enrolment/NoSuchMethod": (False, False),
                     FEDERATION + "Watch": (False, True), ADMIN + "Status": (False, False)}


@dataclass(repr=False)
class Served:
    """The daemon under test and what the strategies draw real values from."""

    fed: Federation
    channels: dict[str, grpc.Channel]  # "code", "mallory" (mutual TLS), "enrolment" (server TLS)
    admin: Any
    plan: pb.UploadPlan  # mallory's open (never sent) model plan
    upload_id: str
    hashes: list[str]  # blobs the store holds: published, basis, code's private statistics
    baseline: dict[str, Any]
    answers: Counter[str] = field(default_factory=Counter)  # "method code" -> calls


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


def snapshot(served: Served) -> dict[str, Any]:
    """What no hostile call may change; reading it also proves the daemon answers its admin."""
    status = served.admin.Status(pb.StatusRequest(), timeout=CALL_SECONDS)
    for member in status.members:
        member.online = False  # a stream the fuzzer opened may still be closing
    state = served.fed.state
    return {"status": status.SerializeToString(deterministic=True), "ledger": ledger_rows(state),
            "blobs": stored_blobs(state)}


@pytest.fixture(scope="module")
def served(expert_factory, tmp_path_factory) -> Served:
    experts = expert_factory("llama")
    root = tmp_path_factory.mktemp("fuzz")
    fed = Federation(root, say=lambda line: None)
    fed.init("--sequence-length", "64")
    fed.serve()
    try:
        code = Workdir(root / "code")
        enrol(JoinToken.decode(fed.token("code")), code, experts["code"].model_dir, experts["code"].data_path)
        Agent(code).run(once=True)
        fed.wait_exact(["code"])
        mallory = Workdir(root / "mallory")
        enrol(JoinToken.decode(fed.token("mallory")), mallory, experts["math"].model_dir, experts["math"].data_path)
        enrolment = json.loads((fed.state / "daemon.json").read_text())["enrolment"]
        channels = {"code": code.channel(), "mallory": mallory.channel(),
                    "enrolment": server_tls_channel(enrolment, (fed.state / "ca" / "cert.pem").read_bytes())}
        plan = model_upload(experts["math"].model_dir, "mallory").plan
        opened = channels["mallory"].unary_unary(FEDERATION + "BeginUpload", pb.UploadPlan.SerializeToString,
                                                 pb.UploadState.FromString)(plan, timeout=CALL_SECONDS)
        admin, _ = admin_stubs(StateDir(fed.state))
        hashes = sorted(Path(path).name for path in stored_blobs(fed.state))
        served = Served(fed, channels, admin, plan, opened.upload_id, hashes, {})
        served.baseline = snapshot(served)
        yield served
        assert sum(served.answers.values()) > 0
    finally:
        fed.close()


# -- one call, and the invariants after it --------------------------------------------------------------------------
def call(served: Served, who: str, method: str, body: bytes | list[bytes]) -> grpc.StatusCode:
    """Sends raw request bytes as ``who``; returns the status code, after checking it is a clean answer."""
    shapes = {**MEMBER_METHODS, **ENROLMENT_METHODS}
    request_streams, response_streams = shapes[method]
    channel = served.channels[who]
    code = grpc.StatusCode.OK
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
        assert str(served.fed.root) not in details, f"an internal path in the answer: {details}"
    served.answers[f"{method.rpartition('/')[2]} {code.name}"] += 1
    return code


def assert_unchanged(served: Served) -> None:
    """The daemon is healthy on both ports, logged no traceback, and nothing durable changed."""
    for port in ("mallory", "enrolment"):
        health = health_pb2_grpc.HealthStub(served.channels[port]).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=CALL_SECONDS)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    log = served.fed.log("coordinator").read_text(errors="replace")
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    assert snapshot(served) == served.baseline
    assert_staging_bounded(served.fed.state)


def assert_staging_bounded(state: Path) -> None:
    """Staging holds only plans the coordinator accepted, at most the open plans a member may hold, each with no
    more bytes than it declares."""
    limits = StateDir(state).limits()
    plans: dict[str, int] = {}
    for directory in (state / "uploads").iterdir():
        member = (directory / MEMBER_FILE).read_text()
        plans[member] = plans.get(member, 0) + 1
        plan = pb.UploadPlan.FromString((directory / PLAN_FILE).read_bytes())
        declared = sum(planned_sizes(plan, limits.max_file_bytes).values())
        staged = sum(path.stat().st_size for path in directory.iterdir() if path.name not in (PLAN_FILE, MEMBER_FILE))
        assert staged <= declared
    assert all(count <= limits.open_uploads_per_member for count in plans.values()), plans


# -- strategies -----------------------------------------------------------------------------------------------------
HEX = "0123456789abcdef"
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
SMALL_OR_ANY = st.one_of(st.integers(-2, 2100), INT64)
TRAVERSAL = ["../../etc/passwd", "/etc/passwd", "config.json/../../../ledger.sqlite", "..", ".", "", "a/b",
             "tokenizer.json\x00.txt", "~/.ssh/id_rsa", "C:\\Windows\\x", "config.json ", "CONFIG.JSON", "x" * 5000,
             "y" * 100_000, "a\u2028b\u202e\x1b[31m"]
# Protobuf that does not parse: invalid UTF-8 in a string, a length past the end, an overlong varint, a group.
CRAFTED = [b"\x0a\x02\xff\xfe", b"\x12\x02\xc3\x28", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11,
           b"\x0b\x0c", b"\x1a\x05\x0a\x03\xff\xff\xff", b"\x22\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x07"]


def hashes(served: Served) -> st.SearchStrategy[str]:
    plan_hashes = [entry.sha256 for entry in served.plan.manifest.tensors] + [f.sha256 for f in served.plan.files]
    return st.one_of(st.sampled_from(served.hashes + plan_hashes), st.text(HEX, min_size=64, max_size=64),
                     st.text(max_size=80), st.sampled_from(TRAVERSAL))


def upload_ids(served: Served) -> st.SearchStrategy[str]:
    real = served.upload_id
    return st.one_of(st.just(real), st.sampled_from([real.upper(), "../" + real[3:], "." * 32, real + "\n", ""]),
                     st.text("0123456789abcdefABCDEF", min_size=32, max_size=32), st.text(max_size=40),
                     st.text(st.characters(categories=["Nd", "Lu", "Ll", "Lo"]), min_size=32, max_size=32))


def names(served: Served) -> st.SearchStrategy[str]:
    real = [entry.name for entry in served.plan.manifest.tensors] + [f.name for f in served.plan.files]
    return st.one_of(st.sampled_from(real + TRAVERSAL), st.text(max_size=40))


def plans(served: Served) -> st.SearchStrategy[pb.UploadPlan]:
    entry = st.builds(tensors_pb2.TensorEntry, name=names(served),
                      dtype=st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "", "f32"]),
                                      st.text(max_size=6)),
                      shape=st.lists(SMALL_OR_ANY, max_size=4), sha256=hashes(served), size_bytes=SMALL_OR_ANY)
    file = st.builds(pb.FileEntry, name=names(served), sha256=hashes(served), size_bytes=SMALL_OR_ANY)
    header = st.builds(tensors_pb2.StatisticsHeader, basis_hash=hashes(served), hidden_size=SMALL_OR_ANY,
                       num_layers=SMALL_OR_ANY, token_count=SMALL_OR_ANY, sequence_length=SMALL_OR_ANY)
    built = st.builds(pb.UploadPlan, kind=st.integers(-1, 4),
                      manifest=st.builds(tensors_pb2.TensorManifest, tensors=st.lists(entry, max_size=5)),
                      files=st.lists(file, max_size=3), statistics=header)
    return st.one_of(built, mutated_plans(served, entry, file))


def mutated_plans(served: Served, entry: st.SearchStrategy, file: st.SearchStrategy) -> st.SearchStrategy:
    """Mallory's real plan with one tensor or file replaced, added or doubled, or its kind changed."""
    @st.composite
    def mutate(draw: st.DrawFn) -> pb.UploadPlan:
        plan = pb.UploadPlan()
        plan.CopyFrom(served.plan)
        how = draw(st.sampled_from(["tensor", "file", "add", "double", "kind"]))
        tensors, files = plan.manifest.tensors, plan.files
        if how == "tensor":
            tensors[draw(st.integers(0, len(tensors) - 1))].CopyFrom(draw(entry))
        elif how == "file":
            files[draw(st.integers(0, len(files) - 1))].CopyFrom(draw(file))
        elif how == "add":
            files.append(draw(file)) if draw(st.booleans()) else tensors.append(draw(entry))
        elif how == "double":
            tensors.append(tensors[draw(st.integers(0, len(tensors) - 1))])
        else:
            plan.kind = draw(st.sampled_from([pb.UPLOAD_KIND_STATISTICS, pb.UPLOAD_KIND_UNSPECIFIED, 9]))
        return plan
    return mutate()


def chunk_streams(served: Served) -> st.SearchStrategy[list[pb.Chunk]]:
    data = st.one_of(st.binary(max_size=64), st.sampled_from([(1 << 20) + 1, 4 << 20]).map(bytes))
    chunk = st.builds(pb.Chunk, upload_id=upload_ids(served), sha256=hashes(served), offset=SMALL_OR_ANY, data=data)
    return st.lists(chunk, max_size=4)


def malformed(served: Served) -> st.SearchStrategy[bytes]:
    """Random bytes, and real messages cut short, spoiled or padded with garbage."""
    real = [served.plan.SerializeToString(), pb.Chunk(upload_id=served.upload_id, sha256=served.hashes[0],
                                                      offset=3, data=b"abc").SerializeToString(),
            pb.BlobRequest(sha256=served.hashes[0], offset=1).SerializeToString(),
            pb.EnrolRequest(secret="s" * 43, csr_pem=b"-----BEGIN").SerializeToString()]

    @st.composite
    def spoil(draw: st.DrawFn) -> bytes:
        message = bytearray(draw(st.sampled_from(real)))
        at = draw(st.integers(0, len(message) - 1))
        how = draw(st.sampled_from(["cut", "flip", "pad"]))
        if how == "cut":
            return bytes(message[:at])
        if how == "flip":
            message[at] ^= draw(st.integers(1, 255))
            return bytes(message)
        return bytes(message) + draw(st.binary(min_size=1, max_size=16))
    return st.one_of(st.binary(max_size=300), st.sampled_from(CRAFTED), spoil())


# -- the fuzzing ----------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_random_bytes_and_malformed_protobuf_on_the_mutual_tls_port(served, data):
    method = data.draw(st.sampled_from(sorted(MEMBER_METHODS)))
    body = data.draw(malformed(served))
    who = data.draw(st.sampled_from(["mallory", "code"]))
    code = call(served, who, method, [body, body] if MEMBER_METHODS[method][0] else body)
    if method.startswith(ADMIN):
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    assert_unchanged(served)


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_random_bytes_and_malformed_protobuf_on_the_enrolment_port(served, data):
    method = data.draw(st.sampled_from(sorted(ENROLMENT_METHODS)))
    code = call(served, "enrolment", method, data.draw(malformed(served)))
    assert code != grpc.StatusCode.OK
    assert_unchanged(served)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_hostile_upload_plans(served, data):
    plan = data.draw(plans(served))
    call(served, data.draw(st.sampled_from(["mallory", "code"])), FEDERATION + "BeginUpload",
         plan.SerializeToString())
    assert_unchanged(served)


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_hostile_chunks_and_commits(served, data):
    who = data.draw(st.sampled_from(["mallory", "code"]))
    if data.draw(st.booleans()):
        chunks = data.draw(chunk_streams(served))
        call(served, who, FEDERATION + "SendChunks", [chunk.SerializeToString() for chunk in chunks])
    else:
        commit = pb.CommitRequest(upload_id=data.draw(upload_ids(served)))
        assert call(served, who, FEDERATION + "CommitUpload", commit.SerializeToString()) != grpc.StatusCode.OK
    assert_unchanged(served)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_hostile_reads(served, data):
    who = data.draw(st.sampled_from(["mallory", "code"]))
    what = data.draw(st.sampled_from(["blob", "basis", "version"]))
    if what == "blob":
        request = pb.BlobRequest(sha256=data.draw(hashes(served)), offset=data.draw(SMALL_OR_ANY))
        call(served, who, FEDERATION + "ReadBlob", request.SerializeToString())
    elif what == "basis":
        call(served, who, FEDERATION + "GetBasis", pb.BasisRequest(basis_hash=data.draw(hashes(served)))
             .SerializeToString())
    else:
        call(served, who, FEDERATION + "GetVersion", pb.VersionRequest(version=data.draw(INT64)).SerializeToString())
    assert_unchanged(served)


@pytest.fixture(scope="module")
def requests() -> list[bytes]:
    """Certificate requests a hostile enrolment might send: for the admin's name, a traversal, a weak key."""
    key = pki.create_private_key()
    return [pki.create_csr(key, name) for name in ("admin", "../code", "code", "x" * 64)]


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_hostile_enrolments(served, requests, data):
    secret = data.draw(st.one_of(st.text(max_size=80), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                               "0123456789-_", min_size=43, max_size=43)))
    csr = data.draw(st.one_of(st.sampled_from(requests), st.binary(max_size=200),
                              st.sampled_from(requests).map(lambda pem: pem[: len(pem) // 2])))
    request = pb.EnrolRequest(secret=secret, csr_pem=csr)
    assert call(served, "enrolment", "/dume.v1.Enrolment/Enrol", request.SerializeToString()) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert_unchanged(served)
