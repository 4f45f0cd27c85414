"""Upload limits: a plan is checked against the federation's architecture and the member's quota before any byte
is accepted, open plans are few and held on disk, stale staging expires, and a full disk is a clear, retryable
refusal, as is a state directory that goes read-only under the running daemon.

The coordinator runs in process on a real state directory (real ledger, staging files and blob store); the full
disk is a real, small tmpfs under a real daemon process, filled for real; the read-only one a real ext4 filesystem
on a loop device that the kernel remounts read-only on a (test-triggered) filesystem error.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest

from dume.coordinator import messages
from dume.coordinator.cli import admin_stubs
from dume.coordinator.errors import Refused, storage_refusal
from dume.coordinator.federation import Coordinator
from dume.coordinator.limits import Limits
from dume.coordinator.state_dir import StateDir
from dume.node import cli as node_cli
from dume.node.agent import Agent, enrol, model_upload
from dume.node.workdir import Workdir
from dume.shared.errors import DumeError
from dume.shared.lab.harness import Federation, differing_files, wait_until
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.merge import merge
from dume.shared.method.routers import MergeSettings
from dume.shared.method.settings import DatasetSpec, ExpertSpec
from dume.shared.method.statistics import triangle_size
from dume.shared.method.writer import TOKENIZER_FILES
from dume.shared.transport.blobs import read_range, sha256_file
from dume.shared.transport.download import version_blobs
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc
from dume.v1 import tensors_pb2

from conftest import write_domain_text
from hostile import ledger_rows
from in_process import enrolled, make_coordinator, send, started

pytestmark = pytest.mark.scenario("upload limits and full disk")
TIB = 1 << 40


def architecture(model_dir) -> dict:
    expert = ExpertDirectory(model_dir)
    files = {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    return messages.architecture_of(expert.config, messages.layout_manifest(expert.tensor_layout()), files)


def with_huge_tensor(plan: pb.UploadPlan) -> pb.UploadPlan:
    """The plan with one MLP tensor declaring 1 TiB (consistent with its own shape and dtype)."""
    huge = pb.UploadPlan()
    huge.CopyFrom(plan)
    entry = next(e for e in huge.manifest.tensors if e.name.endswith("up_proj.weight"))
    entry.shape[:] = [1 << 19, 1 << 20]
    entry.size_bytes = (1 << 39) * (4 if entry.dtype == "F32" else 2)
    return huge


def staged_entries(coordinator: Coordinator) -> list[str]:
    return sorted(path.name for path in coordinator.uploads.root.iterdir())


def test_a_plan_is_checked_against_the_architecture_before_any_byte(expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    coordinator = make_coordinator(tmp_path / "fixed", architecture(spec.model_dir))
    try:
        enrolled(coordinator, "code")
        plan = model_upload(spec.model_dir, "code").plan
        with pytest.raises(Refused, match=r"up_proj.weight is .* the federation's is") as refused:
            coordinator.begin_upload("code", with_huge_tensor(plan))
        assert refused.value.kind == "invalid" and staged_entries(coordinator) == []
        statistics = pb.UploadPlan(kind=pb.UPLOAD_KIND_STATISTICS, statistics=tensors_pb2.StatisticsHeader(
            basis_hash="a" * 64, hidden_size=32, num_layers=2, token_count=10))
        statistics.manifest.tensors.add(name="layers.0", dtype="F64", shape=[TIB // 8], size_bytes=TIB,
                                        sha256="b" * 64)
        statistics.manifest.tensors.add(name="layers.1", dtype="F64", shape=[triangle_size(32)],
                                        size_bytes=8 * triangle_size(32), sha256="c" * 64)
        coordinator.ledger.set_model("code", plan)  # statistics are taken from members with a model only
        with pytest.raises(Refused, match="upper triangle is F64") as refused:
            coordinator.begin_upload("code", statistics)
        assert refused.value.kind == "invalid" and staged_entries(coordinator) == []
        oversized_file = pb.UploadPlan()
        oversized_file.CopyFrom(plan)
        oversized_file.files[0].size_bytes = TIB
        with pytest.raises(Refused, match="max_file_bytes"):
            coordinator.begin_upload("code", oversized_file)
        assert staged_entries(coordinator) == []
    finally:
        coordinator.close()


def test_quota_and_open_plans_bound_what_a_member_stages(expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    upload = model_upload(spec.model_dir, "code")
    size = sum(e.size_bytes for e in upload.plan.manifest.tensors) + sum(f.size_bytes for f in upload.plan.files)
    # No architecture yet (the first member fixes it): the quota alone bounds what the first plan declares.
    coordinator = make_coordinator(tmp_path / "first", staging_quota_bytes=int(size * 1.5), open_uploads_per_member=2)
    try:
        enrolled(coordinator, "code")
        with pytest.raises(Refused, match="staging_quota_bytes") as refused:
            coordinator.begin_upload("code", with_huge_tensor(upload.plan))
        assert refused.value.kind == "invalid" and staged_entries(coordinator) == []
        first = coordinator.begin_upload("code", upload.plan)
        assert coordinator.begin_upload("code", upload.plan) == first  # the same plan resumes, it is not a new one
        other = pb.UploadPlan()
        other.CopyFrom(upload.plan)
        del other.files[:]  # another plan of nearly the same size: together they pass the quota
        with pytest.raises(Refused, match=r"bytes staged in open uploads; \d+ more would pass its quota") as refused:
            coordinator.begin_upload("code", other)
        assert refused.value.kind == "exhausted" and staged_entries(coordinator) == [first.upload_id]
        small = pb.UploadPlan(kind=pb.UPLOAD_KIND_MODEL, files=[upload.plan.files[0]])
        coordinator.begin_upload("code", small)
        config_only = pb.UploadPlan(kind=pb.UPLOAD_KIND_MODEL, files=[upload.plan.files[1]])
        with pytest.raises(Refused, match="already holds 2 open uploads") as refused:
            coordinator.begin_upload("code", config_only)
        assert refused.value.kind == "exhausted"
        enrolled(coordinator, "math")  # one member's quota is its own
        coordinator.begin_upload("math", config_only)
    finally:
        coordinator.close()


def test_open_plans_live_on_disk_survive_a_restart_and_expire(expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    upload = model_upload(spec.model_dir, "code")
    coordinator = make_coordinator(tmp_path / "coordinator", staging_expiry_seconds=2.0)
    state = StateDir(tmp_path / "coordinator")
    identity = enrolled(coordinator, "code")
    planned = coordinator.begin_upload("code", upload.plan)
    send(coordinator, planned, upload, limit=1000)
    held = coordinator.uploads.held(planned)
    coordinator.close()

    coordinator = started(state)  # a restart: the plan and its staged bytes are read back from disk
    try:
        again = coordinator.uploads.planned("code", planned.upload_id)
        assert coordinator.uploads.held(again) == held and any(0 < offset for offset in held.values())
        send(coordinator, again, upload)
        coordinator.commit_upload(identity, planned.upload_id)
        assert coordinator.ledger.member("code").state == "active" and staged_entries(coordinator) == []

        stale = upload.plan  # begun again and left: a plan the architecture accepts, never committed
        opened = coordinator.begin_upload("code", stale)
        assert staged_entries(coordinator) == [opened.upload_id]
        time.sleep(3.0)  # no progress for longer than the expiry
    finally:
        coordinator.close()
    coordinator = started(state)  # expired at start, before any call
    try:
        assert staged_entries(coordinator) == []
        with pytest.raises(Refused, match="not open"):
            coordinator.uploads.planned("code", opened.upload_id)
        opened = coordinator.begin_upload("code", stale)
        deadline = time.monotonic() + 10
        while staged_entries(coordinator) and time.monotonic() < deadline:  # and on the daemon's timer
            time.sleep(0.2)
        assert staged_entries(coordinator) == []
    finally:
        coordinator.close()


def test_limits_in_the_config_are_checked():
    assert Limits.from_config(None) == Limits()
    with pytest.raises(DumeError, match="unknown limit 'quota'"):
        Limits.from_config({"quota": 1})
    with pytest.raises(DumeError, match="open_uploads_per_member = 0 must be"):
        Limits.from_config({"open_uploads_per_member": 0})


def test_an_unwritable_state_directory_is_one_clear_refusal(tmp_path):
    """What a read-only state directory raises (the database's own error, and EROFS) becomes UNAVAILABLE, which
    nodes retry, with no internal path in it; any other error is left alone."""
    path = tmp_path / "ledger.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(sqlite3.OperationalError) as raised:
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("INSERT INTO t VALUES (1)")
    for error in (raised.value, OSError(errno.EROFS, "Read-only file system", str(path))):
        refused = storage_refusal(error)
        assert refused is not None and refused.kind == "unavailable"
        assert "cannot write its state directory" in str(refused) and str(tmp_path) not in str(refused)
    assert storage_refusal(OSError(errno.ENOSPC, "No space left on device", str(path))).kind == "exhausted"
    assert storage_refusal(ValueError("something else")) is None


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MiB filesystem (tmpfs), where this test may mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(filler):
    """Fills the disk ``filler`` lies on, for real, to the last byte."""
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_clear_retryable_refusal_and_work_goes_on_when_space_returns(
        expert_factory, tmp_path, small_disk):
    spec = expert_factory("llama")["code"]
    fed = Federation(small_disk / "federation", pipe_nodes=True)
    try:
        fed.init("--sequence-length", "64")
        StateDir(fed.state).update_config(limits={**asdict(Limits()), "min_free_bytes": 4 << 20})
        fed.serve()
        workdir = Workdir(tmp_path / "node")
        enrol(JoinToken.decode(fed.token("code")), workdir, spec.model_dir, {"default": spec.data_path})
        stub = rpc.FederationStub(workdir.channel())
        upload = model_upload(spec.model_dir, "code")
        opened = stub.BeginUpload(upload.plan, timeout=30)
        filler = fill(small_disk / "filler")
        big = max(upload.sources, key=lambda sha: upload.sources[sha].size)
        where = upload.sources[big]
        data = b"".join(read_range(where.path, where.start, where.size))
        with pytest.raises(grpc.RpcError) as full:
            stub.SendChunks(iter([pb.Chunk(upload_id=opened.upload_id, sha256=big, offset=0, data=data)]),
                            timeout=30)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk is full" in full.value.details() and str(small_disk) not in full.value.details()
        assert fed.status()["members"][0]["state"] == "enrolled"  # the daemon is up and answers reads
        with pytest.raises(grpc.RpcError) as reserve:  # and a new plan is refused before a byte is sent
            stub.BeginUpload(pb.UploadPlan(kind=pb.UPLOAD_KIND_MODEL, files=upload.plan.files), timeout=30)
        assert reserve.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "must stay free: the operator must free space" in reserve.value.details()
        os.unlink(filler)  # space returns: the node's own upload, resumed, goes through
        Agent(workdir).upload(upload)
        assert fed.status()["members"][0]["state"] == "active"

        assert fed.stop() == 0
    finally:
        fed.close()
        shutil.rmtree(small_disk / "federation", ignore_errors=True)


def test_a_node_whose_workdir_fills_stops_with_one_line(expert_factory, small_disk, capsys):
    spec = expert_factory("llama")["code"]
    workdir = Workdir(small_disk / "node")  # enrolled, as `join --token` leaves it
    _, ca_cert = pki.create_authority()
    workdir.save_identity(pki.create_private_key(), ca_cert, ca_cert)
    workdir.update(name="code", coordinator="127.0.0.1:9", model=str(spec.model_dir.resolve()),
                   data=str(spec.data_path.resolve()))
    fill(small_disk / "filler")
    assert node_cli.main(["join", "--model", str(spec.model_dir), "--data", str(spec.data_path), "--workdir",
                          str(workdir.root)]) == 2
    said = capsys.readouterr().err
    assert "the disk is full" in said and "run the command again" in said and len(said.strip().splitlines()) == 1


def logged(fed: Federation, label: str) -> str:
    path = fed.log(label)
    return path.read_text(errors="replace") if path.exists() else ""


class FailingDisk:
    """A real ext4 filesystem on a loop device, mounted with ``errors=remount-ro``: ``fail`` reports a filesystem
    error, and the kernel remounts it read-only under the files the daemon holds open, as on a real disk error.
    Such a filesystem is made writable again the way an operator does it: unmounted, checked, mounted."""

    def __init__(self, image: Path, mount: Path) -> None:
        self.image, self.mount = image, mount

    def attach(self) -> bool:
        self.mount.mkdir(parents=True, exist_ok=True)
        return subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mount)],
                              capture_output=True).returncode == 0

    def trigger(self) -> Path:
        source = subprocess.run(["findmnt", "-no", "SOURCE", str(self.mount)], capture_output=True,
                                text=True).stdout.strip()
        return Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"

    def fail(self) -> None:
        self.trigger().write_text("dume test: state directory fails\n")
        with pytest.raises(OSError) as refused:
            (self.mount / "probe").write_bytes(b"")
        assert refused.value.errno == errno.EROFS

    def options(self) -> list[str]:
        return subprocess.run(["findmnt", "-no", "OPTIONS", str(self.mount)], capture_output=True,
                              text=True).stdout.strip().split(",")

    def repair(self) -> str:
        """Unmounts, checks (fsck), mounts again read-write; returns what fsck said."""
        subprocess.run(["umount", str(self.mount)], check=True)
        checked = subprocess.run(["fsck.ext4", "-f", "-p", str(self.image)], capture_output=True, text=True)
        assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: errors corrected (the test one)
        assert self.attach() and "rw" in self.options()
        return checked.stdout


@pytest.fixture
def failing_disk(tmp_path):
    """A 64 MiB ext4 filesystem mounted at tmp_path/federation/coordinator, where this test may make one."""
    disk = FailingDisk(tmp_path / "disk.img", tmp_path / "federation" / "coordinator")
    with open(disk.image, "wb") as image:
        image.truncate(64 << 20)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(disk.image)], capture_output=True).returncode != 0 \
            or not disk.attach():
        pytest.skip("cannot make and mount an ext4 filesystem here (needs root, mkfs.ext4 and loop devices)")
    if not disk.trigger().exists():
        subprocess.run(["umount", str(disk.mount)], check=False)
        pytest.skip("this kernel has no ext4 trigger_fs_error")
    (disk.mount / "lost+found").rmdir()  # the state directory is the filesystem's root
    yield disk
    subprocess.run(["umount", "-l", str(disk.mount)], check=False)


def test_a_state_directory_gone_read_only_under_the_daemon_is_one_retryable_line_and_reads_go_on(
        expert_factory, tmp_path, failing_disk, record):
    """Writes of every kind (a node's upload, an admin's token, an enrolment) are refused with one retryable line
    while the daemon serves reads; once the operator has the filesystem back, the waiting node's work completes."""
    math = expert_factory("llama")["math"]
    extra = write_domain_text(tmp_path / "math-b.txt", "math", documents=20, offset=200)
    fed = Federation(tmp_path / "federation")
    try:
        fed.init("--sequence-length", "64", fixed_ports=True)
        StateDir(fed.state).update_config(limits={**asdict(Limits()), "min_free_bytes": 4 << 20})
        fed.serve()
        fed.join("math", math.model_dir, math.data_path, fed.token("math"), "--once")
        fed.wait_exact(["math"])
        admin, federation = admin_stubs(StateDir(fed.state))
        helper = Workdir(tmp_path / "math2")
        enrol(JoinToken.decode(admin.CreateToken(pb.TokenRequest(node="math2", ttl_seconds=3600,
                                                                 expert="math")).token),
              helper, None, {"b": extra})
        late = JoinToken.decode(fed.token("late"))
        before = ledger_rows(fed.state)

        failing_disk.fail()  # the state directory is read-only from here, under the running daemon
        record.count("faults injected")
        said = "the coordinator cannot write its state directory (read-only or not permitted): its operator must " \
               "make it writable; reading versions still works"
        # A node's statistics: it reads what it needs (basis, weights), then its upload is refused, and it retries.
        node = fed._start("node-math2", "node", "join", "--data", f"b={extra}", "--workdir", str(helper.root),
                          "--once")
        wait_until(lambda: f"statistics upload interrupted (UNAVAILABLE: {said}); retrying in" in
                   logged(fed, "node-math2"), 120, "math2's upload to be refused")
        assert str(fed.state) not in logged(fed, "node-math2")
        with pytest.raises(grpc.RpcError) as refused:  # an admin's change: the same line
            admin.CreateToken(pb.TokenRequest(node="other", ttl_seconds=60), timeout=30)
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAVAILABLE, said)
        with pytest.raises(DumeError, match="^enrolment refused: the coordinator cannot write") as enrolling:
            enrol(late, Workdir(tmp_path / "late"), math.model_dir, {"default": math.data_path})
        assert "not reachable" not in str(enrolling.value)  # it answered: only its state directory is at fault
        # The daemon is up and answers reads: status, the version, its blobs.
        status = fed.status()
        assert status["version"] == 1 and status["exact"]
        version = federation.GetVersion(pb.VersionRequest(), timeout=30)
        sha256, size = max(version_blobs(version).items(), key=lambda item: item[1])
        read = b"".join(chunk.data for chunk in federation.ReadBlob(pb.BlobRequest(sha256=sha256), timeout=30))
        assert len(read) == size and hashlib.sha256(read).hexdigest() == sha256
        assert node.poll() is None  # the node waits, retrying

        # The operator stops the daemon, checks and mounts the filesystem again, and starts it: the work goes on.
        assert fed.stop() == 0, logged(fed, "coordinator")[-2000:]
        failing_disk.repair()
        assert ledger_rows(fed.state) == before  # nothing was half-written, nothing lost
        fed.serve()
        assert node.wait(timeout=180) == 0, logged(fed, "node-math2")
        record.lost(["math", "math2"], fed.wait_exact(["math", "math2"], contributions=["math/default", "math2/b"]))
        both = ExpertSpec("math", math.model_dir, datasets=(DatasetSpec("default", math.data_path),
                                                             DatasetSpec("b", extra, "math2")))
        assert not differing_files(fed.export(tmp_path / "exported"),
                                   merge([both], tmp_path / "reference", MergeSettings(sequence_length=64)))
        assert "intact" in fed.admin("audit", "--verify").stdout
    finally:
        fed.close()
