"""A node's fine-tuning makes a better expert on its domain, and the demo runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

from dume.shared.data import load_tokenizer, pack_documents, read_documents
from dume.shared.evaluation import perplexity
from dume.shared.expert import ExpertDirectory, load_dense_model

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
    assert after < 0.5 * before


def test_demo_prints_a_perplexity_table(tmp_path):
    result = subprocess.run([sys.executable, "-c", DUME, "demo", "--workdir", str(tmp_path / "demo"),
                             "--base-steps", "4", "--expert-steps", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "dume retention" in result.stdout
    table = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(table) == {"base", "expert:code", "expert:math", "expert:prose", "dume", "weight-average"}
    assert all(set(row) == {"code", "math", "prose"} for row in table.values())
