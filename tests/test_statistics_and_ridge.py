"""Statistics add up over data shards and ignore padding; the ridge solve is the least-squares solution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dume.shared.errors import DumeError
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import DocumentStream, PackedData, load_tokenizer, pack_documents, read_documents
from dume.shared.method.expert import load_dense_model, overwrite_parameters
from dume.shared.method.merge import open_experts
from dume.shared.method.ridge import check_solvable, solve_routers
from dume.shared.method.statistics import (
    PackedTriangle,
    collect_statistics,
    exceeds_norm_bound,
    from_upper_triangle,
    token_count,
    upper_triangle,
)


@pytest.fixture(scope="module")
def member(expert_factory):
    specs = expert_factory("llama")
    experts = open_experts(list(specs.values()))
    model = load_dense_model(experts["code"])
    overwrite_parameters(model, compute_basis(experts))
    data = pack_documents(read_documents(specs["code"].data_path), load_tokenizer(specs["code"].model_dir), 32)
    return model, data


def scaled_difference(left: torch.Tensor, right: torch.Tensor) -> float:
    """max |left_ij - right_ij| / sqrt(G_ii G_jj): the error of a Gram entry relative to its Cauchy-Schwarz bound."""
    diagonal = left.diagonal(dim1=1, dim2=2)
    scale = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])
    return float(((left - right).abs() / scale).max())


def test_statistics_of_a_union_are_the_sum_of_the_parts(member):
    model, data = member
    half = len(data.input_ids) // 2
    first = PackedData(data.input_ids[:half], data.attention_mask[:half])
    second = PackedData(data.input_ids[half:], data.attention_mask[half:])
    whole = collect_statistics(model, data)
    parts = collect_statistics(model, first) + collect_statistics(model, second)
    # Each batch's X^T X is a float32 product: other batches round differently, at about 1e-7 of the scale.
    assert scaled_difference(whole, parts) < 1e-6
    # Feature sums and counts are summed in float64.
    torch.testing.assert_close(whole[:, :, -1], parts[:, :, -1], rtol=1e-12, atol=1e-9)
    assert token_count(whole) == data.num_tokens


def test_streamed_data_gives_the_packed_statistics_and_max_tokens_caps_them(member, expert_factory):
    model, data = member
    spec = expert_factory("llama")["code"]
    stream = DocumentStream(spec.data_path, load_tokenizer(spec.model_dir), 32)
    assert torch.equal(collect_statistics(model, stream), collect_statistics(model, data))
    capped = collect_statistics(model, DocumentStream(spec.data_path, load_tokenizer(spec.model_dir), 32, 100))
    assert token_count(capped) == 100 < data.num_tokens


def test_honest_statistics_are_solvable_and_within_the_norm_bound_and_forged_ones_are_not(member):
    model, data = member
    gram = collect_statistics(model, data)
    weights = [layer.post_attention_layernorm.weight.detach() for layer in model.model.layers]
    assert check_solvable(gram, rho=1e-3, router_bias=False) is None
    assert check_solvable(gram, rho=1e-3, router_bias=True) is None
    assert not any(exceeds_norm_bound(gram[layer], weights[layer]) for layer in range(len(weights)))

    inflated = gram.clone()
    inflated[1, :-1, :-1] *= 1.2  # more energy than the same token count of normalised states can carry
    assert exceeds_norm_bound(inflated[1], weights[1]) and not exceeds_norm_bound(inflated[0], weights[0])

    indefinite = gram.clone()
    direction = torch.zeros(gram.shape[-1], dtype=torch.float64)
    direction[:2] = torch.tensor([1.0, -1.0]) / 2**0.5
    indefinite[1] -= 10 * float(torch.trace(gram[1])) * torch.outer(direction, direction)
    assert check_solvable(indefinite, rho=1e-3, router_bias=False) == 1


def test_padding_tokens_do_not_count(member):
    model, data = member
    real = data.input_ids[:1, :20]
    padded = PackedData(
        torch.cat([real, torch.full((1, 12), 256)], dim=1),
        torch.cat([torch.ones(1, 20, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long)], dim=1),
    )
    unpadded = PackedData(real, torch.ones(1, 20, dtype=torch.long))
    with_padding = collect_statistics(model, padded)
    assert token_count(with_padding) == 20
    torch.testing.assert_close(with_padding, collect_statistics(model, unpadded), rtol=1e-6, atol=1e-6)


def test_statistics_are_deterministic_and_symmetric(member):
    model, data = member
    gram = collect_statistics(model, data)
    assert torch.equal(gram, collect_statistics(model, data))
    assert gram.dtype == torch.float64
    assert torch.equal(gram, gram.transpose(1, 2))
    assert torch.equal(from_upper_triangle(upper_triangle(gram), gram.shape[-1]), gram)


def test_half_precision_hidden_states_give_the_float32_gram_of_the_same_values():
    """A bfloat16 model's hidden states: the packed Gram is the float32 product of those exact values. Where the
    device's torch has no half-in, float32-out product (this CPU), the tensor-core path falls back to widening."""
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    size = 71 * 72 // 2
    widened, tried = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    PackedTriangle(70, torch.device("cpu")).add_gram(widened, x)
    as_on_a_gpu = PackedTriangle(70, torch.device("cpu"))
    as_on_a_gpu.half_products = True
    as_on_a_gpu.add_gram(tried, x)
    assert torch.equal(tried, widened)
    assert not as_on_a_gpu.half_products  # tried once, then widened from the start
    augmented = torch.cat([x.double(), torch.ones(300, 1, dtype=torch.float64)], dim=1)
    exact = upper_triangle((augmented.T @ augmented)[None])[0]
    assert float(((widened - exact).abs() / exact.abs().clamp(min=1)).max()) < 1e-5


def random_members(seed: int = 0, members: int = 3, features: int = 6):
    """Per-member feature rows, and the statistics G built from them."""
    generator = np.random.default_rng(seed)
    rows = [generator.normal(loc=j, size=(50 + 10 * j, features)) for j in range(members)]
    grams = {}
    for j, x in enumerate(rows):
        augmented = np.hstack([x, np.ones((len(x), 1))])
        grams[f"m{j}"] = torch.from_numpy(augmented.T @ augmented)[None]
    return rows, grams


@pytest.mark.parametrize("router_bias", [False, True])
def test_ridge_solve_matches_an_independent_least_squares(router_bias):
    rows, grams = random_members()
    rho = 0.05
    x = np.vstack(rows)
    targets = np.zeros((len(x), len(rows)))
    start = 0
    for j, member_rows in enumerate(rows):
        targets[start : start + len(member_rows), j] = 1.0
        start += len(member_rows)
    design = np.hstack([x, np.ones((len(x), 1))]) if router_bias else x
    ridge_lambda = rho * np.trace(design.T @ design) / design.shape[1]
    # Ridge as ordinary least squares on the design stacked over sqrt(lambda) I.
    stacked = np.vstack([design, np.sqrt(ridge_lambda) * np.eye(design.shape[1])])
    stacked_targets = np.vstack([targets, np.zeros((design.shape[1], len(rows)))])
    expected = np.linalg.lstsq(stacked, stacked_targets, rcond=None)[0]

    (router,) = solve_routers(grams, rho=rho, router_bias=router_bias, normalize=False)
    assert router.ridge_lambda == pytest.approx(ridge_lambda)
    np.testing.assert_allclose(router.weight.numpy(), expected[: x.shape[1]].T, rtol=1e-9, atol=1e-12)
    if router_bias:
        np.testing.assert_allclose(router.bias.numpy(), expected[-1], rtol=1e-9, atol=1e-12)


def test_normalised_columns_are_unit_length_and_scaled_by_temperature():
    _, grams = random_members(seed=1)
    (plain,) = solve_routers(grams, router_bias=True, normalize=False)
    (router,) = solve_routers(grams, router_bias=True, temperature=2.0)
    norms = plain.weight.norm(dim=1)
    torch.testing.assert_close(router.weight.norm(dim=1), torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(router.bias, plain.bias / norms / 2.0)


def test_members_without_statistics_are_masked_out():
    _, grams = random_members()
    routers = solve_routers({**grams, "m9": None})
    assert routers[0].experts == ("m0", "m1", "m2")
    assert routers[0].weight.shape[0] == 3
    with pytest.raises(DumeError, match="no member has statistics"):
        solve_routers({"m9": None})


def test_documents_come_from_jsonl_txt_and_directories_in_a_fixed_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "a.txt").write_text("first\n\n  \n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_documents(tmp_path) == ["first", "second", "third"]


def test_packing_masks_only_the_tail_of_the_last_row(expert_factory):
    tokenizer = load_tokenizer(expert_factory("llama")["code"].model_dir)
    data = pack_documents(["abc", "de"], tokenizer, sequence_length=4)
    # "abc<eos>" then "de<eos>" and one padding position.
    assert data.input_ids.shape == (2, 4)
    assert data.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert data.input_ids[0, 3] == tokenizer.eos_token_id and data.input_ids[1, 2] == tokenizer.eos_token_id
