"""Router statistics of one member: per layer, ``G = sum over real tokens of [x;1][x;1]^T`` in float64.

``x`` is the router input, the output of the layer's router-input module (``post_attention_layernorm`` in every
family we support: what the MLP sees), captured in one forward pass of the member's own model with its shared
parameters replaced by the federation's basis. That model is the merged model under oracle routing to this
member, so its hidden states are the ones the router will see. ``G`` holds X^T X (top-left block), X^T 1 (last
column: the member's X^T Y for its one-hot target) and the token count (bottom-right entry); statistics of
disjoint data add up.

This module is also the one home of the statistics' layout on disk and on the wire, which the node writes and
the coordinator validates and reads: one F64 tensor per layer named ``layers.<i>``, holding that layer's upper
triangle (row-major, diagonal included), whose last entry is the token count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dume.shared.method.data import PackedData
from dume.shared.method.expert import ExpertDirectory, load_dense_model, overwrite_parameters
from dume.shared.method.families import detect_family
from dume.shared.progress import progress

STATISTICS_DTYPE = "F64"  # the safetensors / wire name of the statistics' dtype


def collect_statistics(
    model: torch.nn.Module, data: PackedData, batch_size: int = 8, description: str = "statistics"
) -> torch.Tensor:
    """``G`` for every layer, shape (layers, d+1, d+1), float64; padding positions are masked out."""
    family = detect_family(model.config.to_dict())
    layers = model.model.layers
    hidden = model.config.hidden_size
    gram = torch.zeros(len(layers), hidden + 1, hidden + 1, dtype=torch.float64)
    mask: torch.Tensor | None = None

    def accumulate(index: int):
        def hook(_module, _inputs, output):
            x = output.reshape(-1, hidden)[mask].to(torch.float64)
            augmented = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
            gram[index] += single_threaded_gram(augmented)

        return hook

    handles = [getattr(layer, family.router_input).register_forward_hook(accumulate(i))
               for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in progress(data.batches(batch_size), description, "batch"):
                mask = attention_mask.reshape(-1).bool()
                model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # Mirror the upper triangle: only it travels, so the local and federated paths see the same exact matrix.
    return from_upper_triangle(upper_triangle(gram), hidden + 1)


def statistics_under_basis(expert: ExpertDirectory, basis: Mapping[str, torch.Tensor], data: PackedData,
                           batch_size: int) -> torch.Tensor:
    """One member's G under ``basis``: its own model with the shared parameters swapped for the basis."""
    model = load_dense_model(expert)
    overwrite_parameters(model, basis)
    return collect_statistics(model, data, batch_size, description=f"statistics {expert.name}")


def single_threaded_gram(augmented: torch.Tensor) -> torch.Tensor:
    """``A^T A`` on one thread: a multi-threaded float64 GEMM may sum in another order at another thread count,
    and the federation promises the same bytes whatever machine a member computes on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return augmented.T @ augmented
    finally:
        torch.set_num_threads(threads)


def token_count(gram: torch.Tensor) -> int:
    """The number of tokens the statistics were collected over (the bottom-right entry of any layer)."""
    return int(round(float(gram[0, -1, -1])))


def upper_triangle(gram: torch.Tensor) -> torch.Tensor:
    """Each layer's upper triangle (row-major, diagonal included): all that needs to travel or be stored."""
    rows, cols = torch.triu_indices(gram.shape[-1], gram.shape[-1])
    return gram[:, rows, cols].contiguous()


def from_upper_triangle(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The symmetric ``G`` back from ``upper_triangle``'s output."""
    rows, cols = torch.triu_indices(size, size)
    gram = torch.zeros(packed.shape[0], size, size, dtype=packed.dtype)
    gram[:, rows, cols] = packed
    gram[:, cols, rows] = packed
    return gram


# -- the layout on disk and on the wire ---------------------------------------------------------------------------
def layer_name(layer: int) -> str:
    return f"layers.{layer}"


def triangle_size(hidden_size: int) -> int:
    """Entries of one layer's upper triangle of the (d+1)x(d+1) G."""
    return (hidden_size + 1) * (hidden_size + 2) // 2


def expected_layout(hidden_size: int, num_layers: int) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) of a member's statistics: what the coordinator accepts, and nothing else."""
    return {layer_name(layer): (STATISTICS_DTYPE, [triangle_size(hidden_size)]) for layer in range(num_layers)}


def statistics_tensors(gram: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors a node writes and uploads for ``gram`` (layers, d+1, d+1)."""
    packed = upper_triangle(gram)
    return {layer_name(layer): packed[layer] for layer in range(len(packed))}


def gram_from_tensors(tensors: Mapping[str, torch.Tensor], hidden_size: int) -> torch.Tensor:
    """The full (layers, d+1, d+1) G back from the layout's tensors, in layer order."""
    packed = torch.stack([tensors[layer_name(layer)] for layer in range(len(tensors))])
    return from_upper_triangle(packed, hidden_size + 1)


def layout_token_count(tensors: Mapping[str, torch.Tensor]) -> int:
    """The token count the layout records: the last entry of a layer's triangle."""
    return int(round(float(tensors[layer_name(0)][-1])))
