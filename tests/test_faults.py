"""Faults on the wire and in the processes, with real coordinator and node processes on loopback.

Links are cut, stalled and slowed by ``tcp_proxy.TcpProxy`` between the nodes and the coordinator's member port;
processes are SIGKILLed at each stage. After every fault the work must complete, nothing acknowledged may be lost
or counted twice, and the exact version must be byte-identical to `dume merge` of the same members.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from dume.coordinator import failpoints, messages
from dume.coordinator.cli import admin_stubs
from dume.coordinator.state_dir import StateDir
from dume.node.agent import model_upload
from dume.node.workdir import Workdir
from dume.shared.errors import DumeError
from dume.shared.lab.harness import Federation, command, differing_files, wait_until
from dume.shared.method.merge import merge
from dume.shared.method.routers import MergeSettings
from dume.shared.method.settings import DatasetSpec, ExpertSpec
from dume.shared.transport.download import version_blobs
from dume.shared.trust import pki
from dume.shared.trust.audit import verify_chain
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

from conftest import write_domain_text
from tcp_proxy import TcpProxy

SETTINGS = MergeSettings(sequence_length=64)
CHUNK = 8 * 1024
PACED = ("--chunk-kib", "8", "--max-rate-kib", "32")  # a ~0.15 MB model: about 5 s of upload
STALL_SECONDS = 3
STATISTICS = pb.UPLOAD_KIND_STATISTICS


@pytest.fixture(scope="module")
def experts(expert_factory):
    return expert_factory("llama")


@pytest.fixture
def federation(tmp_path):
    """A coordinator on fixed free ports (a restarted daemon listens where its nodes expect it), serving; node
    output goes to logs/node-<name>.log, which the tests read while the nodes run."""
    fed = Federation(tmp_path / "federation")
    fed.init("--sequence-length", "64", fixed_ports=True)
    fed.serve()
    yield fed
    fed.close()


def staged_bytes(fed: Federation, kind: int = pb.UPLOAD_KIND_MODEL) -> int:
    """Bytes the daemon holds durably of open uploads of ``kind`` (complete blobs and partial ones)."""
    total = 0
    for upload in (fed.state / "uploads").iterdir():
        try:
            if pb.UploadPlan.FromString((upload / "plan.pb").read_bytes()).kind != kind:
                continue
            total += sum(path.stat().st_size for path in upload.iterdir() if path.name not in ("plan.pb", "member"))
        except FileNotFoundError:  # being created, renamed from .part to its hash, or committed, meanwhile
            pass
    return total


def model_bytes(spec) -> int:
    return sum(where.size for where in model_upload(spec.model_dir, spec.name).sources.values())


def via(proxy: TcpProxy, token: str) -> str:
    """The token with the member port replaced by the proxy's: the node then talks to the coordinator through it."""
    return replace(JoinToken.decode(token), coordinator=proxy.address).encode()


def logged(fed: Federation, label: str) -> str:
    path = fed.log(label)
    return path.read_text(errors="replace") if path.exists() else ""


def uploaded(fed: Federation, name: str, what: str) -> dict | None:
    """The node's own record of its first upload of ``what`` (transfers.jsonl): bytes of the upload and bytes
    actually sent; None before it completes."""
    return next((t for t in Workdir(fed.workdir(name)).transfers() if t["event"] == "upload" and t["what"] == what),
                None)


def upload_record(fed: Federation, name: str, what: str) -> dict:
    record = uploaded(fed, name, what)
    assert record is not None, f"{name} recorded no {what} upload"
    return record


@pytest.mark.scenario("link faults")
def test_cut_stalled_and_slowed_links_resume_and_give_the_merge_bytes(experts, federation, tmp_path, record):
    fed = federation
    proxy = TcpProxy(fed.address())
    faults = 0
    try:
        # A cut mid-upload: the node resumes from the durable offset the coordinator reports.
        # Both nodes follow the federation (no --once): the second's model moves the basis, and the first then
        # computes its statistics again.
        fed.join("math", experts["math"].model_dir, experts["math"].data_path, via(proxy, fed.token("math")),
                 *PACED)
        wait_until(lambda: staged_bytes(fed) >= 48 * 1024, 120, "math's upload to be under way")
        assert proxy.cut() >= 1
        faults += 1
        durable_at_cut = staged_bytes(fed)
        sent = wait_until(lambda: uploaded(fed, "math", "model"), 180, "math's model upload")
        assert "model upload interrupted (UNAVAILABLE" in logged(fed, "node-math")
        resent = sent["sent_bytes"] - sent["bytes"]
        # Only what was in flight at the cut goes again: a restart from zero would re-send every durable byte.
        assert 0 <= resent <= 4 * CHUNK < durable_at_cut, (resent, durable_at_cut)

        # A stall mid-upload: nothing errors on the wire, the node's progress deadline cancels the stream, and
        # it retries with backoff until the link forwards again.
        fed.join("code", experts["code"].model_dir, experts["code"].data_path, via(proxy, fed.token("code")),
                 *PACED, "--stall-timeout", f"{STALL_SECONDS}s")
        wait_until(lambda: staged_bytes(fed) >= 48 * 1024, 120, "code's upload to be under way")
        proxy.stall()
        faults += 1
        stalled_at = time.monotonic()
        wait_until(lambda: f"no progress for {STALL_SECONDS} s" in logged(fed, "node-code"), 60,
                   "the node to give up on the stalled stream")
        noticed = time.monotonic() - stalled_at
        assert STALL_SECONDS - 0.5 <= noticed <= STALL_SECONDS + 15, noticed
        wait_until(lambda: "retrying in 2s" in logged(fed, "node-code"), 120, "a second attempt, backed off")
        proxy.resume()
        wait_until(lambda: uploaded(fed, "code", "model"), 180, "code's model upload")
        said = logged(fed, "node-code")
        assert re.search(r"model upload interrupted \(DEADLINE_EXCEEDED: no progress for 3 s.*\); retrying in 1s",
                         said), said
        record.lost(["code", "math"], fed.wait_exact(["code", "math"]))
        reference = merge([experts["code"], experts["math"]], tmp_path / "reference", SETTINGS)
        assert not differing_files(fed.export(tmp_path / "exported"), reference)

        # A download through a slowed link, cut mid-stream: it resumes and writes the same bytes.
        workdir = Workdir(fed.workdir("code"))
        version = rpc.FederationStub(workdir.channel()).GetVersion(pb.VersionRequest(), timeout=60)
        wanted = {sha: size for sha, size in version_blobs(version).items()
                  if not workdir.blobs().has(sha) and workdir.own_blob(sha) is None}
        assert sum(wanted.values()) > 16 * 1024  # math's expert at least: seconds through the slowed link
        proxy.slow(8 * 1024)
        before = proxy.forwarded["down"]
        fetch = subprocess.Popen(command("node", "fetch", "--workdir", str(workdir.root), "--out",
                                         str(tmp_path / "fetched"), "--json", "--stall-timeout", "5s"),
                                 env=fed.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_until(lambda: proxy.forwarded["down"] > before + sum(wanted.values()) // 3, 120,
                   "the download to be under way")
        assert proxy.cut() >= 1
        faults += 1
        out, err = fetch.communicate(timeout=180)
        assert fetch.returncode == 0, err
        assert "interrupted" in err and "retrying in" in err
        fetched = json.loads(out)
        assert fetched["version"] == version.version and fetched["downloaded_blobs"] == len(wanted)
        assert fetched["downloaded_bytes"] == sum(wanted.values())  # whole messages only: nothing fetched twice
        assert not differing_files(tmp_path / "fetched", reference)
    finally:
        proxy.close()
        record.count("faults injected", faults)
    print(f"link faults injected: {faults} (2 cuts, 1 stall); re-sent after the cut: "
          f"{resent} of {sent['bytes']} bytes, {durable_at_cut} were durable; stall noticed after {noticed:.1f} s")


# -- SIGKILL of the coordinator and of a node -------------------------------------------------------------------
def connected_to(port: int) -> bool:
    """Whether some local TCP connection to ``port`` is established (the kernel completes the handshake for a
    listening socket even while its process is frozen)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def enrolment_port(fed: Federation) -> int:
    return int(json.loads((fed.state / "daemon.json").read_text())["enrolment"].rsplit(":", 1)[1])


def audit_entries(fed: Federation) -> list[tuple[str, str, dict]]:
    """(kind, subject, detail) of every audit entry, read over the admin channel in this process."""
    admin, _ = admin_stubs(StateDir(fed.state))
    return [(e.kind, e.subject, json.loads(e.detail_json)) for e in admin.Audit(pb.AuditRequest()).entries]


def member_state(fed: Federation, name: str) -> dict | None:
    return next((m for m in fed.status()["members"] if m["name"] == name), None)


def assert_contributed_once(fed: Federation, name: str) -> None:
    """One enrolment, one model upload and one statistics upload per basis in the audit log; one ledger row."""
    entries = [(kind, detail) for kind, subject, detail in audit_entries(fed) if subject == name]
    assert [kind for kind, _ in entries].count("enrol") == 1
    models = [d for kind, d in entries if kind == "upload" and d["what"] == "model"]
    assert len(models) == 1, models
    bases = [d["basis_hash"] for kind, d in entries if kind == "upload" and d["what"] == "statistics"]
    assert len(bases) == len(set(bases)) >= 1, bases
    assert [m["name"] for m in fed.status()["members"]].count(name) == 1


@pytest.mark.scenario("processes killed")
def test_the_coordinator_killed_during_enrolment_and_mid_statistics_upload_loses_nothing(
        experts, federation, tmp_path, record):
    fed, spec = federation, experts["math"]
    proxy = TcpProxy(fed.address())
    token = via(proxy, fed.token("math"))
    try:
        # Enrolment: the node has connected to a frozen coordinator, which is then killed.
        fed.processes["coordinator"].send_signal(signal.SIGSTOP)
        node = fed.join("math", spec.model_dir, spec.data_path, token, "--once")
        wait_until(lambda: connected_to(enrolment_port(fed)), 120, "the node to connect for its enrolment")
        assert fed.stop(signum=signal.SIGKILL) == -signal.SIGKILL
        record.count("faults injected")
        assert node.wait(timeout=60) == 4  # exit code 4: the coordinator is unreachable
        assert "cannot reach the coordinator's enrolment service" in logged(fed, "node-math").splitlines()[-1]
        fed.serve()
        assert member_state(fed, "math") is None  # nothing half-done: no member, and the token is still good

        # Mid-upload of statistics: the link is slowed once the model is in, and the coordinator is killed while
        # the statistics arrive.
        node = fed.join("math", spec.model_dir, spec.data_path, token, "--once", *PACED)
        wait_until(lambda: staged_bytes(fed) >= 0.9 * model_bytes(spec), 120, "math's model upload")
        proxy.slow(1024)  # from the model's last bytes on, so that the statistics (~9 KB) come slowly
        wait_until(lambda: staged_bytes(fed, STATISTICS) >= 2048, 120, "math's statistics upload to be under way")
        assert fed.stop(signum=signal.SIGKILL) == -signal.SIGKILL
        record.count("faults injected")
        durable = staged_bytes(fed, STATISTICS)
        # As if the kill came after each complete blob's last fsync and before its rename (seen once by chance):
        # the restarted daemon must verify and name the full staging files itself.
        for blob in (fed.state / "uploads").glob("*/" + "[0-9a-f]" * 64):
            blob.rename(blob.with_name(blob.name + ".part"))
        assert list((fed.state / "uploads").glob("*/*.part"))
        fed.serve()
        proxy.resume()
        assert node.wait(timeout=180) == 0, logged(fed, "node-math")
        assert "statistics upload interrupted" in logged(fed, "node-math")
        sent = upload_record(fed, "math", "statistics")
        # Sent again: at most what was not durable at the kill (the slowed link had taken every byte already).
        assert 0 < sent["sent_bytes"] - sent["bytes"] <= sent["bytes"] - durable
        record.lost(["math"], fed.wait_exact(["math"]))
        assert not differing_files(fed.export(tmp_path / "exported"), merge([spec], tmp_path / "reference", SETTINGS))
        assert_contributed_once(fed, "math")
        assert "intact" in fed.admin("audit", "--verify").stdout
    finally:
        proxy.close()
    print(f"coordinator SIGKILLs: 2; statistics re-sent {sent['sent_bytes'] - sent['bytes']} of "
          f"{sent['bytes']} bytes ({durable} were durable at the kill)")


@pytest.mark.scenario("processes killed")
def test_a_node_killed_at_each_stage_resumes_from_its_workdir_and_duplicates_nothing(experts, federation, tmp_path,
                                                                                    record):
    fed, spec = federation, experts["math"]
    proxy = TcpProxy(fed.address())
    token = via(proxy, fed.token("math"))
    rejoin = (spec.model_dir, spec.data_path)

    def join(*extra: str) -> subprocess.Popen:
        return fed._start("node-math", "node", "join", "--model", str(spec.model_dir), "--data",
                          str(spec.data_path), "--workdir", str(fed.workdir("math")), "--once", *PACED, *extra)

    def kill() -> None:
        assert fed.stop("node-math", signal.SIGKILL) == -signal.SIGKILL
        record.count("faults injected")

    try:
        # 1. Enrolment: killed while its enrolment call waits on a frozen coordinator.
        fed.processes["coordinator"].send_signal(signal.SIGSTOP)
        fed.join("math", *rejoin, token, "--once")
        wait_until(lambda: connected_to(enrolment_port(fed)), 120, "the node to connect for its enrolment")
        kill()
        fed.processes["coordinator"].send_signal(signal.SIGCONT)
        assert member_state(fed, "math") is None
        # 2. Model upload, mid-stream (the token is still unused: it enrols now).
        fed.join("math", *rejoin, token, "--once", *PACED)
        wait_until(lambda: staged_bytes(fed) >= 48 * 1024, 120, "the model upload to be under way")
        kill()
        durable = staged_bytes(fed)
        # 3. Statistics: killed once the model is in, before its statistics are (the link is slow, then held).
        join()
        wait_until(lambda: staged_bytes(fed) >= 0.9 * model_bytes(spec), 120, "math's model upload")
        proxy.slow(1024)
        wait_until(lambda: (member_state(fed, "math") or {}).get("state") == "active", 120, "math's model")
        proxy.stall()
        kill()
        proxy.resume()
        assert not member_state(fed, "math")["stats_current"]
        durable_model = durable
        # 4. Statistics upload, mid-stream through a slowed link.
        proxy.slow(1024)
        join()
        wait_until(lambda: staged_bytes(fed, STATISTICS) >= 2048, 120, "the statistics upload to be under way")
        kill()
        durable = staged_bytes(fed, STATISTICS)
        proxy.resume()
        # Then join again from the workdir: it completes, and nothing is there twice.
        assert join().wait(timeout=180) == 0, logged(fed, "node-math")
        model = upload_record(fed, "math", "model")
        assert model["sent_bytes"] <= model["bytes"] - durable_model + 4 * CHUNK  # resumed from the durable offset
        statistics = [t for t in Workdir(fed.workdir("math")).transfers()
                      if t["event"] == "upload" and t["what"] == "statistics"]
        assert len(statistics) == 1 and statistics[0]["sent_bytes"] <= statistics[0]["bytes"] - durable
        record.lost(["math"], fed.wait_exact(["math"]))
        assert not differing_files(fed.export(tmp_path / "exported"), merge([spec], tmp_path / "reference", SETTINGS))
        assert_contributed_once(fed, "math")
        # 5. Killed after the coordinator committed but before the node wrote that down (node.json says nothing
        # was acknowledged): joining again sends no byte and records nothing twice.
        Workdir(fed.workdir("math")).update(model_upload=None, uploaded={})
        assert join().wait(timeout=180) == 0, logged(fed, "node-math")
        again = [t for t in Workdir(fed.workdir("math")).transfers() if t["event"] == "upload"][-2:]
        assert [(t["what"], t["sent_bytes"]) for t in again] == [("model", 0), ("statistics", 0)]
        assert_contributed_once(fed, "math")
    finally:
        proxy.close()
    print(f"node SIGKILLs: 4, then a lost acknowledgment; model re-sent after the kill {model['sent_bytes']} of "
          f"{model['bytes']} bytes ({durable_model} durable), statistics {statistics[0]['sent_bytes']} of "
          f"{statistics[0]['bytes']} ({durable} durable)")


# -- SIGKILL of the coordinator at its failpoints -----------------------------------------------------------------
def serve_armed(fed: Federation, point: str | None) -> None:
    """(Re)starts the daemon with ``DUME_FAILPOINTS`` naming ``point`` (never the one it was just killed at), or
    with no failpoint at all."""
    fed.env.pop(failpoints.VARIABLE, None)
    if point:
        fed.env[failpoints.VARIABLE] = point
    fed.serve()
    assert (f"arms the test failpoints {point}" in logged(fed, "coordinator")) == bool(point)


def kill_at(fed: Federation, point: str, record) -> None:
    """Waits until the daemon stops at ``point``, SIGKILLs it there, and takes the marker away."""
    marker = fed.state / "failpoints" / point
    wait_until(marker.exists, 180, f"the coordinator to reach the failpoint {point} (see {fed.log('coordinator')})")
    assert fed.stop(signum=signal.SIGKILL) == -signal.SIGKILL
    record.count("faults injected")
    marker.unlink()


def contributions(fed: Federation) -> set[str]:
    return {f"{c['node']}/{c['dataset']}" for e in fed.status()["experts"] for c in e["contributions"]}


def acknowledged(fed: Federation, *nodes: str) -> set[str]:
    """The statistics each node wrote down as accepted (it does so only once the coordinator answered its commit)."""
    return {f"{node}/{dataset}" for node in nodes for dataset in Workdir(fed.workdir(node)).state().get("uploaded", {})}


def versions_hold_their_blobs(fed: Federation) -> int:
    """Checks that every published version names only blobs the store holds; returns how many versions there are."""
    _, stub = admin_stubs(StateDir(fed.state))
    latest = fed.status()["version"] or 0
    for number in range(1, latest + 1):
        version = stub.GetVersion(pb.VersionRequest(version=number), timeout=60)
        missing = [sha for sha in version_blobs(version) if not StateDir(fed.state).blobs.joinpath(
            sha[:2], sha).is_file()]
        assert not missing, f"version {number} names {len(missing)} missing blobs"
    return latest


@pytest.mark.scenario("processes killed")
def test_the_coordinator_killed_in_validation_solve_publication_and_revocation_loses_nothing(
        experts, tmp_path, record):
    """SIGKILL at four failpoints, the daemon restarted on the same state directory each time: what was
    acknowledged stays, nothing half-done shows, the nodes retry, and each exact version is `dume merge`'s bytes."""
    math = experts["math"]
    extra = write_domain_text(tmp_path / "math-b.txt", "math", documents=20, offset=200)
    fed = Federation(tmp_path / "federation")
    try:
        fed.init("--sequence-length", "64", fixed_ports=True)
        serve_armed(fed, "commit.validating_statistics")
        fed.join("math", math.model_dir, math.data_path, fed.token("math"), "--once")
        wait_until(lambda: member_state(fed, "math"), 60, "math enrolled")
        admin, _ = admin_stubs(StateDir(fed.state))
        helper = admin.CreateToken(pb.TokenRequest(node="math2", ttl_seconds=3600, expert="math")).token
        fed.join("math2", None, f"b={extra}", helper, "--once")
        wait_until(lambda: member_state(fed, "math2"), 60, "math2 enrolled")  # a kill now is not one in enrolment

        # 1. A statistics commit killed mid-validation: nothing of it is recorded; the node commits it again.
        kill_at(fed, "commit.validating_statistics", record)
        serve_armed(fed, "publication.solving")
        assert not fed.status()["version"] and acknowledged(fed, "math", "math2") <= contributions(fed)
        # 2. Killed while the routers of the first version are solved: the statistics acknowledged stay.
        kill_at(fed, "publication.solving", record)
        blobs_before = sum(1 for _ in StateDir(fed.state).blobs.glob("??/*"))
        serve_armed(fed, "publication.before_version_row")
        assert not fed.status()["version"] and acknowledged(fed, "math", "math2") <= contributions(fed)
        assert contributions(fed)  # the solve ran: a commit had come first
        # 3. Killed once the version's blobs are written and before its row: no version; the restart publishes it.
        kill_at(fed, "publication.before_version_row", record)
        assert sum(1 for _ in StateDir(fed.state).blobs.glob("??/*")) > blobs_before  # written, named by no row
        serve_armed(fed, "revocation.before_publication")
        record.lost(["math", "math2"], fed.wait_exact(["math", "math2"], contributions=["math/default", "math2/b"]))
        assert fed.exited("node-math", 180) == 0 and fed.exited("node-math2", 180) == 0
        both = ExpertSpec("math", math.model_dir, datasets=(DatasetSpec("default", math.data_path),
                                                             DatasetSpec("b", extra, "math2")))
        assert not differing_files(fed.export(tmp_path / "exported-both"),
                                   merge([both], tmp_path / "reference-both", SETTINGS))
        assert_contributed_once(fed, "math")

        # 4. A revocation killed after its ledger row, before the version without the member: the admin was not
        # answered, and the revocation is in force in full after the restart.
        revoking = admin.Revoke.future(pb.RevokeRequest(node="math2", reason="consent withdrawn"))
        kill_at(fed, "revocation.before_publication", record)
        assert revoking.exception(timeout=60).code() == grpc.StatusCode.UNAVAILABLE
        serve_armed(fed, None)
        record.lost(["math"], fed.wait_exact(["math"], contributions=["math/default"]))
        assert member_state(fed, "math2")["state"] == "revoked"
        entries = audit_entries(fed)
        revoked_at = next(i for i, (kind, subject, _) in enumerate(entries) if (kind, subject) == ("revoke", "math2"))
        after = [detail for kind, _, detail in entries[revoked_at:] if kind == "publish"]
        assert after and all("math2" not in d["members"] and "math2/b" not in d["contributions"] for d in after)
        assert not differing_files(fed.export(tmp_path / "exported-revoked"),
                                   merge([math], tmp_path / "reference-revoked", SETTINGS))
        versions = versions_hold_their_blobs(fed)
        assert verify_chain(messages.audit_entry(entry) for entry in admin.Audit(pb.AuditRequest()).entries)
    finally:
        fed.close()
    print(f"coordinator SIGKILLs at 4 failpoints; {versions} versions published, each naming only blobs held")


@pytest.mark.scenario("processes killed")
def test_a_node_whose_enrolment_answer_died_with_the_coordinator_enrols_with_its_spent_token(
        experts, federation, tmp_path, record):
    """The coordinator spends the token and is killed before its answer leaves: the node, retrying with the key it
    kept on disk, gets its certificate from the restarted daemon and contributes once, with the one token."""
    fed, spec = federation, experts["math"]
    token = fed.token("math")
    assert fed.stop() == 0
    serve_armed(fed, "enrolment.answering")
    node = fed.join("math", spec.model_dir, spec.data_path, token, "--once")
    kill_at(fed, "enrolment.answering", record)
    serve_armed(fed, None)
    assert node.wait(timeout=180) == 0, logged(fed, "node-math")
    assert "cannot enrol (UNAVAILABLE" in logged(fed, "node-math")  # it waited for the daemon, then asked again
    certificate = (Workdir(fed.workdir("math")).identity / "cert.pem").read_bytes()
    assert [d["serial"] for kind, _, d in audit_entries(fed) if kind == "enrol"] == [
        str(pki.identity_of(certificate).serial)]  # the certificate issued before the kill
    record.lost(["math"], fed.wait_exact(["math"]))
    assert_contributed_once(fed, "math")


def test_failpoints_are_inert_unless_named_and_unknown_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.VARIABLE, raising=False)
    assert failpoints.arm(tmp_path) == []
    failpoints.failpoint("publication.solving")  # not armed: returns at once, leaves no marker
    assert not (tmp_path / "failpoints").exists()
    monkeypatch.setenv(failpoints.VARIABLE, "publication.solving, publication.typo")
    with pytest.raises(DumeError, match="unknown failpoints publication.typo; known: enrolment.answering, "):
        failpoints.arm(tmp_path)
