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

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from dume.shared.errors import DumeError
from dume.shared.method.data import Batches, DocumentStream, PackedData, data_files
from dume.shared.method.expert import ExpertDirectory, load_decoder
from dume.shared.method.families import detect_family
from dume.shared.method.placement import CPU, Placement
from dume.shared.method.statistics_checkpoint import Position, StatisticsCheckpoint, file_stamps, fingerprint
from dume.shared.progress import token_progress

STATISTICS_DTYPE = "F64"  # the safetensors / wire name of the statistics' dtype


class _LastLayerCaptured(Exception):
    """Ends the statistics forward once the last layer's router input is captured: the last MLP, the final norm
    and the LM head would change nothing the statistics see."""


def collect_statistics(
    model: torch.nn.Module, data: Batches, batch_size: int = 8, description: str = "statistics"
) -> torch.Tensor:
    """``G`` for every layer, shape (layers, d+1, d+1), float64 on the CPU: ``collect_packed_statistics`` mirrored
    into full symmetric matrices (for callers that solve from them at once)."""
    packed = collect_packed_statistics(model, data, batch_size, description)
    return from_upper_triangle(packed, model.config.hidden_size + 1)


@dataclass(frozen=True)
class Shard:
    """Which batches of the stream one process takes: ``rank``, ``rank + world``, ``rank + 2 world``... (one
    process: all of them). Every rank reads the whole stream, so each knows the position of the batches it skips."""

    rank: int = 0
    world: int = 1

    def takes(self, batch: int) -> bool:
        """Whether batch number ``batch`` (from 1) is this rank's."""
        return (batch - 1) % self.world == self.rank


def collect_packed_statistics(model: torch.nn.Module, data: Batches, batch_size: int = 8,
                              description: str = "statistics",
                              checkpoint: StatisticsCheckpoint | None = None, shard: Shard = Shard()) -> torch.Tensor:
    """Each layer's upper triangle of ``G`` (the layout ``upper_triangle`` gives), shape (layers, triangle), float64
    on the CPU; padding positions are masked out. ``model`` is a causal LM or its decoder stack alone.

    Each batch's ``X^T X`` is a float32 product (TF32 off; on a GPU a bfloat16 model's hidden states go to the
    tensor cores with float32 accumulation) over the upper triangle only, added into a packed float64 accumulator
    on the layer's device (G is never held whole); the feature sums and the count are summed in float64. Relative
    to an all-float64 computation G moves by about 1e-7 (benchmarks/statistics_throughput.py measures it, and the
    routing agreement that follows). The same code, settings and machine give the same bytes.
    With a ``checkpoint`` the partial sums are saved now and then and a matching earlier run is resumed.

    With a ``shard`` of several ranks this process sums its share of the batches only (possibly none); its
    checkpoint is then kept at the end (saved at its final position) for the caller to remove once the ranks' sums
    are reduced, so a run killed during the reduction does not start over.
    """
    family = detect_family(model.config.to_dict())
    decoder = model.base_model
    layers = decoder.layers
    hidden = model.config.hidden_size
    devices = [next(layer.parameters()).device for layer in layers]
    # The result, and on the CPU the accumulators themselves; a layer on a GPU accumulates there and is copied once.
    packed = torch.zeros(len(layers), triangle_size(hidden), dtype=torch.float64)
    accumulators = [packed[index] if device.type == "cpu" else torch.zeros_like(packed[index], device=device)
                    for index, device in enumerate(devices)]
    triangles = {device: PackedTriangle(hidden, device) for device in set(devices)}
    input_device = decoder.embed_tokens.weight.device
    mask: torch.Tensor | None = None

    def accumulate(index: int):
        def hook(_module, _inputs, output):
            triangles[devices[index]].add_gram(accumulators[index], output.reshape(-1, hidden)[mask.to(output.device)])
            if index == len(layers) - 1:
                raise _LastLayerCaptured

        return hook

    named = {layer_name(index): accumulator for index, accumulator in enumerate(accumulators)}
    resume_key = _inputs_fingerprint(model, data, batch_size, checkpoint, shard)
    position = checkpoint.restore(resume_key, named) if checkpoint else Position()
    handles = [getattr(layer, family.router_input).register_forward_hook(accumulate(i))
               for i, layer in enumerate(layers)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    batches, tokens, own = 0, 0, 0
    # One bar for all ranks: rank 0 counts every batch of the stream as it passes it, so tokens/s is the total.
    try:
        with torch.inference_mode(), token_progress(data.expected_tokens, description, shown=shard.rank == 0) as bar:
            for input_ids, attention_mask in data.batches(batch_size):
                mask = attention_mask.reshape(-1).bool()
                batches, tokens = batches + 1, tokens + int(mask.sum())
                own += shard.takes(batches)  # this rank's batches so far, the checkpoint's clock
                if batches <= position.batches:  # already in the checkpoint's sums: replay the data only
                    _check_replay(checkpoint, position, batches, tokens)
                    bar.update(int(mask.sum()))
                    continue
                if not shard.takes(batches):  # another rank's
                    bar.update(int(mask.sum()))
                    continue
                try:
                    decoder(input_ids=input_ids.to(input_device), attention_mask=attention_mask.to(input_device),
                            use_cache=False)
                except _LastLayerCaptured:
                    pass
                bar.update(int(mask.sum()))
                if checkpoint is not None and checkpoint.due(own):
                    checkpoint.save(named, Position(batches, tokens), resume_key)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for handle in handles:
            handle.remove()
    if batches < position.batches:
        _check_replay(checkpoint, position, position.batches, -1)
    for index, accumulator in enumerate(accumulators):
        if accumulator.device.type != "cpu":
            packed[index].copy_(accumulator)
    if shard.world > 1:  # a rank may hold no tokens; the caller checks the reduced sums
        if checkpoint is not None:
            checkpoint.save(named, Position(batches, tokens), resume_key)
        return packed
    if not token_count(packed):
        raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's tokenizer")
    if checkpoint is not None:
        checkpoint.remove()
    return packed


def _check_replay(checkpoint: StatisticsCheckpoint | None, position: Position, batches: int, tokens: int) -> None:
    """Refuses to go on from a checkpoint whose batches the data does not reproduce (the files were rewritten
    in place with the same size and time): its sums belong to other data."""
    if checkpoint is None or batches != position.batches or tokens == position.tokens:
        return
    checkpoint.remove()
    raise DumeError(f"the statistics checkpoint {checkpoint.path} does not match the data (it covers "
                    f"{position.tokens} tokens in {position.batches} batches): it was removed; run again")


def _inputs_fingerprint(model: torch.nn.Module, data: Batches, batch_size: int,
                        checkpoint: StatisticsCheckpoint | None, shard: Shard) -> str:
    """What a checkpoint must have been made from to be resumed: the caller's inputs (the basis), the model's
    config and dtype, the data, the batch size, the code's settings and (with several ranks) the rank's share."""
    if checkpoint is None:
        return ""
    parameter = next(model.parameters())
    return fingerprint({"inputs": checkpoint.inputs, "config": model.config.to_dict(), "dtype": parameter.dtype,
                        "device": parameter.device, "data": _data_fingerprint(data), "batch_size": batch_size,
                        "gram_blocks": GRAM_BLOCKS, "torch": torch.__version__,
                        **({"shard": [shard.rank, shard.world]} if shard.world > 1 else {})})


def _data_fingerprint(data: Batches) -> object:
    if isinstance(data, DocumentStream):
        tokenizer = data.tokenizer
        return {"files": file_stamps(data_files(data.path)), "sequence_length": data.sequence_length,
                "max_tokens": data.max_tokens, "tokenizer": [type(tokenizer).__name__, len(tokenizer),
                                                             tokenizer.eos_token_id, tokenizer.pad_token_id]}
    if isinstance(data, PackedData):
        digest = hashlib.sha256(data.input_ids.numpy().tobytes())
        digest.update(data.attention_mask.numpy().tobytes())
        return {"packed": digest.hexdigest()}
    raise TypeError(f"cannot checkpoint statistics over {type(data).__name__}")


# Column blocks of the upper-triangle product: more blocks skip more of the lower triangle's work, fewer blocks
# keep each GEMM large; at 4 blocks the product costs 62.5% of a full X^T X.
GRAM_BLOCKS = 4
HALF_DTYPES = (torch.bfloat16, torch.float16)


class PackedTriangle:
    """Where each block of the upper-triangle product lands in a layer's packed triangle, on one device.

    Row ``r`` of the packed triangle holds columns ``r .. d`` of G, the last one (column d) being the feature sums
    (and, in row d, the count). The product of block rows ``start:stop`` against columns ``start:d`` fills the
    contiguous packed range of those rows: ``gather`` picks, for each packed entry of the range, its product entry
    (precomputed once, so each batch costs one index_select), and the sums column gets a zero there, its sums being
    added in float64 below.
    """

    def __init__(self, hidden: int, device: torch.device) -> None:
        size = hidden + 1
        row_starts = [row * size - row * (row - 1) // 2 for row in range(size + 1)]
        block = -(-hidden // GRAM_BLOCKS)
        self.blocks = []
        for start in range(0, hidden, block):
            stop = min(start + block, hidden)
            width = hidden - start  # the product's columns: start .. d-1
            rows, columns = torch.arange(stop - start)[:, None], torch.arange(width + 1)[None, :]
            upper = columns >= rows  # each row from its diagonal to column d
            gather = torch.where(columns < width, rows * width + columns, 0)[upper].to(torch.int32)
            sums = torch.tensor(row_starts[start + 1:stop + 1]) - row_starts[start] - 1  # column d of each row
            self.blocks.append((start, stop, row_starts[start], row_starts[stop], gather.to(device), sums.to(device)))
        self.sums = torch.tensor(row_starts[1:size], device=device) - 1  # column d of rows 0 .. d-1

        self.half_products = device.type == "cuda"  # until a GPU's torch turns out to lack mm's out_dtype

    def add_gram(self, accumulator: torch.Tensor, x: torch.Tensor) -> None:
        """``accumulator += upper triangle of [x;1]^T [x;1]``: ``X^T X`` in float32 one block row at a time, each
        block row against the columns from its diagonal on; the feature sums and the count in float64."""
        features = x if self.half_products and x.dtype in HALF_DTYPES else x.to(torch.float32)
        for start, stop, first, last, gather, sums in self.blocks:
            product = self._float32_product(features[:, start:stop].T, features[:, start:])
            values = product.view(-1).index_select(0, gather)
            values[sums] = 0  # column d: its sums are added below, in float64
            accumulator[first:last] += values  # each float32 value is widened exactly, then added in float64
        accumulator[self.sums] += x.sum(dim=0, dtype=torch.float64)
        accumulator[-1] += len(x)

    def _float32_product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``left @ right`` with float32 output. Half-precision factors on a GPU run on its tensor cores with float32
        accumulation and output: a product of two bfloat16 (or float16) values is exact in float32, so this is the
        float32 product of the same values at the half-precision rate (a float32 Gram with TF32 off runs at about a
        fifteenth of it on an H100, where it would cost more than half the forward). Elsewhere both are float32."""
        if left.dtype in HALF_DTYPES:
            try:
                return torch.mm(left, right, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # a torch without it: widen, as on the CPU
                self.half_products = False
                return left.to(torch.float32) @ right.to(torch.float32)
        return left @ right


def statistics_under_basis(expert: ExpertDirectory, basis: Mapping[str, torch.Tensor], data: Batches,
                           batch_size: int, placement: Placement = CPU) -> torch.Tensor:
    """One member's full G under ``basis`` (layers, d+1, d+1): ``packed_statistics_under_basis`` mirrored."""
    packed = packed_statistics_under_basis(expert, basis, data, batch_size, placement)
    return from_upper_triangle(packed, int(expert.config["hidden_size"]) + 1)


def packed_statistics_under_basis(expert: ExpertDirectory, basis: Mapping[str, torch.Tensor], data: Batches,
                                  batch_size: int, placement: Placement = CPU,
                                  checkpoint: StatisticsCheckpoint | None = None,
                                  shard: Shard = Shard()) -> torch.Tensor:
    """One member's packed G under ``basis`` (layers, triangle): its own decoder, without the LM head, with the
    shared parameters replaced by the basis as they are read (a ``LazyTensors`` basis is never whole in memory).
    With a ``checkpoint`` the run saves its partial sums and resumes a matching earlier run; with a ``shard`` it
    sums only that rank's batches (see ``distributed_statistics``)."""
    model = load_decoder(expert, placement, basis)
    if checkpoint is not None:
        stamps = file_stamps([path for path in expert.path.iterdir() if path.is_file()])
        checkpoint = replace(checkpoint, inputs=fingerprint([checkpoint.inputs, stamps, placement]))
    return collect_packed_statistics(model, data, batch_size, f"statistics {expert.name}", checkpoint, shard)


def check_enough_tokens(gram: torch.Tensor, member: str) -> None:
    """Refuses statistics from fewer tokens than the ridge system has unknowns: G is (d+1)x(d+1) and reaches full
    rank only from d+1 tokens on; below that the router would be the ridge's guess, not the member's data.
    ``gram`` is full (layers, d+1, d+1) or packed (layers, triangle)."""
    needed, count = gram_size(gram), token_count(gram)
    if count < needed:
        raise DumeError(f"the data of {member!r} gave {count} tokens; a router over hidden size {needed - 1} needs "
                        f"at least {needed} (one per unknown of its ridge system): give it more data")


def token_count(gram: torch.Tensor) -> int:
    """The number of tokens the statistics were collected over (the bottom-right entry of any layer, the last of
    its packed triangle): ``gram`` is full (layers, d+1, d+1) or packed (layers, triangle)."""
    return int(round(float(gram[0].reshape(-1)[-1])))


def gram_size(gram: torch.Tensor) -> int:
    """d+1, the side of each layer's G, whether ``gram`` is full (layers, d+1, d+1) or packed (layers, triangle)."""
    if gram.dim() == 3:
        return gram.shape[-1]
    return int(round(((8 * gram.shape[-1] + 1) ** 0.5 - 1) / 2))


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


def row_starts(size: int) -> list[int]:
    """Where each row of a layer's packed triangle starts (row r at G[r, r], its diagonal entry), and its end."""
    return [row * size - row * (row - 1) // 2 for row in range(size + 1)]


def last_column(size: int) -> torch.Tensor:
    """Where column d of G (rows 0 .. d: the feature sums, then the count) lies in a layer's packed triangle: at
    the end of each row."""
    rows = torch.arange(1, size + 1)
    return rows * size - rows * (rows - 1) // 2 - 1


# RMSNorm outputs are computed in the model's dtype: bfloat16 rounds each to 2^-8, so allow a few percent.
NORM_BOUND_TOLERANCE = 0.05


def exceeds_norm_bound(gram: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether one layer's G holds more energy than RMS-normalised hidden states can have.

    The router input is ``y = w * x / rms(x)`` and ``sum_i (x_i / rms(x))^2 <= d``, so every token adds at most d
    to ``sum_i y_i^2 / w_i^2``: over n tokens ``sum_i G_ii / w_i^2 <= n d``, and ``G_ii = 0`` where ``w_i = 0``.
    Statistics above that bound did not come from the model (scaled, or crafted to swamp the others' routers).
    """
    return diagonal_exceeds_norm_bound(gram.diagonal(), norm_weight)


def diagonal_exceeds_norm_bound(diagonal: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """``exceeds_norm_bound`` from all it reads of G: its diagonal (d+1 entries, the token count last)."""
    hidden, count = diagonal.shape[0] - 1, float(diagonal[-1])
    diagonal = diagonal[:hidden].to(torch.float64)
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
    """The tensors a node writes and uploads for ``gram``: full (layers, d+1, d+1), or already packed (layers,
    triangle) as ``collect_packed_statistics`` gives it (then each is a view, not a copy)."""
    packed = upper_triangle(gram) if gram.dim() == 3 else gram
    return {layer_name(layer): packed[layer] for layer in range(len(packed))}


def gram_from_tensors(tensors: Mapping[str, torch.Tensor], hidden_size: int) -> torch.Tensor:
    """The full (layers, d+1, d+1) G back from the layout's tensors, in layer order."""
    packed = torch.stack([tensors[layer_name(layer)] for layer in range(len(tensors))])
    return from_upper_triangle(packed, hidden_size + 1)


def layout_token_count(tensors: Mapping[str, torch.Tensor]) -> int:
    """The token count the layout records: the last entry of a layer's triangle."""
    return int(round(float(tensors[layer_name(0)][-1])))
