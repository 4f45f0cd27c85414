"""``dume demo``: the method end to end on one machine, from nothing, in about a minute on 2 cores.

Builds a tiny Llama base, pretrains it briefly on a mixture of three built-in domains, fine-tunes one expert per
domain from it, merges the experts with DUME (k=1), loads the checkpoint with stock transformers, and prints the
held-out perplexity of every model on every domain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM

from dume.shared.data import load_tokenizer, pack_documents, read_documents
from dume.shared.domains import DOMAINS, write_domain
from dume.shared.evaluation import perplexity
from dume.shared.merge import ExpertSpec, MergeSettings, merge, open_experts
from dume.shared.routing import build_weight_averaged_model
from dume.shared.tiny import build_tiny_model
from dume.shared.training import TrainSettings, train

DEMO_MODEL = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


# Experts are fine-tuned gently (a tenth of the base's learning rate): DUME averages every non-MLP weight, which
# fits experts that stay near their common base. With 3e-4 the demo keeps 86-95% of each expert's perplexity;
# with 3e-3 the experts drift and DUME keeps only about half (measured with this module's defaults otherwise).
EXPERT_LEARNING_RATE = 3e-4


def run_demo(workdir: Path, base_steps: int = 300, expert_steps: int = 150) -> dict[str, dict[str, float]]:
    """Run the demo in ``workdir`` (replaced if present) and return perplexity[model][domain]."""
    shutil.rmtree(workdir, ignore_errors=True)
    domains = sorted(DOMAINS)
    splits = {name: write_domain(name, workdir / "data") for name in domains}
    mixture = workdir / "data" / "mixture"
    mixture.mkdir()
    for name in domains:
        shutil.copyfile(splits[name][0], mixture / f"{name}.jsonl")

    print(f"building a tiny Llama base and pretraining it on {', '.join(domains)} ({base_steps} steps)")
    init = build_tiny_model("llama", workdir / "init", **DEMO_MODEL)
    base = train(init, mixture, workdir / "base", TrainSettings(steps=base_steps))
    specs = []
    for seed, name in enumerate(domains, start=1):
        print(f"fine-tuning the {name} expert ({expert_steps} steps)")
        settings = TrainSettings(expert_steps, EXPERT_LEARNING_RATE, seed=seed)
        model = train(base, splits[name][0], workdir / "experts" / name, settings)
        specs.append(ExpertSpec(name, model, splits[name][0]))

    print("merging the experts with DUME (top-1 routing, routers solved in closed form)")
    merged = merge(specs, workdir / "merged", MergeSettings(sequence_length=128))
    tokenizer = load_tokenizer(base)
    held_out = {name: pack_documents(read_documents(splits[name][1]), tokenizer, 128) for name in domains}
    models = {"base": base, **{f"expert:{spec.name}": spec.model_dir for spec in specs}, "dume": merged}
    table = {}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        table[label] = {name: perplexity(model, data) for name, data in held_out.items()}
    averaged = build_weight_averaged_model(open_experts(specs))
    table["weight-average"] = {name: perplexity(averaged, data) for name, data in held_out.items()}
    (workdir / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Perplexity rows per model, one column per domain, and DUME's retention of each domain's expert."""
    domains = sorted(next(iter(table.values())))
    lines = [f"{'held-out perplexity':<22}" + "".join(f"{name:>10}" for name in domains)]
    for label, row in table.items():
        lines.append(f"{label:<22}" + "".join(f"{row[name]:>10.2f}" for name in domains))
    retention = [table[f"expert:{name}"][name] / table["dume"][name] for name in domains]
    lines.append(f"{'dume retention':<22}" + "".join(f"{value:>10.1%}" for value in retention))
    return "\n".join(lines)
