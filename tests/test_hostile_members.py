"""Everything else a member can send, as one table: each row a named hostile input, sent to the real daemon of
``hostile`` exactly as a modified node would (raw bytes on either port, its own certificate) or given to the real
`dume-node join` command line, with the status code (or exit code) expected and a piece of the one-line message.
After every row nothing durable changed: members, statistics, versions, audit log, blobs (``hostile.snapshot``), and
the daemon is healthy and logged no traceback.

Refusals tested well elsewhere are not repeated here: tokens expired, reused, forged and for another coordinator
through `dume-node join`, NaN weights, a model of another shape, statistics failing the count, Cauchy-Schwarz,
positive-definiteness and norm checks or naming a basis never issued (test_federation); chunks sent into another
member's upload (test_federation); a revoked member fetching (test_federation); plans declaring absurd sizes and
staging quotas (test_upload_limits); naming another member's blobs, reading versions one was not part of, foreign
tokenizer files, FIFOs and changed inputs (test_member_boundaries); a negative ReadBlob offset (test_watch_streams);
a commit repeated after its answer was lost (test_state_changes); a certificate request asking for another name
(test_pki). Statistics cannot be asymmetric: the wire carries one upper triangle per layer, and any other layout
(a full matrix) is refused below.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.coordinator.errors import MESSAGE_CHARACTERS
from dume.node import cli as node_cli
from dume.node.agent import Upload, described, model_upload
from dume.shared.method.statistics import statistics_tensors
from dume.shared.transport.blobs import read_range
from dume.shared.transport.channels import mutual_tls_channel
from dume.shared.transport.wire import safetensors_ranges
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken, new_secret
from dume.v1 import federation_pb2 as pb
from dume.v1 import tensors_pb2

from hostile import ADMIN, ENROL, FEDERATION, Hostile, assert_unchanged, call, snapshot

pytestmark = pytest.mark.scenario("hostile members")

HIDDEN, LAYERS = 32, 2  # the tiny llama's


@dataclass(frozen=True)
class Extras:
    """What some rows need beyond the hostile daemon."""

    root: Path
    stranger: grpc.Channel  # a node certificate signed by another CA
    fresh_secret: str  # an unused join token's secret (for "mallory2")
    fresh_token: str
    infinite: Upload  # mallory's model with one +Inf weight
    spec: object  # the expert the node-side rows join with


@pytest.fixture(scope="module")
def extras(hostile: Hostile, expert_factory, tmp_path_factory) -> Extras:
    root = tmp_path_factory.mktemp("hostile-inputs")
    ca_key, ca_cert = pki.create_authority()
    key = pki.create_private_key()
    foreign, _ = pki.sign_csr(ca_key, ca_cert, pki.create_csr(key, "mallory"), "mallory", "node")
    stranger = mutual_tls_channel(hostile.fed.address(), (hostile.fed.state / "ca" / "cert.pem").read_bytes(), key,
                                  foreign)
    token = hostile.fed.token("mallory2")
    math = expert_factory("llama")["math"]
    infinite = root / "infinite"
    shutil.copytree(math.model_dir, infinite)
    weights = load_file(infinite / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(weights, infinite / "model.safetensors", metadata={"format": "pt"})
    hostile.channels["stranger"] = stranger
    return Extras(root, stranger, JoinToken.decode(token).secret, token, model_upload(infinite, "mallory"),
                  expert_factory("llama")["code"])


# -- building hostile messages --------------------------------------------------------------------------------------
def plan_with(hostile: Hostile, change: Callable[[pb.UploadPlan], object]) -> bytes:
    """Mallory's real model plan with one change."""
    plan = pb.UploadPlan()
    plan.CopyFrom(hostile.plan)
    change(plan)
    return plan.SerializeToString()


def first_mlp(plan: pb.UploadPlan) -> tensors_pb2.TensorEntry:
    return next(entry for entry in plan.manifest.tensors if entry.name.endswith("mlp.up_proj.weight"))


def retyped(entry: tensors_pb2.TensorEntry) -> None:
    entry.dtype, entry.size_bytes = "F16", entry.size_bytes // 2


def reshaped(entry: tensors_pb2.TensorEntry) -> None:
    entry.shape[:] = [entry.shape[1], entry.shape[0] + 1]
    entry.size_bytes = 4 * entry.shape[0] * entry.shape[1]


def smallest_blob(hostile: Hostile) -> tuple[str, int]:
    sha = min((sha for sha in hostile.sources if hostile.sources[sha].size), key=lambda s: hostile.sources[s].size)
    return sha, hostile.sources[sha].size


def chunk(hostile: Hostile, offset: int = 0, data: bytes | None = None, sha256: str | None = None,
          upload_id: str | None = None) -> list[bytes]:
    """One chunk of mallory's open upload (by default its smallest blob's true bytes from ``offset``)."""
    sha, size = smallest_blob(hostile)
    where = hostile.sources[sha]
    if data is None:
        data = b"".join(read_range(where.path, where.start + max(offset, 0), size - max(offset, 0)))
    message = pb.Chunk(upload_id=hostile.upload_id if upload_id is None else upload_id, sha256=sha256 or sha,
                       offset=offset, data=data)
    return [message.SerializeToString()]


def statistics(hostile: Hostile, root: Path, spoil: str) -> Upload:
    """Code's statistics under the current basis, made by hand with one fault."""
    gram = torch.eye(HIDDEN + 1, dtype=torch.float64)[None].repeat(LAYERS, 1, 1)
    gram[:, -1, -1] = 100
    if spoil == "negative diagonal":
        gram[1, 4, 4] = -1.0
    path = root / f"statistics-{spoil.replace(' ', '-')}.safetensors"
    save_file(statistics_tensors(gram), str(path))
    entries, sources = described(safetensors_ranges(path))
    basis = hostile.admin.Status(pb.StatusRequest(), timeout=30).basis_hash
    header = tensors_pb2.StatisticsHeader(basis_hash=basis, hidden_size=16 if spoil == "hidden size" else HIDDEN,
                                          num_layers=LAYERS, token_count=100, sequence_length=64, dataset="default")
    if spoil == "full matrix":
        entries[0].shape[:] = [(HIDDEN + 1) ** 2]
        entries[0].size_bytes = 8 * (HIDDEN + 1) ** 2
    plan = pb.UploadPlan(kind=pb.UPLOAD_KIND_STATISTICS, manifest=tensors_pb2.TensorManifest(tensors=entries),
                         statistics=header)
    return Upload(plan, sources, "statistics")


def committed(hostile: Hostile, who: str, upload: Upload) -> tuple[str, str]:
    """Begins ``upload``, sends every byte the coordinator lacks, and returns how the commit was answered."""
    begin = hostile.channels[who].unary_unary(FEDERATION + "BeginUpload", pb.UploadPlan.SerializeToString,
                                              pb.UploadState.FromString)
    opened = begin(upload.plan, timeout=30)
    chunks = [pb.Chunk(upload_id=opened.upload_id, sha256=blob.sha256, offset=blob.offset, data=data)
              .SerializeToString()
              for blob in opened.blobs if blob.offset < upload.sources[blob.sha256].size
              for data in read_range(upload.sources[blob.sha256].path, upload.sources[blob.sha256].start
                                     + blob.offset, upload.sources[blob.sha256].size - blob.offset)]
    assert call(hostile, who, FEDERATION + "SendChunks", chunks)[0] == grpc.StatusCode.OK
    return rpc(hostile, who, FEDERATION + "CommitUpload", pb.CommitRequest(upload_id=opened.upload_id))


def rpc(hostile: Hostile, who: str, method: str, body: bytes | list[bytes] | object) -> tuple[str, str]:
    if not isinstance(body, (bytes, list)):
        body = body.SerializeToString()
    code, details = call(hostile, who, method, body)
    return code.name, details


def joined(extras: Extras, data: bytes, capsys) -> tuple[str, str]:
    """`dume-node join` with a real token and a data file holding ``data``: its exit code and what it printed."""
    path = extras.root / "data.txt"
    path.write_bytes(data)
    capsys.readouterr()
    code = node_cli.main(["join", "--token", extras.fresh_token, "--model", str(extras.spec.model_dir), "--data",
                          str(path), "--workdir", str(extras.root / "node"), "--once"])
    said = capsys.readouterr().err.strip()
    assert len(said.splitlines()) == 1, said
    return f"exit {code}", said


# -- the table ------------------------------------------------------------------------------------------------------
Run = Callable[[Hostile, Extras, object], tuple[str, str]]
CASES: list[tuple[str, Run, str, str]] = [
    # identity: who may call what
    ("a certificate from another CA", lambda h, x, _: rpc(h, "stranger", FEDERATION + "Watch", pb.WatchRequest()),
     "UNAVAILABLE", "failed to connect to all addresses"),
    ("a node calls the admin's Status", lambda h, x, _: rpc(h, "mallory", ADMIN + "Status", pb.StatusRequest()),
     "PERMISSION_DENIED", "needs the admin identity"),
    ("a node revokes another member", lambda h, x, _: rpc(h, "mallory", ADMIN + "Revoke",
                                                          pb.RevokeRequest(node="code", reason="mine")),
     "PERMISSION_DENIED", "needs the admin identity"),
    ("a node issues itself a join token", lambda h, x, _: rpc(h, "mallory", ADMIN + "CreateToken",
                                                              pb.TokenRequest(node="sybil", ttl_seconds=60)),
     "PERMISSION_DENIED", "needs the admin identity"),
    ("a node approves its own held statistics", lambda h, x, _: rpc(h, "mallory", ADMIN + "Approve",
                                                                    pb.ApproveRequest(node="mallory")),
     "PERMISSION_DENIED", "needs the admin identity"),
    ("a node commits another member's upload", lambda h, x, _: rpc(h, "code", FEDERATION + "CommitUpload",
                                                                   pb.CommitRequest(upload_id=h.upload_id)),
     "PERMISSION_DENIED", "belongs to 'mallory'"),
    ("a revoked member reconnects", lambda h, x, _: rpc(h, "eve", FEDERATION + "Watch", pb.WatchRequest()),
     "PERMISSION_DENIED", "was revoked (hostile)"),
    ("a revoked member uploads", lambda h, x, _: rpc(h, "eve", FEDERATION + "BeginUpload", h.plan),
     "PERMISSION_DENIED", "was revoked"),
    ("replay of a committed upload", lambda h, x, _: rpc(h, "code", FEDERATION + "CommitUpload",
                                                         pb.CommitRequest(upload_id=h.code_upload_id)),
     "FAILED_PRECONDITION", "is not open (committed, expired or never begun)"),
    # plans
    ("a tensor with a wrong name", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(first_mlp(plan), "name", "model.layers.0.mlp.backdoor.weight"))),
     "INVALID_ARGUMENT", "the federation's architecture"),
    ("a tensor with a wrong dtype", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: retyped(first_mlp(plan)))), "INVALID_ARGUMENT", "is F16[64, 32], the federation's is F32"),
    ("a tensor with a wrong shape", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: reshaped(first_mlp(plan)))), "INVALID_ARGUMENT", "the federation's is F32[64, 32]"),
    ("a tensor whose size is not its shape's", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(first_mlp(plan), "size_bytes", 12))), "INVALID_ARGUMENT", "its shape and dtype make"),
    ("a tensor named twice", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: plan.manifest.tensors.append(first_mlp(plan)))), "INVALID_ARGUMENT", "names a tensor or file"),
    ("a blob hash that is not hex", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(first_mlp(plan), "sha256", "../" * 21 + "x"))), "INVALID_ARGUMENT",
     "no valid SHA-256"),
    ("a file name climbing out of staging", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(plan.files[-1], "name", "../../../ledger.sqlite"))), "INVALID_ARGUMENT",
     "'../../../ledger.sqlite' is not one a model upload carries"),
    ("an absolute file name", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(plan.files[0], "name", "/etc/passwd"))), "INVALID_ARGUMENT",
     "is not one a model upload carries"),
    ("an upload of no kind", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(plan, "kind", pb.UPLOAD_KIND_UNSPECIFIED))), "INVALID_ARGUMENT", "kind is missing"),
    ("statistics before any model", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload",
                                                        statistics(h, x.root, "none").plan),
     "FAILED_PRECONDITION", "upload the model before its statistics"),
    ("a model holding +Inf", lambda h, x, _: committed(h, "mallory", x.infinite), "INVALID_ARGUMENT",
     "holds NaN or infinite values"),
    # statistics
    ("statistics as a full matrix, not the upper triangle", lambda h, x, _: rpc(
        h, "code", FEDERATION + "BeginUpload", statistics(h, x.root, "full matrix").plan), "INVALID_ARGUMENT",
     "each layer's upper triangle is F64[561]"),
    ("statistics of another hidden size", lambda h, x, _: rpc(
        h, "code", FEDERATION + "BeginUpload", statistics(h, x.root, "hidden size").plan), "INVALID_ARGUMENT",
     "statistics are for hidden size 16"),
    ("statistics with a negative diagonal", lambda h, x, _: committed(h, "code", statistics(
        h, x.root, "negative diagonal")), "INVALID_ARGUMENT", "negative diagonal entry"),
    # chunks
    ("a chunk past the bytes held", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks", chunk(h, offset=5)),
     "FAILED_PRECONDITION", "chunk at offset 5 does not continue the 0 of"),
    ("a chunk at a negative offset", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks",
                                                         chunk(h, offset=-1)),
     "FAILED_PRECONDITION", "chunk at offset -1 does not continue"),
    ("a chunk over 1 MiB", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks",
                                               chunk(h, data=bytes((1 << 20) + 1))),
     "FAILED_PRECONDITION", "send at most 1048576"),
    ("a chunk beyond the declared size", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks", chunk(
        h, data=bytes(smallest_blob(h)[1] + 1))), "FAILED_PRECONDITION", "runs past the"),
    ("a blob with a wrong checksum", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks", chunk(
        h, data=bytes(smallest_blob(h)[1]))), "FAILED_PRECONDITION", "does not match its SHA-256"),
    ("a chunk of a blob the plan does not name", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks", chunk(
        h, sha256="0" * 64)), "FAILED_PRECONDITION", "is not part of upload"),
    ("a commit before every byte is sent", lambda h, x, _: rpc(h, "mallory", FEDERATION + "CommitUpload",
                                                               pb.CommitRequest(upload_id=h.upload_id)),
     "FAILED_PRECONDITION", "blobs of the upload are incomplete"),
    # the wire itself (each a fix: malformed requests were INTERNAL with a logged traceback; messages quoting what
    # the caller sent ran over several lines and to any length)
    ("malformed protobuf", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", b"\x12\x05\x0a"),
     "INVALID_ARGUMENT", "is not a valid protobuf message"),
    ("an upload id holding a newline", lambda h, x, _: rpc(h, "mallory", FEDERATION + "SendChunks", chunk(
        h, upload_id=h.upload_id[:31] + "\n")), "FAILED_PRECONDITION", "\\n is not open"),
    ("a file name of 100 kB", lambda h, x, _: rpc(h, "mallory", FEDERATION + "BeginUpload", plan_with(
        h, lambda plan: setattr(plan.files[0], "name", "n" * 100_000))), "INVALID_ARGUMENT",
     "is not one a model upload carries"),
    # enrolment
    ("a forged join token secret", lambda h, x, _: rpc(h, "enrolment", ENROL, pb.EnrolRequest(
        secret=new_secret(), csr_pem=pki.create_csr(pki.create_private_key(), "x"))),
     "UNAUTHENTICATED", "not issued by this coordinator"),
    ("a join token used again", lambda h, x, _: rpc(h, "enrolment", ENROL, pb.EnrolRequest(
        secret=h.used_secret, csr_pem=pki.create_csr(pki.create_private_key(), "code"))),
     "UNAUTHENTICATED", "already used"),
    ("an expired join token", lambda h, x, _: rpc(h, "enrolment", ENROL, pb.EnrolRequest(
        secret=h.expired_secret, csr_pem=pki.create_csr(pki.create_private_key(), "late"))),
     "UNAUTHENTICATED", "expired at"),
    ("a good token with a garbage certificate request", lambda h, x, _: rpc(h, "enrolment", ENROL, pb.EnrolRequest(
        secret=x.fresh_secret, csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n")),
     "INVALID_ARGUMENT", "certificate request"),
    # the node's own inputs, through `dume-node join` with a real token: refused before enrolling
    ("node data that is empty", lambda h, x, capsys: joined(x, b"", capsys), "exit 2", "no non-empty documents"),
    ("node data that is binary", lambda h, x, capsys: joined(x, bytes(range(128)) * 8, capsys), "exit 2",
     "binary"),
    ("node data that is not UTF-8", lambda h, x, capsys: joined(x, "caf\u00e9\n".encode("latin-1"), capsys),
     "exit 2", "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, run, outcome, fragment", CASES, ids=[case[0] for case in CASES])
def test_a_hostile_input_is_refused_with_one_clear_line_and_changes_nothing(
        hostile, extras, capsys, record, name, run, outcome, fragment):
    before = snapshot(hostile)
    record.count("bad inputs tried")
    got, message = run(hostile, extras, capsys)
    assert (got, fragment in message) == (outcome, True), f"{name}: {got} {message}"
    assert len(message) <= MESSAGE_CHARACTERS + 200 and "\n" not in message
    assert_unchanged(hostile, before)
