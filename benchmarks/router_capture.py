"""Router capture: how much of the other domains' routing one member takes by inflating its statistics, with the
experts weighed by their tokens (``--expert-weighting tokens``, the method as published) and with every expert
scaled to one token budget (``equal``, the default), next to honest federations with equal and very unequal data.

Three tiny Llama experts (perturbed copies of one base) on three synthetic domains, as in ``rho_sweep.py``;
statistics from the first documents of each domain, routing accuracy (share of a domain's held-out tokens routed
to its expert, averaged over layers) from later ones. The attacker is ``code``:

* ``repeat xK``: its statistics are those of its data repeated K times (G scaled by K): consistent, and exactly
  what a member holding a K times larger corpus of its domain declares;
* ``pad``: it also runs the other domains' documents through its own model and adds them to its statistics.

The routers come from the product's own solve (``sum_contributions`` and ``solve_for_checkpoint``).

    python benchmarks/router_capture.py [--out benchmarks/results/router_capture.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dume.shared.lab.tiny import SYNTHETIC_TEMPLATES, build_tiny_model, perturb_mlps, synthetic_documents
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import load_tokenizer, pack_documents
from dume.shared.method.expert import load_dense_model, overwrite_parameters
from dume.shared.method.merge import ExpertSpec, open_experts
from dume.shared.method.routers import packed_contribution, solve_for_checkpoint, sum_contributions
from dume.shared.method.settings import EXPERT_WEIGHTINGS, MergeSettings
from dume.shared.method.statistics import collect_statistics, upper_triangle

from rho_sweep import router_inputs

ATTACKER = "code"
DOCUMENTS = 30  # statistics documents per honest domain
HELD_OUT = 30


def routing_accuracy(statistics: dict[str, torch.Tensor], held_out: dict[str, list[torch.Tensor]],
                     weighting: str) -> dict[str, float]:
    """Per domain, the share of its held-out tokens routed to its own expert, averaged over layers."""
    experts = {name: sum_contributions([packed_contribution(name, "default", upper_triangle(gram))])
               for name, gram in statistics.items()}
    routers = solve_for_checkpoint(experts, MergeSettings(expert_weighting=weighting), "").routers
    names = sorted(statistics)
    accuracy = {}
    for index, name in enumerate(names):
        per_layer = [float(((held_out[name][layer] @ router.weight.T).argmax(dim=1) == index).double().mean())
                     for layer, router in enumerate(routers)]
        accuracy[name] = sum(per_layer) / len(per_layer)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_capture.json"))
    out = parser.parse_args().out
    names = sorted(SYNTHETIC_TEMPLATES)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        base = build_tiny_model("llama", root / "base")
        specs = [ExpertSpec(name, perturb_mlps(base, root / name, seed=seed, scale=0.5), root / f"{name}.txt")
                 for seed, name in enumerate(names, start=1)]
        experts = open_experts(specs)
        basis = compute_basis(experts)
        tokenizer = load_tokenizer(base)
        documents = {name: synthetic_documents(name, 10 * DOCUMENTS + HELD_OUT) for name in names}
        models, honest, large, held_out = {}, {}, {}, {}
        for name in names:
            models[name] = load_dense_model(experts[name])
            overwrite_parameters(models[name], basis)
            honest[name] = collect_statistics(models[name], pack_documents(documents[name][:DOCUMENTS], tokenizer, 64))
            held_out[name] = router_inputs(models[name], pack_documents(documents[name][-HELD_OUT:], tokenizer, 64))
        # An honest member with ten times the others' data (distinct documents, not repeats).
        large = dict(honest)
        large[ATTACKER] = collect_statistics(models[ATTACKER], pack_documents(
            documents[ATTACKER][:10 * DOCUMENTS], tokenizer, 64))
        others = [doc for name in names if name != ATTACKER for doc in documents[name][:DOCUMENTS]]
        padded = dict(honest)
        padded[ATTACKER] = honest[ATTACKER] + collect_statistics(models[ATTACKER],
                                                                 pack_documents(others, tokenizer, 64))
    scenarios = {"honest, equal data": honest, f"honest, {ATTACKER} with 10x the data": large,
                 **{f"{ATTACKER} repeats its data x{k}": {**honest, ATTACKER: honest[ATTACKER] * k} for k in (10, 100)},
                 f"{ATTACKER} pads with the other domains' text": padded}
    results = []
    print(f"{'scenario':<42} {'weighting':<8} " + " ".join(f"{name:>7}" for name in names) + "  victims' mean")
    for scenario, statistics in scenarios.items():
        for weighting in EXPERT_WEIGHTINGS:
            accuracy = routing_accuracy(statistics, held_out, weighting)
            victims = sum(accuracy[name] for name in names if name != ATTACKER) / (len(names) - 1)
            results.append({"scenario": scenario, "weighting": weighting, "accuracy": accuracy,
                            "victims_mean": victims})
            print(f"{scenario:<42} {weighting:<8} " + " ".join(f"{accuracy[name]:7.3f}" for name in names)
                  + f"  {victims:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
