"""The coordinator's checks on uploaded statistics, run on each layer's packed triangle as read from its blob file:
honest statistics pass, and each fault is refused with its own message, at the layer that holds it."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dume.coordinator import validation
from dume.shared.errors import DumeError
from dume.shared.method.routers import MergeSettings
from dume.shared.method.statistics import layer_name, upper_triangle
from dume.shared.transport.wire import tensor_view
from dume.v1 import tensors_pb2

HIDDEN, LAYERS, TOKENS = 12, 2, 60


def honest_gram(seed: int = 0) -> torch.Tensor:
    """(layers, d+1, d+1) G of RMS-normalised random states (norm weight 1), the count in the corner."""
    states = torch.randn(LAYERS, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    states = states / states.square().mean(dim=-1, keepdim=True).sqrt()
    augmented = torch.cat([states, torch.ones(LAYERS, TOKENS, 1, dtype=torch.float64)], dim=-1)
    return augmented.mT @ augmented


def check(tmp_path, gram: torch.Tensor, settings: MergeSettings = MergeSettings()) -> None:
    """Stores each layer's packed triangle as a blob file and runs the coordinator's check on them."""
    entries, paths = [], {}
    for layer, triangle in enumerate(upper_triangle(gram)):
        data = tensor_view(triangle)
        sha256 = hashlib.sha256(data).hexdigest()
        paths[sha256] = tmp_path / sha256
        paths[sha256].write_bytes(data)
        entries.append(tensors_pb2.TensorEntry(name=layer_name(layer), dtype="F64", shape=list(triangle.shape),
                                               sha256=sha256, size_bytes=len(data)))
    header = tensors_pb2.StatisticsHeader(basis_hash="b" * 64, hidden_size=HIDDEN, num_layers=LAYERS,
                                          token_count=TOKENS, sequence_length=32, dataset="default")
    validation.check_statistics(header, tensors_pb2.TensorManifest(tensors=entries),
                                {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS},
                                lambda layer: torch.ones(HIDDEN), settings, paths.__getitem__)


def spoiled(fault: str) -> torch.Tensor:
    gram = honest_gram()
    if fault == "nan":
        gram[1, 2, 5] = gram[1, 5, 2] = float("nan")
    if fault == "negative diagonal":
        gram[1, 4, 4] = -1.0
    if fault == "count":
        gram[1, -1, -1] = TOKENS + 1
    if fault == "cauchy":
        gram[1, 0, 1] = gram[1, 1, 0] = 1.01 * float(gram[1, 0, 0] * gram[1, 1, 1]) ** 0.5
    if fault == "inflated":
        gram[1, :HIDDEN, :HIDDEN] *= 1.2
    if fault == "indefinite":  # every 2x2 minor holds, yet G - 3 v v^T has a negative eigenvalue along v
        direction = torch.zeros(HIDDEN + 1, dtype=torch.float64)
        direction[:3] = torch.tensor([1.0, 1.0, -1.0]) / 3**0.5
        gram[1] = torch.eye(HIDDEN + 1, dtype=torch.float64) * TOKENS - 1.2 * TOKENS * torch.outer(direction,
                                                                                                   direction)
        gram[1, -1, -1] = TOKENS
    return gram


def test_honest_statistics_pass_with_and_without_an_intercept(tmp_path):
    check(tmp_path, honest_gram())
    check(tmp_path, honest_gram(1), MergeSettings(router_bias=True))


@pytest.mark.parametrize(("fault", "message"), [
    ("nan", "tensor layers.1 holds NaN or infinite values"),
    ("negative diagonal", "statistics layers.1 have a negative diagonal entry"),
    ("count", "statistics layers.1 count 61 tokens, the header declares 60"),
    ("cauchy", r"statistics layers.1 break Cauchy-Schwarz \(\|G_ij\| > sqrt\(G_ii G_jj\)\)"),
    ("inflated", "statistics layers.1 hold more than RMS-normalised hidden states of 60 tokens can"),
    ("indefinite", "statistics layers.1 are not positive definite even with the federation's ridge"),
])
def test_each_fault_is_refused_with_its_message(tmp_path, fault, message):
    with pytest.raises(DumeError, match=message):
        check(tmp_path, spoiled(fault))


@pytest.mark.parametrize("block", [5, 40])
def test_cauchy_schwarz_is_checked_at_every_entry_whatever_the_block(tmp_path, monkeypatch, block):
    """The packed check goes a block of rows at a time: a violation at any entry of the upper triangle (the
    diagonal aside) is found, as the whole-matrix check found it, and a bound just met passes it."""
    monkeypatch.setattr(validation, "CHECK_VALUES", block)
    honest = honest_gram()
    rows, columns = torch.triu_indices(HIDDEN + 1, HIDDEN + 1, offset=1)
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        gram = honest.clone()
        bound = float(gram[0, row, row] * gram[0, column, column]) ** 0.5
        gram[0, row, column] = gram[0, column, row] = -1.001 * bound
        with pytest.raises(DumeError, match=f"statistics {layer_name(0)} break Cauchy-Schwarz"):
            check(tmp_path, gram)
    gram = honest.clone()
    gram[0, 3, 5] = gram[0, 5, 3] = float(gram[0, 3, 3] * gram[0, 5, 5]) ** 0.5  # two features in lockstep
    with pytest.raises(DumeError, match="not positive definite"):  # within Cauchy-Schwarz, not with the others
        check(tmp_path, gram)
