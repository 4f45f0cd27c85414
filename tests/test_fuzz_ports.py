"""Fuzzing both of the daemon's ports with hypothesis, against the real daemon of ``hostile`` (a member whose
version is published, a hostile enrolled member with an open upload, a revoked one). Every example is one call:
random bytes and malformed protobuf to each method of either port, or a structurally valid but hostile message
(plans with random names, dtypes, shapes, sizes and path-traversal file names; chunks, commits and blob reads with
random ids, hashes and offsets; enrolments with random secrets and garbage certificate requests).

After every example: the call ended with a gRPC status within its deadline, never UNKNOWN or INTERNAL and never
with a traceback or an internal path in its message; the daemon answers its health check on both ports and an admin
``Status``, and logged no traceback; the ledger (every row of every table), the blob store and the latest version
are what they were, and staging holds only plans the coordinator accepted, each within what it declares.

``Leave`` is not fuzzed: it takes no field, so every request that parses is a real departure.
Examples are derandomized, so a run draws the same calls everywhere.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dume.shared.trust import pki
from dume.v1 import federation_pb2 as pb
from dume.v1 import tensors_pb2

from hostile import (
    ADMIN,
    ENROL,
    ENROLMENT_METHODS,
    FEDERATION,
    HEALTH_CHECK,
    MEMBER_METHODS,
    Hostile,
    assert_unchanged,
    call,
    snapshot,
)

pytestmark = pytest.mark.scenario("fuzzing both ports")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                # `record` only adds to the scorecard's counts: sharing it across examples is what is wanted.
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def baseline(hostile: Hostile) -> dict[str, Any]:
    return snapshot(hostile)


def answered(hostile: Hostile, who: str, method: str, body: bytes | list[bytes]) -> grpc.StatusCode:
    return call(hostile, who, method, body)[0]


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


def hashes(hostile: Hostile) -> st.SearchStrategy[str]:
    plan_hashes = [entry.sha256 for entry in hostile.plan.manifest.tensors] + [f.sha256 for f in hostile.plan.files]
    return st.one_of(st.sampled_from(hostile.hashes + plan_hashes), st.text(HEX, min_size=64, max_size=64),
                     st.text(max_size=80), st.sampled_from(TRAVERSAL))


def upload_ids(hostile: Hostile) -> st.SearchStrategy[str]:
    real = hostile.upload_id
    return st.one_of(st.just(real), st.sampled_from([real.upper(), "../" + real[3:], "." * 32, real + "\n", ""]),
                     st.text("0123456789abcdefABCDEF", min_size=32, max_size=32), st.text(max_size=40),
                     st.text(st.characters(categories=["Nd", "Lu", "Ll", "Lo"]), min_size=32, max_size=32))


def names(hostile: Hostile) -> st.SearchStrategy[str]:
    real = [entry.name for entry in hostile.plan.manifest.tensors] + [f.name for f in hostile.plan.files]
    return st.one_of(st.sampled_from(real + TRAVERSAL), st.text(max_size=40))


def plans(hostile: Hostile) -> st.SearchStrategy[pb.UploadPlan]:
    entry = st.builds(tensors_pb2.TensorEntry, name=names(hostile),
                      dtype=st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "", "f32"]),
                                      st.text(max_size=6)),
                      shape=st.lists(SMALL_OR_ANY, max_size=4), sha256=hashes(hostile), size_bytes=SMALL_OR_ANY)
    file = st.builds(pb.FileEntry, name=names(hostile), sha256=hashes(hostile), size_bytes=SMALL_OR_ANY)
    header = st.builds(tensors_pb2.StatisticsHeader, basis_hash=hashes(hostile), hidden_size=SMALL_OR_ANY,
                       num_layers=SMALL_OR_ANY, token_count=SMALL_OR_ANY, sequence_length=SMALL_OR_ANY)
    built = st.builds(pb.UploadPlan, kind=st.integers(-1, 4),
                      manifest=st.builds(tensors_pb2.TensorManifest, tensors=st.lists(entry, max_size=5)),
                      files=st.lists(file, max_size=3), statistics=header)
    return st.one_of(built, mutated_plans(hostile, entry, file))


def mutated_plans(hostile: Hostile, entry: st.SearchStrategy, file: st.SearchStrategy) -> st.SearchStrategy:
    """Mallory's real plan with one tensor or file replaced, added or doubled, or its kind changed."""
    @st.composite
    def mutate(draw: st.DrawFn) -> pb.UploadPlan:
        plan = pb.UploadPlan()
        plan.CopyFrom(hostile.plan)
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


def chunk_streams(hostile: Hostile) -> st.SearchStrategy[list[pb.Chunk]]:
    data = st.one_of(st.binary(max_size=64), st.sampled_from([(1 << 20) + 1, 4 << 20]).map(bytes))
    chunk = st.builds(pb.Chunk, upload_id=upload_ids(hostile), sha256=hashes(hostile), offset=SMALL_OR_ANY, data=data)
    return st.lists(chunk, max_size=4)


def malformed(hostile: Hostile) -> st.SearchStrategy[bytes]:
    """Random bytes, and real messages cut short, spoiled or padded with garbage."""
    real = [hostile.plan.SerializeToString(), pb.Chunk(upload_id=hostile.upload_id, sha256=hostile.hashes[0],
                                                      offset=3, data=b"abc").SerializeToString(),
            pb.BlobRequest(sha256=hostile.hashes[0], offset=1).SerializeToString(),
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
def test_random_bytes_and_malformed_protobuf_on_the_mutual_tls_port(hostile, baseline, record, data):
    record.count("bad inputs tried")
    method = data.draw(st.sampled_from(sorted(MEMBER_METHODS)))
    body = data.draw(malformed(hostile))
    who = data.draw(st.sampled_from(["mallory", "code"]))
    code = answered(hostile, who, method, [body, body] if MEMBER_METHODS[method][0] else body)
    if method.startswith(ADMIN):
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    assert_unchanged(hostile, baseline)


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_random_bytes_and_malformed_protobuf_on_the_enrolment_port(hostile, baseline, record, data):
    record.count("bad inputs tried")
    method = data.draw(st.sampled_from(sorted(ENROLMENT_METHODS)))
    code = answered(hostile, "enrolment", method, data.draw(malformed(hostile)))
    assert code != grpc.StatusCode.OK or method == HEALTH_CHECK  # bytes that parse are a fine health check
    assert_unchanged(hostile, baseline)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_hostile_upload_plans(hostile, baseline, record, data):
    record.count("bad inputs tried")
    plan = data.draw(plans(hostile))
    answered(hostile, data.draw(st.sampled_from(["mallory", "code"])), FEDERATION + "BeginUpload",
         plan.SerializeToString())
    assert_unchanged(hostile, baseline)


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_hostile_chunks_and_commits(hostile, baseline, record, data):
    record.count("bad inputs tried")
    who = data.draw(st.sampled_from(["mallory", "code"]))
    if data.draw(st.booleans()):
        chunks = data.draw(chunk_streams(hostile))
        answered(hostile, who, FEDERATION + "SendChunks", [chunk.SerializeToString() for chunk in chunks])
    else:
        commit = pb.CommitRequest(upload_id=data.draw(upload_ids(hostile)))
        assert answered(hostile, who, FEDERATION + "CommitUpload", commit.SerializeToString()) != grpc.StatusCode.OK
    assert_unchanged(hostile, baseline)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_hostile_reads(hostile, baseline, record, data):
    record.count("bad inputs tried")
    who = data.draw(st.sampled_from(["mallory", "code"]))
    what = data.draw(st.sampled_from(["blob", "basis", "version"]))
    if what == "blob":
        request = pb.BlobRequest(sha256=data.draw(hashes(hostile)), offset=data.draw(SMALL_OR_ANY))
        answered(hostile, who, FEDERATION + "ReadBlob", request.SerializeToString())
    elif what == "basis":
        answered(hostile, who, FEDERATION + "GetBasis", pb.BasisRequest(basis_hash=data.draw(hashes(hostile)))
             .SerializeToString())
    else:
        request = pb.VersionRequest(version=data.draw(INT64))
        answered(hostile, who, FEDERATION + "GetVersion", request.SerializeToString())
    assert_unchanged(hostile, baseline)


@pytest.fixture(scope="module")
def requests() -> list[bytes]:
    """Certificate requests a hostile enrolment might send: for the admin's name, a traversal, a weak key."""
    key = pki.create_private_key()
    return [pki.create_csr(key, name) for name in ("admin", "../code", "code", "x" * 64)]


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_hostile_enrolments(hostile, baseline, record, requests, data):
    record.count("bad inputs tried")
    secret = data.draw(st.one_of(st.text(max_size=80), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                               "0123456789-_", min_size=43, max_size=43)))
    csr = data.draw(st.one_of(st.sampled_from(requests), st.binary(max_size=200),
                              st.sampled_from(requests).map(lambda pem: pem[: len(pem) // 2])))
    request = pb.EnrolRequest(secret=secret, csr_pem=csr)
    assert answered(hostile, "enrolment", ENROL, request.SerializeToString()) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert_unchanged(hostile, baseline)
