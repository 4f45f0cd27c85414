"""The audit log against an operator who edits the ledger behind the daemon's back, and version skew: a real
daemon, its SQLite ledger changed while it is stopped, and calls that speak another protocol version."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dume.coordinator import cli as coordinator_cli
from dume.node import cli as node_cli
from dume.shared.lab.harness import Federation
from dume.shared.transport import protocol
from dume.shared.transport.channels import CHANNEL_OPTIONS
from dume.shared.trust.audit import entry_hash
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

pytestmark = pytest.mark.scenario("audit and version skew")


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``dume-coordinator args`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = coordinator_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A daemon whose audit log holds four token entries, stopped; its pristine ledger bytes kept for each case."""
    fed = Federation(tmp_path_factory.mktemp("audit"), say=lambda line: None)
    fed.init()
    fed.serve()
    for name in ("ann", "bob", "cy", "dee"):
        fed.token(name)
    fed.stop()
    assert not Path(f"{fed.state / 'ledger.sqlite'}-wal").exists() or \
        Path(f"{fed.state / 'ledger.sqlite'}-wal").stat().st_size == 0  # a clean stop leaves no WAL to carry over
    fed.pristine = (fed.state / "ledger.sqlite").read_bytes()
    yield fed
    fed.close()


def tampered(fed: Federation, tamper: Callable[[sqlite3.Connection], object]) -> None:
    """Restores the pristine ledger, then lets ``tamper`` change it, as an operator with the file could."""
    (fed.state / "ledger.sqlite").write_bytes(fed.pristine)
    db = sqlite3.connect(fed.state / "ledger.sqlite")
    with db:
        tamper(db)
    db.close()


def edited(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit SET detail_json = '{\"expires_at\":0}' WHERE sequence = 2")


def edited_and_rehashed(db: sqlite3.Connection) -> None:
    """Entry 2 edited and its own hash recomputed, as a forger who knows the hash rule would."""
    db.execute("UPDATE audit SET subject = 'mallory' WHERE sequence = 2")
    row = db.execute("SELECT previous_hash, sequence, at, kind, subject, detail_json FROM audit WHERE sequence = 2")
    db.execute("UPDATE audit SET entry_hash = ? WHERE sequence = 2", (entry_hash(*row.fetchone()),))


def removed(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit WHERE sequence = 2")


def reordered(db: sqlite3.Connection) -> None:
    for old, new in ((2, -2), (3, 2), (-2, 3)):
        db.execute("UPDATE audit SET sequence = ? WHERE sequence = ?", (new, old))


@pytest.mark.parametrize("tamper, first_bad", [
    (edited, "audit entry 2 (token bob) was altered"),
    (edited_and_rehashed, "audit entry 3 does not follow entry 2"),
    (removed, "audit entry 2 is missing (found entry 3 in its place)"),
    (reordered, "audit entry 2 does not follow entry 1"),
])
def test_audit_verify_names_the_first_edited_removed_or_reordered_entry(federation, capsys, tamper, first_bad):
    tampered(federation, tamper)
    federation.serve()
    try:
        code, out, err = run(capsys, "audit", "--state", str(federation.state), "--verify")
        assert code == 2 and not out
        assert err.strip() == f"dume-coordinator: error: the audit log is broken: {first_bad}"
    finally:
        federation.stop()


def test_entries_cut_off_the_end_are_caught_with_an_anchor_and_a_skewed_protocol_is_refused(
        federation, expert_factory, capsys, monkeypatch, tmp_path):
    with sqlite3.connect(federation.state / "ledger.sqlite") as db:
        (last,) = db.execute("SELECT entry_hash FROM audit WHERE sequence = 4").fetchone()
    db.close()
    tampered(federation, lambda db: db.execute("DELETE FROM audit WHERE sequence = 4"))
    federation.serve()
    try:
        state = str(federation.state)
        code, out, _ = run(capsys, "audit", "--state", state, "--verify", "--json")
        assert code == 0 and json.loads(out)["entries"] == 3  # a chain alone cannot tell a cut-off end
        code, _, err = run(capsys, "audit", "--state", state, "--verify", "--anchor", last)
        assert code == 2 and f"no entry has the anchor hash {last}" in err and "ends at entry 3" in err

        # Version skew, called directly: other or no protocol metadata is refused before any servicer runs, on
        # unary and streaming calls alike, naming both versions; the health service answers anyone.
        channel = grpc.secure_channel(federation.address(), grpc.ssl_channel_credentials(
            (federation.state / "ca" / "cert.pem").read_bytes(), (federation.state / "admin" / "key.pem").read_bytes(),
            (federation.state / "admin" / "cert.pem").read_bytes()), options=CHANNEL_OPTIONS)
        admin, members = rpc.AdminStub(channel), rpc.FederationStub(channel)
        for metadata, caller in (([("dume-protocol", "1")], "the caller speaks DUME protocol 1"),
                                 ([], "the caller speaks no DUME protocol version")):
            for call in (lambda: admin.Status(pb.StatusRequest(), metadata=metadata, timeout=30),
                         lambda: next(members.Watch(pb.WatchRequest(), metadata=metadata, timeout=30))):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
                details, ours = refused.value.details(), protocol.PROTOCOL_VERSION
                assert details.startswith(caller) and f"this coordinator speaks protocol {ours}: use a dume" in details
        status = admin.Status(pb.StatusRequest(), metadata=[("dume-protocol", str(protocol.PROTOCOL_VERSION))],
                              timeout=30)
        assert status.audit_entries == 3
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        channel.close()

        # A node of another protocol version stops at enrolment with exit code 3 and one line naming both.
        spec = expert_factory("llama")["code"]
        token = federation.token("skewed")
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
        capsys.readouterr()
        code = node_cli.main(["join", "--token", token, "--model", str(spec.model_dir), "--data",
                              str(spec.data_path), "--workdir", str(tmp_path / "skewed"), "--once"])
        err = capsys.readouterr().err
        assert code == 3, err
        assert err.strip().splitlines()[-1] == (
            f"dume-node: error: enrolment refused: the caller speaks DUME protocol {protocol.PROTOCOL_VERSION} and "
            f"this coordinator speaks protocol {protocol.PROTOCOL_VERSION - 1}: use a dume release that speaks "
            f"protocol {protocol.PROTOCOL_VERSION - 1} on the node (or move the coordinator to the node's)")
    finally:
        federation.stop()
