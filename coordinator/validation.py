"""Checks on every upload before anything reaches the ledger; each failure is a message a person can act on.

A model must match the federation's architecture (fixed at ``init --architecture`` or by the first member) in
config, tensor names, shapes and dtypes, and hold only finite values. Statistics must be one upper triangle per
layer in float64 under a basis this coordinator issued, with a non-negative diagonal, the declared token count
in every layer's count entry, and |G_ij| <= sqrt(G_ii G_jj) (Cauchy-Schwarz: a Gram matrix satisfies it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy
import torch

from dume.shared.errors import DumeError
from dume.shared.method.families import check_same_architecture, detect_family
from dume.shared.method.ridge import packed_solvable
from dume.shared.method.routers import MergeSettings
from dume.shared.method.settings import check_name
from dume.shared.method.statistics import (
    diagonal_exceeds_norm_bound,
    expected_layout,
    layer_index,
    row_starts,
    triangle_size,
)
from dume.shared.method.writer import TOKENIZER_FILES
from dume.shared.transport.blobs import read_range
from dume.shared.transport.wire import DTYPES, all_finite
from dume.v1 import federation_pb2, tensors_pb2

CHECK_BYTES = 1 << 22
MODEL_FILES = frozenset(("config.json", *TOKENIZER_FILES))  # the only files a model upload carries
CAUCHY_SCHWARZ_TOLERANCE = 1e-6
CHECK_VALUES = 1 << 18  # entries of G checked at once against Cauchy-Schwarz (2 MiB of float64 per temporary)


def check_plan(plan: federation_pb2.UploadPlan, reference: dict[str, Any] | None) -> None:
    """What a plan declares, checked against the federation's architecture before any byte of it is accepted: a
    model's tensors must have the architecture's names, shapes and dtypes, statistics the layout the config implies.
    Without an architecture yet (no ``--architecture`` and no member) only the staging quota bounds a model.
    What a plan is comes first: its kind, and for a model only files a model carries, so that a file named
    ``/etc/passwd`` is refused as such rather than as a tokenizer file the federation lacks."""
    if plan.kind not in (federation_pb2.UPLOAD_KIND_MODEL, federation_pb2.UPLOAD_KIND_STATISTICS):
        raise DumeError("the upload kind is missing: say whether it is a model or statistics")
    for file in plan.files:
        if file.name not in MODEL_FILES or plan.kind != federation_pb2.UPLOAD_KIND_MODEL:
            raise DumeError(f"file {file.name!r} is not one a model upload carries: only "
                            f"{', '.join(sorted(MODEL_FILES))}")
    if reference is None:
        return
    if plan.kind == federation_pb2.UPLOAD_KIND_MODEL:
        check_layout(plan.manifest, reference["layout"])
        check_tokenizer_files({file.name: file.sha256 for file in plan.files if file.name != "config.json"},
                              reference)
    else:
        check_statistics_layout(plan.statistics, plan.manifest, reference["config"])


def check_layout(manifest: tensors_pb2.TensorManifest, layout: dict[str, Any]) -> None:
    """The manifest names exactly the architecture's tensors, each with its shape and dtype."""
    names = {entry.name for entry in manifest.tensors}
    missing, extra = sorted(set(layout) - names), sorted(names - set(layout))
    if missing or extra:
        name = (missing or extra)[0]
        raise DumeError(f"tensor {name} is {'missing from' if missing else 'not in'} the federation's "
                        "architecture: upload a model fine-tuned from the federation's base")
    for entry in manifest.tensors:
        shape, dtype = layout[entry.name]
        if list(entry.shape) != shape or entry.dtype != dtype:
            raise DumeError(f"tensor {entry.name} is {entry.dtype}{list(entry.shape)}, the federation's is "
                            f"{dtype}{shape}: upload a model fine-tuned from the federation's base")


def check_tokenizer_files(files: dict[str, str], reference: dict[str, Any] | None) -> None:
    """Members agree on the tokenizer files and chat template (fixed by ``init --architecture`` or the first member
    to join), so the published model carries the ones all of them were trained with, whoever sorts first."""
    if reference is None or "files" not in reference:  # the first member, or a ledger from before the check
        return
    expected: dict[str, str] = reference["files"]
    for name in sorted(set(files) | set(expected)):
        if files.get(name) != expected.get(name):
            what = (f"lacks {name}, which the federation's files have" if name not in files else
                    f"has {name}, which the federation's files lack" if name not in expected else
                    f"has another {name} than the federation's")
            raise DumeError(f"the model {what}: every member must use the federation's tokenizer files and chat "
                            "template (those of `init --architecture` or of the first member); copy them from the "
                            "federation's base model")


def check_model(config: dict[str, Any], manifest: tensors_pb2.TensorManifest, reference: dict[str, Any] | None,
                blob_path: Callable[[str], Path], checked_finite: Callable[[str], bool] = lambda sha256: False) -> None:
    """``checked_finite(sha256)``: whether that blob was already found finite as it arrived (then it is not read)."""
    family = detect_family(config, "the uploaded model")
    if reference is not None:
        check_same_architecture({"federation": reference["config"], "uploaded": config})
        check_layout(manifest, reference["layout"])
    layers = int(config["num_hidden_layers"])
    mlp = {family.mlp_location(entry.name) for entry in manifest.tensors} - {None}
    wanted = {(layer, projection) for layer in range(layers) for projection in family.expert_projections}
    if not wanted <= mlp:
        raise DumeError(f"the upload lacks MLP weights {sorted(wanted - mlp)[0]}: upload the whole model")
    for entry in manifest.tensors:
        if not checked_finite(entry.sha256):
            check_finite(entry, blob_path(entry.sha256))


def check_finite(entry: tensors_pb2.TensorEntry, path: Path) -> None:
    """Every value of a tensor blob is finite, read a few MiB at a time."""
    itemsize = DTYPES[entry.dtype].itemsize
    _check_finite_chunks(entry, read_range(path, chunk_bytes=CHECK_BYTES - CHECK_BYTES % itemsize))


def _check_finite_chunks(entry: tensors_pb2.TensorEntry, chunks: Iterable[bytes | memoryview]) -> None:
    for chunk in chunks:
        if not all_finite(chunk, entry.dtype):
            raise DumeError(f"tensor {entry.name} holds NaN or infinite values: fix the model before uploading")


def check_statistics(header: tensors_pb2.StatisticsHeader, manifest: tensors_pb2.TensorManifest,
                     config: dict[str, Any], norm_weight: Callable[[int], torch.Tensor] | None,
                     settings: MergeSettings, blob_path: Callable[[str], Path],
                     checked_finite: Callable[[str], bool] = lambda sha256: False) -> None:
    """``norm_weight(layer)`` is the router-input norm weight of that layer in the basis the statistics name (None
    when this coordinator never issued that basis); ``settings`` says how the routers will be solved;
    ``checked_finite(sha256)`` whether that blob was found finite as it arrived.

    One layer at a time, each checked on its packed triangle as read from its blob (no mirrored G); the one full
    matrix made is the Cholesky factorisation's, of the lower triangle only."""
    if norm_weight is None:
        raise DumeError(f"statistics were computed under basis {header.basis_hash[:12]}, which this coordinator "
                        "never issued: recompute them under the basis it names")
    check_statistics_layout(header, manifest, config)
    size = int(config["hidden_size"]) + 1
    for entry in manifest.tensors:
        packed = torch.from_numpy(numpy.fromfile(blob_path(entry.sha256), dtype=numpy.float64))
        if packed.shape != (triangle_size(size - 1),):
            raise DumeError(f"statistics {entry.name} hold {packed.numel()} values, not {triangle_size(size - 1)}: "
                            "upload them again")
        if not checked_finite(entry.sha256):
            raw = memoryview(packed.numpy()).cast("B")
            _check_finite_chunks(entry, (raw[start:start + CHECK_BYTES] for start in range(0, len(raw), CHECK_BYTES)))
        diagonal = _check_gram(packed, size, entry.name, header.token_count)
        _check_solvable(packed, diagonal, entry.name, norm_weight(layer_index(entry.name)), settings)
        del packed


def check_statistics_layout(header: tensors_pb2.StatisticsHeader, manifest: tensors_pb2.TensorManifest,
                            config: dict[str, Any]) -> None:
    """Statistics name one upper triangle per layer of the federation's model, in its dtype and shape."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    if header.hidden_size != hidden or header.num_layers != layers:
        raise DumeError(f"statistics are for hidden size {header.hidden_size} and {header.num_layers} layers, the "
                        f"federation's model has {hidden} and {layers}")
    expected = expected_layout(hidden, layers)
    if {entry.name for entry in manifest.tensors} != set(expected) or len(manifest.tensors) != layers:
        raise DumeError(f"statistics must be exactly the tensors {sorted(expected)}")
    for entry in manifest.tensors:
        dtype, shape = expected[entry.name]
        if entry.dtype != dtype or list(entry.shape) != shape:
            raise DumeError(f"statistics tensor {entry.name} is {entry.dtype}{list(entry.shape)}: each layer's "
                            f"upper triangle is {dtype}{shape}")
    if header.token_count < hidden + 1:
        raise DumeError(f"statistics cover {header.token_count} tokens; a router over hidden size {hidden} needs at "
                        f"least {hidden + 1} per dataset (fewer would say more about single tokens than a sum "
                        "should): give the dataset more data")
    try:
        check_name(header.dataset, "dataset name")
    except DumeError as error:
        raise DumeError(f"{error} (StatisticsHeader.dataset)") from None


def _check_gram(packed: torch.Tensor, size: int, name: str, token_count: int) -> torch.Tensor:
    """A layer's packed G: non-negative diagonal, the declared count, Cauchy-Schwarz. Returns its diagonal."""
    starts = row_starts(size)
    diagonal = packed[starts[:-1]]
    if bool((diagonal < 0).any()):
        raise DumeError(f"statistics {name} have a negative diagonal entry: they are not sums of squares")
    if float(packed[-1]) != float(token_count):
        raise DumeError(f"statistics {name} count {float(packed[-1]):.0f} tokens, the header declares "
                        f"{token_count}")
    if _breaks_cauchy_schwarz(packed, diagonal, starts):
        raise DumeError(f"statistics {name} break Cauchy-Schwarz (|G_ij| > sqrt(G_ii G_jj)): they are not a "
                        "Gram matrix of hidden states")
    return diagonal


def _breaks_cauchy_schwarz(packed: torch.Tensor, diagonal: torch.Tensor, starts: list[int]) -> bool:
    """Whether some |G_ij| > sqrt(G_ii G_jj) (with a little tolerance) in the packed upper triangle, which says it
    of all of G (it is symmetric). Checked a block of whole rows (about CHECK_VALUES entries) at a time, so the
    temporaries are a few MiB whatever d is, with the arithmetic of the whole-matrix check."""
    size, first = len(diagonal), 0
    while first < size:
        last = first + 1
        while last < size and starts[last + 1] - starts[first] <= CHECK_VALUES:
            last += 1
        rows = torch.arange(first, last)
        lengths = size - rows
        columns = torch.arange(starts[first], starts[last]) - torch.repeat_interleave(
            torch.tensor(starts[first:last]) - rows, lengths)  # entry k of row r is G[r, r + k - start_r]
        bound = torch.repeat_interleave(diagonal[first:last], lengths).mul_(diagonal[columns]).sqrt_()
        if bool((packed[starts[first]:starts[last]].abs() > bound.mul_(1 + CAUCHY_SCHWARZ_TOLERANCE).add_(1e-9)).any()):
            return True
        first = last
    return False


def _check_solvable(packed: torch.Tensor, diagonal: torch.Tensor, name: str, norm_weight: torch.Tensor,
                    settings: MergeSettings) -> None:
    """What the router solve needs of one member's layer: bounded energy, and ``G + lambda I`` positive definite
    (then every sum with other members' statistics is too, so one member cannot make the routers unsolvable)."""
    if diagonal_exceeds_norm_bound(diagonal, norm_weight):
        raise DumeError(f"statistics {name} hold more than RMS-normalised hidden states of {float(diagonal[-1]):.0f} "
                        "tokens can: they were not collected from the model under the basis; recompute them")
    if not packed_solvable(packed, settings.rho, settings.router_bias):
        raise DumeError(f"statistics {name} are not positive definite even with the federation's ridge: they are "
                        "not a Gram matrix of hidden states; recompute them")


def read_config(files: dict[str, Path]) -> dict[str, Any]:
    if "config.json" not in files:
        raise DumeError("the upload has no config.json: upload the whole model directory")
    try:
        config = json.loads(files["config.json"].read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise DumeError(f"the uploaded config.json is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise DumeError("the uploaded config.json is not a JSON object")
    return config
