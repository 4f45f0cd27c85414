"""Load: 32 members, each a separate `dume-node join` process with its own identity, join at once and contribute.

Marked ``load`` (33 processes: about 2 minutes and 12 GB of RAM on 2 cores); run it alone with
``python -m pytest -m load tests/test_load.py -s``, or skip it with ``-m 'not load'``. It prints the latency of
the admin ``Status`` call measured during the load, and checks that every contribution is in the ledger exactly
once and that the exact version is byte-identical to `dume merge` of the same 32 members.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.coordinator.cli import admin_stubs
from dume.coordinator.state_dir import StateDir
from dume.shared.lab.harness import FEDERATION_THREADS, Federation, differing_files, torch_threads
from dume.shared.lab.tiny import build_tiny_model, synthetic_documents
from dume.shared.method.merge import ExpertSpec, merge
from dume.shared.method.routers import MergeSettings
from dume.v1 import federation_pb2 as pb

MEMBERS = 32
SETTINGS = MergeSettings(sequence_length=64)
# The smallest llama the tiny builder makes sensibly: one layer, hidden size 16.
SMALLEST = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8}
CONVERGE_SECONDS = 1500.0


def mlp_expert(base: Path, out: Path, seed: int) -> Path:
    """A copy of ``base`` whose MLPs alone are nudged (as `dume-node train --trainable mlp` makes experts): the
    shared weights stay the base's, so joins never move the basis and each member computes statistics once."""
    shutil.copytree(base, out)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if ".mlp." in name:
            tensor.add_(0.5 * tensor.std() * torch.randn(tensor.shape, generator=generator))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def experts(root: Path) -> list[ExpertSpec]:
    base = build_tiny_model("llama", root / "base", **SMALLEST)
    domains = ("code", "math", "prose")
    specs = []
    for index in range(MEMBERS):
        name = f"member{index:02d}"
        data = root / f"{name}.txt"
        data.write_text("\n".join(synthetic_documents(domains[index % 3], 20, offset=20 * index)) + "\n")
        specs.append(ExpertSpec(name, mlp_expert(base, root / name, seed=index + 1), data))
    return specs


class StatusProbe:
    """Calls the admin Status every ``every`` seconds on a thread, recording each call's latency."""

    def __init__(self, state: Path, every: float = 0.5) -> None:
        self.admin, _ = admin_stubs(StateDir(state))
        self.every = every
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            started = time.perf_counter()
            try:
                self.admin.Status(pb.StatusRequest(), timeout=30)
                self.latencies.append(time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                self.failures.append(str(error))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        ordered = sorted(self.latencies)
        return {"calls": len(ordered), "failures": len(self.failures),
                "p50_ms": 1000 * statistics.median(ordered),
                "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                "max_ms": 1000 * ordered[-1]}


@pytest.mark.load
@pytest.mark.scenario("load")
def test_32_members_join_at_once_each_counted_once_and_the_exact_version_is_the_merge_bytes(tmp_path, record):
    started = time.monotonic()
    specs = experts(tmp_path / "experts")
    fed = Federation(tmp_path / "federation", threads=FEDERATION_THREADS)
    try:
        fed.init("--sequence-length", "64")
        fed.serve()
        tokens = {spec.name: fed.token(spec.name) for spec in specs}
        probe = StatusProbe(fed.state)
        for spec in specs:  # all at once; each follows the federation until stopped
            fed.join(spec.name, spec.model_dir, spec.data_path, tokens[spec.name])
        names = [spec.name for spec in specs]
        status = fed.wait_exact(names, timeout=CONVERGE_SECONDS)
        converged = time.monotonic() - started
        latency = probe.stop()
        record.lost(names, status)
        record.count("admin Status calls during the load", latency["calls"])
        record.count("admin Status p99 ms", round(latency["p99_ms"]))
        assert latency["failures"] == 0, probe.failures[:3]

        entries = [(e.kind, e.subject, json.loads(e.detail_json))
                   for e in admin_stubs(StateDir(fed.state))[0].Audit(pb.AuditRequest()).entries]
        for name in names:
            mine = [(kind, detail) for kind, subject, detail in entries if subject == name]
            assert [kind for kind, _ in mine].count("enrol") == 1, name
            assert len([d for kind, d in mine if kind == "upload" and d["what"] == "model"]) == 1, name
            bases = [d["basis_hash"] for kind, d in mine if kind == "upload" and d["what"] == "statistics"]
            assert len(bases) == len(set(bases)) >= 1, name
        assert sorted(m["name"] for m in status["members"]) == names

        with torch_threads(FEDERATION_THREADS):
            reference = merge(specs, tmp_path / "reference", SETTINGS)
        assert not differing_files(fed.export(tmp_path / "exported"), reference)
        exits = fed.stop_all()
        assert all(code == 0 for label, code in exits.items()), exits
    finally:
        fed.close()
    print(f"\n{MEMBERS} members: exact version {status['version']} after {converged:.0f} s; admin Status during the "
          f"load: {latency['calls']} calls, p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, "
          f"max {latency['max_ms']:.1f} ms, {latency['failures']} failures; "
          f"whole test {time.monotonic() - started:.0f} s")
