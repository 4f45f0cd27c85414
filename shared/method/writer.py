"""The checkpoint writer: a Hugging Face MoE directory that stock transformers loads with no custom code.

Tensors use the stock classes' on-disk names (per-expert ``w1/w2/w3`` for Mixtral, ``gate/up/down_proj`` for
Qwen3-MoE), which every transformers release and serving stack reads. The model is written one decoder layer per
shard, each tensor computed only when the sink asks for it (read from the experts' files, averaged or cast), so a
sink that stores tensors one by one (the coordinator's blob store) holds about one tensor at a time, and one that
writes whole files (a directory) one layer of all experts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from dume.shared.method.averaging import canonical_mean
from dume.shared.method.expert import DenseWeights
from dume.shared.method.ridge import LayerRouter
from dume.shared.method.serving_fields import portable_tokenizer_config
from dume.shared.method.shard_layout import SHARD_METADATA
from dume.shared.method.tensor_file import write_tensors
from dume.shared.progress import progress

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


LazyTensors = Mapping[str, Callable[[], torch.Tensor]]  # each tensor of a shard, computed when it is called


class CheckpointSink(Protocol):
    """Where a checkpoint's files go: a directory, or the coordinator's content-addressed store. A shard's tensors
    come as functions, so a sink that stores them one by one holds one tensor at a time, not the whole shard."""

    def write_shard(self, name: str, tensors: LazyTensors) -> int:
        """Writes the shard; returns its tensors' bytes."""
        ...

    def write_file(self, name: str, data: bytes) -> None: ...


class DirectorySink:
    """Writes the checkpoint's files into a directory (a shard is one safetensors file: built whole, then saved)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def write_shard(self, name: str, tensors: LazyTensors) -> int:
        built = {tensor_name: make() for tensor_name, make in tensors.items()}
        save_shard(self.out_dir / name, built)
        return sum(tensor.numel() * tensor.element_size() for tensor in built.values())

    def write_file(self, name: str, data: bytes) -> None:
        (self.out_dir / name).write_bytes(data)


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard; the same tensors always give the same bytes (``save_file``'s)."""
    write_tensors(tensors, path, SHARD_METADATA)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def write_moe_checkpoint(
    out: Path | CheckpointSink,
    experts: Mapping[str, DenseWeights],
    routers: Sequence[LayerRouter],
    top_k: int,
    dume_block: Mapping[str, Any],
) -> None:
    """Write the merged model: shared parameters averaged over all ``experts``, one expert per routed member.

    ``routers[l].experts`` (sorted member names with statistics) fixes the experts and their order.
    """
    members = sorted(experts)
    first = experts[members[0]]
    family = first.family
    routed = list(routers[0].experts)
    router_bias = routers[0].bias is not None
    sink = DirectorySink(out) if isinstance(out, Path) else out

    shared_by_layer: dict[int | None, list[str]] = {}
    for name in first.shared_names:
        shared_by_layer.setdefault(_layer_of(name), []).append(name)
    shard_count = first.num_layers + 1
    weight_map: dict[str, str] = {}
    total_bytes = 0

    def shard_name(index: int) -> str:
        return f"model-{index + 1:05d}-of-{shard_count:05d}.safetensors"

    def average(name: str) -> Callable[[], torch.Tensor]:
        return lambda: canonical_mean(experts, name)

    def expert(member: str, layer: int, projection: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        return lambda: experts[member].mlp_tensor(layer, projection).to(dtype).contiguous()

    def router(tensor: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        return lambda: tensor.to(dtype).contiguous()

    for layer in progress(range(first.num_layers), "writing layers", "layer"):
        tensors = {name: average(name) for name in shared_by_layer.get(layer, [])}
        dtype = first.tensor(family.router_input_key(layer)).dtype  # the mean keeps the first member's dtype
        for position, member in enumerate(routed):
            for projection in family.expert_projections:
                tensors[family.expert_key(layer, position, projection)] = expert(member, layer, projection, dtype)
        tensors[family.router_key(layer)] = router(routers[layer].weight, dtype)
        if router_bias:
            tensors[family.router_key(layer, "bias")] = router(routers[layer].bias, dtype)
        total_bytes += _write_shard(sink, shard_name(layer), tensors, weight_map)
    outside_layers = {name: average(name) for name in shared_by_layer.get(None, [])}
    total_bytes += _write_shard(sink, shard_name(first.num_layers), outside_layers, weight_map)

    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    sink.write_file("model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())

    config = family.moe_config(first.config, num_experts=len(routed), top_k=top_k)
    if router_bias:
        config["model_type"] = family.biased_model_type
        config["architectures"] = [family.biased_architecture]
    config["dume"] = dict(dume_block)
    sink.write_file("config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for file in TOKENIZER_FILES:
        data = first.read_file(file)
        if data is not None:
            sink.write_file(file, portable_tokenizer_config(data) if file == "tokenizer_config.json" else data)


def _write_shard(sink: CheckpointSink, name: str, tensors: LazyTensors, weight_map: dict[str, str]) -> int:
    for tensor_name in tensors:
        weight_map[tensor_name] = name
    return sink.write_shard(name, tensors)
