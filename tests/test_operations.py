"""Operating the daemon and the node agent with real processes: the state-directory lock, SIGTERM, the gRPC
health service, Prometheus metrics, backup and restore, ``dume-node status`` and ``join --once --deadline``.

Commands that need no process of their own (init, health, backup, restore, status) run through the real parsers
in this process: each `python -m dume...` costs seconds of importing torch on a 2-core machine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dume.coordinator import cli as coordinator_cli
from dume.coordinator.ledger import Ledger
from dume.coordinator.state_dir import StateDir
from dume.node import cli as node_cli
from dume.node.agent import described, model_upload
from dume.shared.errors import DumeError
from dume.shared.lab.harness import COORDINATOR, Federation, cli, command, differing_files, free_port, wait_until
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.channels import server_tls_channel
from dume.shared.transport.download import fetch_version
from dume.shared.transport.wire import safetensors_ranges

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SLOW_UPLOAD = ("--chunk-kib", "8", "--max-rate-kib", "48")  # a ~0.15 MB model: about 3 s of upload


def initialised(root: Path, *settings: str) -> Federation:
    fed = Federation(root, pipe_nodes=True)
    assert coordinator_cli.main(["init", "--state", str(fed.state), "--listen", "127.0.0.1:0",
                                 "--enrolment-listen", "127.0.0.1:0", *settings]) == 0
    return fed


def health_watch(state: Path):
    """A stock health client's Watch stream on the members port, with the admin identity."""
    channel = coordinator_cli.admin_channel(StateDir(state))
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)


def test_one_daemon_per_state_directory_survives_sigkill_reports_health_and_drains_on_sigterm(tmp_path, capsys):
    fed = initialised(tmp_path)
    try:
        capsys.readouterr()
        fed.serve()
        first = fed.processes[COORDINATOR]
        second = cli(COORDINATOR, "serve", "--state", str(fed.state), check=False)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"dume-coordinator: error: another coordinator (pid {first.pid}) is serving "
                                         f"{fed.state}: stop it first, or serve another --state")
        assert json.loads((fed.state / "daemon.json").read_text())["pid"] == first.pid  # untouched by the refusal

        # Nothing else may bind the daemon's port, not even a grpc server asking to share it (grpc's default).
        probe = grpc.server(futures.ThreadPoolExecutor(1))
        try:
            assert probe.add_insecure_port(fed.address()) == 0
        except RuntimeError:
            pass

        assert fed.stop(signum=signal.SIGKILL) == -signal.SIGKILL  # the kernel drops the lock with the process
        fed.serve("--drain-seconds", "2")
        watch = health_watch(fed.state)
        wait_until(lambda: next(watch).status == SERVING, 60, "the daemon to report SERVING")
        assert coordinator_cli.main(["health", "--state", str(fed.state)]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        enrolment = json.loads((fed.state / "daemon.json").read_text())["enrolment"]
        ca = (fed.state / "ca" / "cert.pem").read_bytes()
        check = health_pb2_grpc.HealthStub(server_tls_channel(enrolment, ca)).Check(
            health_pb2.HealthCheckRequest(service="dume.v1.Enrolment"), timeout=30)
        assert check.status == SERVING

        fed.processes[COORDINATOR].send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # told at once, before the listeners close
        assert fed.exited(COORDINATOR) == 0
        assert "draining" in fed.log(COORDINATOR).read_text()
        assert not (fed.state / "daemon.json").exists()
        with pytest.raises(DumeError, match="no coordinator daemon is running"):
            coordinator_cli.admin_channel(StateDir(fed.state))
    finally:
        fed.close()


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the daemon's real /metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def export_latest(state: Path, out: Path) -> Path:
    _, federation = coordinator_cli.admin_stubs(StateDir(state))
    fetch_version(federation, 0, BlobStore(out.parent / f"{out.name}-cache"), out)
    return out


def test_sigterm_mid_upload_then_metrics_status_backup_restore_and_the_join_deadline(expert_factory, tmp_path,
                                                                                      capsys):
    spec = expert_factory("llama")["math"]
    fed = initialised(tmp_path / "original", "--sequence-length", "64")
    restored = Federation(tmp_path / "restored")
    metrics = f"127.0.0.1:{free_port()}"
    uploads = fed.state / "uploads"
    rejoin = command("node", "join", "--model", str(spec.model_dir), "--data", str(spec.data_path),
                     "--workdir", str(fed.workdir("math")))
    capsys.readouterr()
    try:
        fed.serve("--drain-seconds", "2")
        node = fed.join("math", spec.model_dir, spec.data_path, fed.token("math"), *SLOW_UPLOAD)
        wait_until(lambda: staged_bytes(uploads) > 16384, 90, "the upload to be under way")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
        assert "stopped on SIGTERM; run `dume-node join` again" in node.stderr.read()

        # The node resumes; the daemon is stopped mid-upload: it drains, exits 0, and the upload survives it.
        resumed = subprocess.Popen([*rejoin, "--once", *SLOW_UPLOAD], env=fed.env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        held = staged_bytes(uploads)
        wait_until(lambda: staged_bytes(uploads) > held + 16384, 90, "the resumed upload to be under way")
        assert fed.stop() == 0
        assert resumed.poll() is None  # still trying to reach the coordinator
        fed.serve("--metrics-listen", metrics)
        assert resumed.wait(timeout=180) == 0
        log = resumed.stderr.read()
        assert "model upload interrupted" in log and "contribution complete" in log
        status = fed.wait_exact(["math"])

        refused = coordinator_cli.main(["token", "--state", str(fed.state), "--node", "admin"])
        assert refused == 3 and "reserved" in capsys.readouterr().err
        samples = scrape(metrics)
        model_bytes = sum(where.size for where in model_upload(spec.model_dir, "math").sources.values())
        statistics_file = next((fed.workdir("math") / "statistics").glob("*.safetensors"))
        statistics_bytes = sum(where.size for where in described(safetensors_ranges(statistics_file))[1].values())
        assert samples[("dume_members", (("state", "active"),))] == 1
        assert samples[("dume_members", (("state", "revoked"),))] == 0
        assert samples[("dume_uploads_total", (("kind", "model"),))] == 1  # committed after the restart
        assert samples[("dume_uploads_total", (("kind", "statistics"),))] == 1
        assert samples[("dume_upload_bytes_total", (("kind", "model"),))] == model_bytes
        assert samples[("dume_upload_bytes_total", (("kind", "statistics"),))] == statistics_bytes
        assert samples[("dume_transfer_seconds_count", (("direction", "upload"),))] >= 2
        assert samples[("dume_statistics_validation_seconds_count", ())] == 1
        assert samples[("dume_solve_seconds_count", ())] >= 1
        assert samples[("dume_latest_version", ())] == status["version"]
        assert samples[("dume_versions_published_total", (("exact", "true"),))] >= 1
        assert samples[("dume_refusals_total", (("method", "CreateToken"), ("reason", "invalid_argument")))] == 1

        assert node_cli.main(["status", "--workdir", str(fed.workdir("math")), "--json"]) == 0
        mine = json.loads(capsys.readouterr().out)
        tokens = next(member["token_count"] for member in status["members"] if member["name"] == "math")
        assert mine["model_uploaded"] and mine["datasets"]["default"]["tokens"] == tokens > 0
        assert mine["datasets"]["default"]["basis"] == status["basis_hash"]
        assert mine["federation"] == {"reachable": True, "version": status["version"], "exact": True,
                                      "basis_hash": status["basis_hash"], "in_basis": True,
                                      "statistics_current": True, "in_version": True}
        assert node_cli.main(["status", "--workdir", str(fed.workdir("math"))]) == 0
        said = capsys.readouterr().out
        assert f"dataset default: {tokens} tokens under basis {status['basis_hash'][:12]}" in said
        assert f"version {status['version']} (exact) includes this node; this node's statistics are current" in said

        archive = tmp_path / "backup.tar"
        assert coordinator_cli.main(["backup", "--state", str(fed.state), "--out", str(archive)]) == 0
        assert coordinator_cli.main(["restore", "--from", str(archive), "--state", str(restored.state),
                                     "--listen", "127.0.0.1:0", "--enrolment-listen", "127.0.0.1:0"]) == 0
        said = capsys.readouterr().out
        assert f"backed up {fed.state} to {archive}" in said and f"restored {archive} into {restored.state}" in said
        restored.serve()
        assert not differing_files(export_latest(fed.state, tmp_path / "original-export"),
                                   export_latest(restored.state, tmp_path / "restored-export"))
        assert restored.status()["version"] == status["version"]

        assert fed.stop() == 0
        assert node_cli.main(["status", "--workdir", str(fed.workdir("math")), "--json"]) == 0
        down = json.loads(capsys.readouterr().out.splitlines()[-1])["federation"]
        assert down["reachable"] is False and down["error"].startswith("UNAVAILABLE")
        gave_up = subprocess.run([*rejoin, "--once", "--deadline", "3s"], env=fed.env, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=120)
        assert gave_up.returncode == 4  # exit code 4: the coordinator is unreachable
        last = gave_up.stderr.strip().splitlines()[-1]
        assert re.match(r"dume-node: error: gave up after [345] s: the coordinator at \S+ kept failing \(UNAVAILABLE",
                        last), last
    finally:
        fed.close()
        restored.close()


def staged_bytes(uploads: Path) -> int:
    """Bytes the daemon holds of uploads in progress (complete blobs and partial ones)."""
    total = 0
    for path in uploads.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # renamed from .part to its hash meanwhile
            pass
    return total


def test_backup_and_restore_refuse_what_they_cannot_do_and_leave_nothing_behind(tmp_path, capsys):
    fed = initialised(tmp_path / "original")
    Ledger(fed.state / "ledger.sqlite").close()  # the ledger as `serve` creates it, without starting a daemon
    archive = tmp_path / "backup.tar"

    def refused(*args: str) -> str:
        assert coordinator_cli.main(list(args)) == 2
        return capsys.readouterr().err.strip()

    assert coordinator_cli.main(["backup", "--state", str(fed.state), "--out", str(archive)]) == 0
    assert refused("backup", "--state", str(fed.state), "--out", str(archive)) == (
        f"dume-coordinator: error: {archive} exists: choose a new --out file (a backup never overwrites one)")
    occupied = tmp_path / "occupied"
    (occupied / "something").mkdir(parents=True)
    assert "is not empty: restore into a new --state directory" in refused(
        "restore", "--from", str(archive), "--state", str(occupied))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:700])
    assert "is not a readable coordinator backup" in refused("restore", "--from", str(truncated), "--state",
                                                             str(tmp_path / "new"))
    assert "is not HOST:PORT" in refused("restore", "--from", str(archive), "--state", str(tmp_path / "new"),
                                         "--listen", "nowhere")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backup.tar", "occupied", "original", "truncated.tar"]
    assert coordinator_cli.main(["restore", "--from", str(archive), "--state", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "ca" / "key.pem").read_bytes() == (fed.state / "ca" / "key.pem").read_bytes()
    assert (tmp_path / "new" / "ca" / "key.pem").stat().st_mode & 0o077 == 0
