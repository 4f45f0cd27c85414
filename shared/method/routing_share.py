"""Each expert's share of a merged model's top-1 routing decisions on a probe text.

Statistics can pass every check and still take routing from the others (docs/limits.md, "Router capture"): the
operator sees it by running each published version over a public probe text and counting, per layer, which
expert each real token's router ranks first. The model runs as published (the stock MoE checkpoint); the router
input is read where the family says it is, and the logits come from the checkpoint's own gate (and bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dume.shared.errors import DumeError
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.families import FAMILIES, Family, read_config
from dume.shared.method.registration import load_merged


@dataclass(frozen=True)
class RoutingShares:
    """Per layer, the share of the probe's real tokens whose first expert is each of ``experts``."""

    experts: list[str]
    per_layer: list[list[float]]  # layer -> one share per expert, in ``experts`` order; each row sums to 1
    tokens: int


def merged_family(config: dict) -> Family:
    """The family whose MoE class (stock or with a router bias) a merged checkpoint's config names."""
    for family in FAMILIES:
        if config.get("model_type") in (family.moe_model_type, family.biased_model_type):
            return family
    raise DumeError(f"model_type {config.get('model_type')!r} is not a DUME checkpoint's: pass a merged version")


def routing_shares(model_dir: Path, probe: Path, max_tokens: int, sequence_length: int = 256,
                   batch_size: int = 8) -> RoutingShares:
    """Runs the merged checkpoint in ``model_dir`` over the first ``max_tokens`` tokens of ``probe`` and counts,
    in every layer, the expert each real token's router ranks first. Holds the model once in memory."""
    config = read_config(model_dir)
    family, experts = merged_family(config), list(config["dume"]["members"])
    model = load_merged(model_dir).eval()
    layers = model.model.layers
    counts = torch.zeros(len(layers), len(experts), dtype=torch.long)
    gates = [getattr(layer, family.mlp_module).gate for layer in layers]
    real: list[torch.Tensor] = []  # the current batch's mask of real tokens, flattened

    def count(index: int, output: torch.Tensor) -> None:
        gate = gates[index]
        logits = torch.nn.functional.linear(output.reshape(-1, output.shape[-1]), gate.weight,
                                            getattr(gate, "bias", None))
        counts[index] += torch.bincount(logits.argmax(dim=-1)[real[0]], minlength=len(experts))

    hooks = [layer.get_submodule(family.router_input).register_forward_hook(
        lambda module, args, output, index=index: count(index, output)) for index, layer in enumerate(layers)]
    tokens = 0
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in DocumentStream(probe, load_tokenizer(model_dir), sequence_length,
                                                            max_tokens).batches(batch_size):
                real[:] = [attention_mask.reshape(-1).bool()]
                tokens += int(attention_mask.sum())
                model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    if not tokens:
        raise DumeError(f"the probe text {probe} gave no tokens: add text to it")
    return RoutingShares(experts, [[float(value) / tokens for value in row] for row in counts], tokens)
