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

from dume.shared.errors import DumeError
from dume.shared.method.data import Batches
from dume.shared.method.expert import ExpertDirectory, load_dense_model, overwrite_parameters
from dume.shared.method.families import detect_family
from dume.shared.method.placement import CPU, Placement
from dume.shared.progress import token_progress

STATISTICS_DTYPE = "F64"  # the safetensors / wire name of the statistics' dtype


class _LastLayerCaptured(Exception):
    """Ends the statistics forward once the last layer's router input is captured: the last MLP, the final norm
    and the LM head would change nothing the statistics see."""


def collect_statistics(
    model: torch.nn.Module, data: Batches, batch_size: int = 8, description: str = "statistics"
) -> torch.Tensor:
    """``G`` for every layer, shape (layers, d+1, d+1), float64 on the CPU; padding positions are masked out.

    Each batch's ``X^T X`` is a float32 product (TF32 off) over the upper triangle only, added into a float64
    accumulator on the layer's device; the feature sums and the count are summed in float64. Relative to an
    all-float64 computation G moves by about 1e-7 (benchmarks/statistics_throughput.py measures it, and the
    routing agreement that follows). The same code, settings and machine give the same bytes.
    """
    family = detect_family(model.config.to_dict())
    layers = model.model.layers
    hidden = model.config.hidden_size
    # One accumulator per layer, on that layer's device (a device map may spread the layers over several GPUs).
    grams = [torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=next(layer.parameters()).device)
             for layer in layers]
    input_device = model.model.embed_tokens.weight.device
    mask: torch.Tensor | None = None

    def accumulate(index: int):
        def hook(_module, _inputs, output):
            add_gram(grams[index], output.reshape(-1, hidden)[mask.to(output.device)])
            if index == len(layers) - 1:
                raise _LastLayerCaptured

        return hook

    handles = [getattr(layer, family.router_input).register_forward_hook(accumulate(i))
               for i, layer in enumerate(layers)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(), token_progress(data.expected_tokens, description) as bar:
            for input_ids, attention_mask in data.batches(batch_size):
                mask = attention_mask.reshape(-1).bool()
                try:
                    model.model(input_ids=input_ids.to(input_device), attention_mask=attention_mask.to(input_device),
                                use_cache=False)
                except _LastLayerCaptured:
                    pass
                bar.update(int(mask.sum()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for handle in handles:
            handle.remove()
    gram = torch.stack([layer_gram.cpu() for layer_gram in grams])
    if not token_count(gram):
        raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's tokenizer")
    # Mirror the upper triangle: only it travels, so the local and federated paths see the same exact matrix.
    return from_upper_triangle(upper_triangle(gram), hidden + 1)


# Column blocks of the upper-triangle product: more blocks skip more of the lower triangle's work, fewer blocks
# keep each GEMM large; at 4 blocks the product costs 62.5% of a full X^T X.
GRAM_BLOCKS = 4


def add_gram(accumulator: torch.Tensor, x: torch.Tensor) -> None:
    """``accumulator += [x;1]^T [x;1]`` on its upper triangle (the lower one is left as it is).

    ``X^T X`` is computed in float32 one block row at a time, each block row against the columns from its
    diagonal on; the feature sums (last column) and the count (last entry) are summed in float64.
    """
    hidden = x.shape[1]
    features = x.to(torch.float32)
    block = -(-hidden // GRAM_BLOCKS)
    for start in range(0, hidden, block):
        stop = min(start + block, hidden)
        accumulator[start:stop, start:hidden] += (features[:, start:stop].T @ features[:, start:]).to(torch.float64)
    accumulator[:hidden, hidden] += x.sum(dim=0, dtype=torch.float64)
    accumulator[hidden, hidden] += len(x)


def statistics_under_basis(expert: ExpertDirectory, basis: Mapping[str, torch.Tensor], data: Batches,
                           batch_size: int, placement: Placement = CPU) -> torch.Tensor:
    """One member's G under ``basis``: its own model with the shared parameters swapped for the basis."""
    model = load_dense_model(expert, placement)
    overwrite_parameters(model, basis)
    return collect_statistics(model, data, batch_size, description=f"statistics {expert.name}")


def check_enough_tokens(gram: torch.Tensor, member: str) -> None:
    """Refuses statistics from fewer tokens than the ridge system has unknowns: G is (d+1)x(d+1) and reaches full
    rank only from d+1 tokens on; below that the router would be the ridge's guess, not the member's data."""
    needed, count = gram.shape[-1], token_count(gram)
    if count < needed:
        raise DumeError(f"the data of {member!r} gave {count} tokens; a router over hidden size {needed - 1} needs "
                        f"at least {needed} (one per unknown of its ridge system): give it more data")


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


# RMSNorm outputs are computed in the model's dtype: bfloat16 rounds each to 2^-8, so allow a few percent.
NORM_BOUND_TOLERANCE = 0.05


def exceeds_norm_bound(gram: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether one layer's G holds more energy than RMS-normalised hidden states can have.

    The router input is ``y = w * x / rms(x)`` and ``sum_i (x_i / rms(x))^2 <= d``, so every token adds at most d
    to ``sum_i y_i^2 / w_i^2``: over n tokens ``sum_i G_ii / w_i^2 <= n d``, and ``G_ii = 0`` where ``w_i = 0``.
    Statistics above that bound did not come from the model (scaled, or crafted to swamp the others' routers).
    """
    hidden = gram.shape[-1] - 1
    diagonal, count = gram.diagonal()[:hidden].to(torch.float64), float(gram[-1, -1])
    weight = norm_weight.to(torch.float64).square()
    used = weight > 0
    if bool((diagonal[~used] > 0).any()):
        return True
    energy = float((diagonal[used] / weight[used]).sum())
    return not energy <= count * hidden * (1 + NORM_BOUND_TOLERANCE)


# -- the layout on disk and on the wire ---------------------------------------------------------------------------
def layer_name(layer: int) -> str:
    return f"layers.{layer}"


def layer_index(name: str) -> int:
    """The layer a statistics tensor named by ``layer_name`` holds."""
    return int(name.removeprefix("layers."))


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
