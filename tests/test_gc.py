"""`dume-coordinator gc` against a real daemon with real nodes: after a revocation it deletes what only the revoked
member named, crash leftovers and the pruned versions' blobs, and never a blob anything kept names. And `backup`,
which checks every blob the ledger names, with members that hold no model."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from dume.coordinator import cli as coordinator_cli
from dume.coordinator.backup import backup
from dume.coordinator.federation import Coordinator
from dume.coordinator.state_dir import StateDir, initialise
from dume.node import cli as node_cli
from dume.node.agent import model_upload
from dume.shared.lab.harness import Federation, differing_files
from dume.shared.method.routers import MergeSettings
from dume.shared.trust import pki


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``dume-coordinator args`` in this process (no interpreter start): exit code, stdout, stderr."""
    capsys.readouterr()
    code = coordinator_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def stored(state) -> set[str]:
    return {path.name for path in (state / "blobs").glob("??/*") if not path.name.startswith(".")}


def model_blobs(spec) -> set[str]:
    upload = model_upload(spec.model_dir, spec.name)
    return {entry.sha256 for entry in upload.plan.manifest.tensors} | {file.sha256 for file in upload.plan.files}


@pytest.mark.scenario("exact unlearning")
def test_gc_after_a_revocation_deletes_what_only_the_revoked_member_named_and_keeps_every_referenced_blob(
        expert_factory, tmp_path, capsys):
    experts = expert_factory("llama")
    fed = Federation(tmp_path / "federation", say=lambda line: None)
    fed.init("--sequence-length", "64")
    state = str(fed.state)
    try:
        fed.serve()
        for name in ("code", "math"):
            fed.join(name, experts[name].model_dir, experts[name].data_path, fed.token(name))
        fed.wait_exact(["code", "math"])
        assert run(capsys, "revoke", "math", "--state", state)[0] == 0
        latest = fed.wait_exact(["code"])["version"]
        assert latest >= 3  # over both, then provisional and exact over code: versions to prune

        unique = model_blobs(experts["math"]) - model_blobs(experts["code"])
        shared = model_blobs(experts["math"]) & model_blobs(experts["code"])
        assert unique and shared and unique | shared <= stored(fed.state)
        assert run(capsys, "export", "--state", state, "--out", str(tmp_path / "before"))[0] == 0
        # What a crash leaves: a blob adopted whose row was never written, a temporary file, a revoked member's
        # staged upload.
        leftover = b"adopted, then the coordinator was killed before the row"
        orphan = hashlib.sha256(leftover).hexdigest()
        (fed.state / "blobs" / orphan[:2]).mkdir(exist_ok=True)
        (fed.state / "blobs" / orphan[:2] / orphan).write_bytes(leftover)
        temporary = fed.state / "blobs" / "tmp" / "download-crashed"
        temporary.write_bytes(b"half")
        os.utime(temporary, (time.time() - 3600, time.time() - 3600))
        staging = fed.state / "uploads" / ("a" * 32)
        staging.mkdir()
        (staging / "member").write_text("math")
        (staging / f"{'b' * 64}.part").write_bytes(b"x" * 1000)
        before = stored(fed.state)

        code, out, _ = run(capsys, "gc", "--state", state, "--prune-versions-before", str(latest), "--dry-run",
                           "--json")
        dry = json.loads(out)
        assert code == 0 and stored(fed.state) == before and staging.exists() and temporary.exists()
        assert dry["dry_run"] is True and dry["members"] == ["math"]
        assert dry["pruned_versions"] == list(range(1, latest))
        assert dry["member_blobs"] == len(unique) and dry["orphaned_blobs"] >= 1
        assert dry["blobs"] == sum(dry[kind] for kind in ("orphaned_blobs", "member_blobs", "version_blobs",
                                                          "basis_blobs"))
        assert (dry["uploads"], dry["upload_bytes"], dry["temporary_files"]) == (1, 1000 + len("math"), 1)

        code, out, _ = run(capsys, "gc", "--state", state, "--prune-versions-before", str(latest), "--json")
        collected, after = json.loads(out), stored(fed.state)
        assert code == 0 and collected == {**dry, "dry_run": False}
        assert not unique & after and orphan not in after  # the revoked member's own blobs and the orphan went
        assert shared <= after and model_blobs(experts["code"]) <= after  # what a current member names stays
        assert len(before - after) == collected["blobs"] and not staging.exists() and not temporary.exists()

        # The latest version is whole and the same bytes; a pruned one is refused with a clear line.
        assert run(capsys, "export", "--state", state, "--out", str(tmp_path / "after"))[0] == 0
        assert not differing_files(tmp_path / "before", tmp_path / "after")
        code, _, err = run(capsys, "export", "--state", state, "--out", str(tmp_path / "one"), "--version", "1")
        assert code == 3 and "version 1 was pruned" in err and err.count("\n") == 1
        capsys.readouterr()
        assert node_cli.main(["fetch", "--workdir", str(fed.workdir("code")), "--out", str(tmp_path / "node-one"),
                              "--version", "1"]) == 3  # a member of version 1 too
        assert "version 1 was pruned" in capsys.readouterr().err
        # Every blob the ledger names is on disk (a backup checks each), and the gc is in the intact audit log.
        assert backup(StateDir(fed.state), tmp_path / "backup.tar")[0] > 0
        code, out, _ = run(capsys, "audit", "--state", state, "--json")
        entry = json.loads(out)["entries"][-1]
        assert (entry["kind"], entry["detail"]["members"]) == ("gc", ["math"])
        assert entry["detail"]["pruned_versions"] == list(range(1, latest))
        assert entry["detail"]["blobs"] == collected["blobs"]
        code, out, _ = run(capsys, "audit", "--state", state, "--verify", "--json")
        assert code == 0 and json.loads(out)["intact"] is True
        code, out, _ = run(capsys, "gc", "--state", state)
        assert code == 0 and out.startswith("deleted 0 blobs") and "0 staged uploads" in out
        code, _, err = run(capsys, "gc", "--state", state, "--prune-versions-before", str(latest + 1))
        assert code == 3 and f"the latest is {latest}" in err
    finally:
        fed.close()


def test_a_backup_holds_a_member_enrolled_before_its_first_upload(tmp_path):
    """Regression: a member without a model (enrolled, not uploaded yet) made `backup` fail with a traceback."""
    state = initialise(tmp_path / "coordinator", "127.0.0.1:0", "127.0.0.1:0", None, None,
                       MergeSettings(sequence_length=64), None)
    coordinator = Coordinator(state)
    coordinator.addresses = {"listen": "127.0.0.1:7600", "enrolment": "127.0.0.1:7601"}
    try:
        token = coordinator.create_token("late", 3600)
        coordinator.enrol(token.secret, pki.create_csr(pki.create_private_key(), "late"))
        assert backup(state, tmp_path / "backup.tar") == (0, 0)
    finally:
        coordinator.close()
