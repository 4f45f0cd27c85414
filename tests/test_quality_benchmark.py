"""The quality benchmark runs end to end at its tiny size and its numbers hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"

pytestmark = pytest.mark.slow  # about 5 minutes on 2 cores: its own group (README, .ci/run)


def test_tiny_quality_benchmark_writes_consistent_results(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARK), "--config", "tiny", "--workdir", str(tmp_path / "work"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "quality-tiny.json").read_text())
    ppl, domains = results["perplexity"], sorted(results["domains"])
    assert len(domains) == 4
    for label in ("base", "weight-average", "random", "oracle", "dume", "dume:intercept", "dume:k2", "dume:stats-1%",
                  "dume:stats-10%", "dynamic:three", "btx:random", "btx:dume"):
        assert sorted(ppl[label]) == domains, label
    for name in domains:
        # MLP-only experts share the base's other weights, so oracle routing is each expert itself...
        assert abs(ppl["oracle"][name] / ppl[f"expert:{name}"][name] - 1) < 1e-4
        # ...and the federated checkpoint (stock Mixtral classes) agrees with the library's own forward.
        assert abs(ppl["dume"][name] / ppl["dume:local"][name] - 1) < 1e-3
    assert results["federated_byte_identical_to_merge"] is True
    dume = results["retention"]["dume"]
    assert dume["min"] == min(dume[name] for name in domains)
    assert abs(dume["mean"] - sum(ppl[f"expert:{n}"][n] / ppl["dume"][n] for n in domains) / 4) < 1e-4
    assert [v["exact"] for v in results["dynamic_addition"]["versions"]][-1] is True
    assert len(results["routing_accuracy"]["dume:local"]["code"]) == results["config"]["layers"]
    assert "dynamic:provisional" in results["full_finetuning"]["perplexity"]
    assert "| dume |" in (tmp_path / "out" / "quality-tiny.md").read_text()
    assert (tmp_path / "out" / "quality-tiny.png").read_bytes().startswith(b"\x89PNG")

    rerun = subprocess.run([sys.executable, str(BENCHMARK), "--config", "tiny", "--workdir", str(tmp_path / "work"),
                            "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "base: cached" in rerun.stdout and "expert code (mlp): cached" in rerun.stdout
    assert json.loads((tmp_path / "again" / "quality-tiny.json").read_text())["perplexity"]["dume"] == ppl["dume"]
