"""The merged checkpoint (model and tokenizer) loads right in transformers 4.x too, and from experts whose
config 4.x wrote.

transformers 4.57 is installed with --no-deps into a folder cached under pytest's cache directory and run in a
subprocess that reuses this environment's torch: no second torch, about 10 s the first time, then nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dume.shared.errors import DumeError
from dume.shared.lab.tiny import build_tiny_model, perturb_mlps
from dume.shared.method.families import check_same_architecture
from dume.shared.method.merge import ExpertSpec, merge
from dume.shared.method.routers import MergeSettings

from conftest import DOMAINS, write_domain_text

TRANSFORMERS_4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2", "requests",
                  "urllib3<3", "idna", "charset_normalizer", "certifi")
TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
# A base far from every class default (Llama/Qwen3 10000, Mixtral 1e6), so a reader that misses it shows.
ROPE_CASES = {
    "llama-theta": ("llama", {"rope_type": "default", "rope_theta": 500.0}),
    "llama-llama3-scaling": ("llama", {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}),
    "qwen3-theta": ("qwen3", {"rope_type": "default", "rope_theta": 500.0}),
}
TEXT = "def f(x):\n    return 3 * x  # héllo"
LOAD_AND_RUN = f"""
TEXT = {TEXT!r}
import sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from transformers import AutoModelForCausalLM, AutoTokenizer
tokens = torch.load(sys.argv[1])
for model_dir in sys.argv[2:]:
    torch.save(AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"], model_dir + "/ids-4.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(tokens).logits, model_dir + "/logits-4.pt")
"""


@pytest.fixture(scope="module")
def transformers_4(request) -> Path:
    """A folder holding transformers 4.57 and the 4.x-compatible hub libraries (installed once, then cached)."""
    folder = Path(request.config.cache.mkdir("transformers-4.57.6"))
    if not (folder / "transformers").is_dir():
        install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                                  "--target", str(folder), *TRANSFORMERS_4], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"transformers 4.57.6 could not be installed from the package index: {install.stderr[-300:]}")
    return folder


def merged_model(root: Path, family: str, rope: dict, classic_expert_config: bool = False) -> Path:
    """Three tiny experts of one base with the RoPE settings ``rope``, merged; their configs optionally rewritten
    in transformers 4.x's spelling (rope_theta, rope_scaling, torch_dtype) as Hub checkpoints have them."""
    base = build_tiny_model(family, root / "base", rope_parameters=rope)
    specs = []
    for seed, name in enumerate(sorted(DOMAINS), start=1):
        expert = perturb_mlps(base, root / name, seed=seed, scale=0.5)
        if classic_expert_config:
            config = json.loads((expert / "config.json").read_text())
            parameters = config.pop("rope_parameters")
            config["rope_theta"] = parameters.pop("rope_theta")
            config["rope_scaling"] = None if parameters["rope_type"] == "default" else parameters
            config["torch_dtype"] = config.pop("dtype")
            (expert / "config.json").write_text(json.dumps(config))
        specs.append(ExpertSpec(name, expert, write_domain_text(root / f"{name}.txt", name)))
    return merge(specs, root / "merged", MergeSettings(sequence_length=64))


def logits_5(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_transformers_4_computes_the_same_logits_as_transformers_5(transformers_4, tmp_path):
    merged = {case: merged_model(tmp_path / case, family, rope) for case, (family, rope) in ROPE_CASES.items()}
    torch.save(TOKENS, tmp_path / "tokens.pt")
    environment = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(transformers_4)}
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "tokens.pt"),
                          *(str(path) for path in merged.values())],
                         env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for case, model_dir in merged.items():
        old = torch.load(model_dir / "logits-4.pt")
        torch.testing.assert_close(old, logits_5(model_dir), rtol=1e-5, atol=1e-5, msg=f"{case}: 4.x differs")
        assert torch.load(model_dir / "ids-4.pt") == AutoTokenizer.from_pretrained(str(model_dir))(TEXT)["input_ids"]


def test_experts_with_transformers_4_configs_merge_to_the_same_model(tmp_path):
    """Hub checkpoints spell RoPE as rope_theta/rope_scaling: the merged model must keep their base, not drop it."""
    for case in ("llama-theta", "llama-llama3-scaling"):
        family, rope = ROPE_CASES[case]
        modern = merged_model(tmp_path / case / "modern", family, rope)
        classic = merged_model(tmp_path / case / "classic", family, rope, classic_expert_config=True)
        modern_config = json.loads((modern / "config.json").read_text())
        classic_config = json.loads((classic / "config.json").read_text())
        for key in ("rope_parameters", "rope_theta", "rope_scaling", "dtype", "torch_dtype"):
            assert classic_config[key] == modern_config[key], key
        assert modern_config["rope_theta"] == 500.0
        assert modern_config["torch_dtype"] == modern_config["dtype"] == "float32"
        torch.testing.assert_close(logits_5(classic), logits_5(modern), rtol=0, atol=0)


def test_experts_are_compared_by_their_rope_settings_whichever_spelling_they_use(expert_factory):
    """A 4.x-style config with the same RoPE base as a 5.x-style one is the same architecture; another base is not
    (before, two 4.x-style configs with different bases both compared as "no rope_parameters" and merged)."""
    config = json.loads((expert_factory("llama")["code"].model_dir / "config.json").read_text())
    modern = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    classic = {key: value for key, value in config.items() if key != "rope_parameters"}
    assert check_same_architecture({"a": modern, "b": {**classic, "rope_theta": 500.0}}).name == "llama"
    with pytest.raises(DumeError, match="differ in rope_parameters"):
        check_same_architecture({"a": {**classic, "rope_theta": 500.0}, "b": {**classic, "rope_theta": 10000.0}})
    with pytest.raises(DumeError, match="differ in rope_parameters"):
        check_same_architecture({"a": {**classic, "rope_theta": 10000.0},
                                 "b": {**classic, "rope_theta": 10000.0, "rope_scaling": {"type": "linear",
                                                                                           "factor": 2.0}}})
