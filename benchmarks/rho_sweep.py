"""Routing accuracy on held-out tokens as a function of rho, with and without a router intercept.

Three tiny Llama experts (perturbed copies of one base) on three synthetic domains; statistics come from the first
half of each domain's documents, accuracy (share of domain-d tokens routed to expert d, per layer) from the second.
This is the measurement behind dume.shared.method.ridge.DEFAULT_RHO; the quality benchmark re-tunes it on trained
experts.

    python benchmarks/rho_sweep.py [--out benchmarks/results/rho_sweep.json]
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
from dume.shared.method.data import PackedData, load_tokenizer, pack_documents
from dume.shared.method.expert import load_dense_model, overwrite_parameters
from dume.shared.method.merge import ExpertSpec, open_experts
from dume.shared.method.ridge import solve_routers
from dume.shared.method.statistics import collect_statistics

RHOS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def router_inputs(model: torch.nn.Module, data: PackedData, batch_size: int | None = None,
                  device: str = "cpu") -> list[torch.Tensor]:
    """Each layer's router input for the real tokens of ``data``, in float64: one forward over all rows, or one per
    ``batch_size`` rows."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    mask: torch.Tensor | None = None
    handles = [layer.post_attention_layernorm.register_forward_hook(
        lambda _m, _i, output, into=captured[index]: into.append(output.reshape(-1, output.shape[-1])[mask].double()))
        for index, layer in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in data.batches(batch_size or len(data.input_ids)):
                mask = attention_mask.reshape(-1).bool().to(device)
                model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(layer) for layer in captured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rho_sweep.json"))
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        base = build_tiny_model("llama", root / "base")
        specs = [ExpertSpec(name, perturb_mlps(base, root / name, seed=seed, scale=0.5), root / f"{name}.txt")
                 for seed, name in enumerate(sorted(SYNTHETIC_TEMPLATES), start=1)]
        experts = open_experts(specs)
        basis = compute_basis(experts)
        tokenizer = load_tokenizer(base)
        statistics, held_out = {}, {}
        for name in sorted(experts):
            model = load_dense_model(experts[name])
            overwrite_parameters(model, basis)
            docs = synthetic_documents(name, 60)
            statistics[name] = collect_statistics(model, pack_documents(docs[:30], tokenizer, 64))
            held_out[name] = router_inputs(model, pack_documents(docs[30:], tokenizer, 64))
    results = []
    names = sorted(statistics)
    for router_bias in (False, True):
        for rho in RHOS:
            routers = solve_routers(statistics, rho=rho, router_bias=router_bias)
            accuracy = []
            for layer, router in enumerate(routers):
                correct = total = 0
                for index, name in enumerate(names):
                    logits = held_out[name][layer] @ router.weight.T
                    if router.bias is not None:
                        logits = logits + router.bias
                    correct += int((logits.argmax(dim=1) == index).sum())
                    total += len(logits)
                accuracy.append(correct / total)
            results.append({"router_bias": router_bias, "rho": rho, "accuracy_per_layer": accuracy})
            print(f"router_bias={router_bias!s:<5} rho={rho:<8g} accuracy per layer: "
                  + " ".join(f"{value:.3f}" for value in accuracy))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
