"""A node's fine-tuning makes a better expert on its domain, and the demo runs a real federation end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dume.shared.method.data import load_tokenizer, pack_documents, read_documents
from dume.shared.method.evaluation import perplexity
from dume.shared.method.expert import ExpertDirectory, load_dense_model

from conftest import write_domain_text

NODE = "import sys; from dume.node.cli import main; sys.exit(main())"
DUME = "import sys; from dume.shared.cli import main; sys.exit(main())"


def test_node_train_lowers_perplexity_on_its_domain(expert_factory, tmp_path):
    base = expert_factory("llama")["code"].model_dir
    data = write_domain_text(tmp_path / "math.txt", "math", documents=40)
    out = tmp_path / "expert"
    result = subprocess.run([sys.executable, "-c", NODE, "train", "--base", str(base), "--data", str(data),
                             "--out", str(out), "--steps", "30", "--sequence-length", "64"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    held_out = pack_documents(read_documents(write_domain_text(tmp_path / "test.txt", "math", 10, offset=40)),
                              load_tokenizer(base), 64)
    before = perplexity(load_dense_model(ExpertDirectory(base)), held_out)
    after = perplexity(load_dense_model(ExpertDirectory(out)), held_out)
    assert after < 0.75 * before  # the default fine-tunes the MLPs only


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes (other than this one) that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue  # it exited meanwhile
        if text in command and "\nState:\tZ" not in status:
            found.append(f"{entry.name}: {command}")
    return found


def test_demo_prints_a_perplexity_table(tmp_path):
    """The demo runs a real loopback federation, matches local merges byte for byte and leaves nothing running."""
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-c", DUME, "demo", "--workdir", str(workdir),
                             "--base-steps", "4", "--expert-steps", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "held-out perplexity" in result.stdout and "dume retention" in result.stdout
    assert "after-revoke retention" in result.stdout
    results = json.loads((workdir / "results.json").read_text())
    table = results["perplexity"]
    assert set(table) == {"base", "expert:code", "expert:math", "expert:prose", "weight-average", "dume",
                          "dume-after-revoke"}
    assert all(set(row) == {"code", "math", "prose"} for row in table.values())
    assert results["byte_identical"] == {"all": True, "after_revoke": True, "second_node": True}
    assert results["exit_codes"]["coordinator"] == 0
    assert results["exit_codes"]["node-prose"] != 0  # refused once revoked
    for name in ("code", "math", "prose"):
        uploads = [event["what"] for event in results["transfers"][name] if event["event"] == "upload"]
        assert uploads[0] == "model" and "statistics" in uploads
    assert {event["what"] for event in results["transfers"]["math-lab2"] if event["event"] == "upload"} == {
        "statistics"}  # a contributor sends no weights
    assert processes_mentioning(str(workdir)) == []
