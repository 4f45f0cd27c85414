"""The built-in domains are deterministic and disjoint between train and test; a learnt BPE tokenizer round-trips
text and sizes the model it is built with; MLP-only fine-tuning leaves every shared weight as the base's."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from dume.shared.lab.domains import DEMO_DOMAINS, DOMAINS, HELD_OUT_EVERY, write_domain
from dume.shared.lab.tiny import build_tiny_model, trained_tokenizer
from dume.shared.method.families import LLAMA

from conftest import write_domain_text

NODE = "import sys; from dume.node.cli import main; sys.exit(main())"


def lines(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_domains_split_deterministically_by_document(tmp_path):
    assert set(DEMO_DOMAINS) < set(DOMAINS) and len(DOMAINS) >= 4
    for name in DOMAINS:
        train, test = write_domain(name, tmp_path / "a")
        again_train, again_test = write_domain(name, tmp_path / "b")
        assert train.read_bytes() == again_train.read_bytes() and test.read_bytes() == again_test.read_bytes()
        train_documents, test_documents = lines(train), lines(test)
        assert len(test_documents) == -(-(len(train_documents) + len(test_documents)) // HELD_OUT_EVERY)
        assert not set(train_documents) & set(test_documents), f"{name}: a held-out document is also trained on"


def test_code_domain_holds_no_docstrings():
    code = "\n".join(DOMAINS["code"]())
    assert '"""' not in code and "def " in code


def test_trained_tokenizer_round_trips_and_sizes_the_model(tmp_path):
    documents = [document for name in DOMAINS for document in DOMAINS[name]()[:200]]
    tokenizer = trained_tokenizer(documents, 600)
    assert len(tokenizer) == 600
    text = "def parse(x):\n    return x  # Ünïcode too"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(documents[0])["input_ids"]) < 0.75 * len(documents[0].encode())
    model_dir = build_tiny_model("llama", tmp_path / "model", tokenizer=tokenizer)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == 600
    assert (config["pad_token_id"], config["eos_token_id"]) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_mlp_only_training_changes_only_the_mlps(expert_factory, tmp_path):
    base = expert_factory("llama")["code"].model_dir
    data = write_domain_text(tmp_path / "math.txt", "math", documents=40)
    out = tmp_path / "expert"
    result = subprocess.run([sys.executable, "-c", NODE, "train", "--base", str(base), "--data", str(data),
                             "--out", str(out), "--steps", "5", "--sequence-length", "64", "--trainable", "mlp"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (LLAMA.mlp_location(name) is None), f"{name} {'unchanged' if same else 'changed'}"
