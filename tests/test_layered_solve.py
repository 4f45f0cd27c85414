"""The router solve one layer at a time: the same bytes as summing and solving whole statistics, reading each
contribution's layers in layer order, one layer of every contribution before the next."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dume.coordinator.state_dir import initialise
from dume.shared.errors import DumeError
from dume.shared.method.ridge import solve_routers
from dume.shared.method.routers import (
    ContributionStatistics,
    MergeSettings,
    packed_contribution,
    solve_for_checkpoint,
    sum_contributions,
)
from dume.shared.method.statistics import from_upper_triangle, token_count, upper_triangle
from dume.shared.method.statistics_spill import spill_contribution

LAYERS, HIDDEN = 3, 7
# expert -> its contributions (node, dataset); "delta" has none yet
CONTRIBUTIONS = {"alpha": [("n1", "web"), ("n0", "code"), ("n0", "books")], "beta": [("n2", "math")],
                 "gamma": [("n3", "b"), ("n3", "a")], "delta": []}


def random_statistics(seed: int) -> dict[tuple[str, str], torch.Tensor]:
    """Each contribution's full G (layers, d+1, d+1) from its own random rows: symmetric, positive semi-definite,
    with a token count in the corner, as a node's statistics are."""
    generator = torch.Generator().manual_seed(seed)
    grams = {}
    for index, key in enumerate(sorted(key for keys in CONTRIBUTIONS.values() for key in keys)):
        tokens = 5 + 3 * index  # fewer than d+1 for some: only their sum needs full rank
        rows = torch.randn(LAYERS, tokens, HIDDEN, generator=generator, dtype=torch.float64) * (1 + index)
        augmented = torch.cat([rows, torch.ones(LAYERS, tokens, 1, dtype=torch.float64)], dim=2)
        grams[key] = augmented.transpose(1, 2) @ augmented
    return grams


def whole_tensor_solve(grams: dict[tuple[str, str], torch.Tensor], settings: MergeSettings):
    """The solve before it went layer by layer: each expert's full G summed over its contributions in canonical
    order (node, then dataset), then every layer solved from the whole tensors."""
    summed, counts = {}, {}
    for expert, keys in CONTRIBUTIONS.items():
        total = None
        for key in sorted(keys):
            total = grams[key].clone() if total is None else total.__iadd__(grams[key])
        summed[expert] = total
        counts[expert] = {f"{node}/{dataset}": token_count(grams[(node, dataset)]) for node, dataset in sorted(keys)}
    routers = solve_routers(summed, settings.rho, settings.router_bias, settings.normalize, settings.temperature)
    return routers, {name: token_count(gram) for name, gram in summed.items() if gram is not None}, counts


def layered_statistics(grams, reads: list[tuple[str, int]] | None = None):
    """Each expert's statistics as the publisher and ``dume merge`` give them: packed contributions, handed over
    in a shuffled order; ``reads`` records every layer read."""
    statistics = {}
    for expert, keys in CONTRIBUTIONS.items():
        contributions = []
        for node, dataset in random.Random(expert).sample(keys, len(keys)):
            packed = upper_triangle(grams[(node, dataset)])
            if reads is None:
                contributions.append(packed_contribution(node, dataset, packed))
            else:
                def read(layer, out, packed=packed, label=f"{node}/{dataset}"):
                    reads.append((label, layer))
                    out.copy_(packed[layer])

                contributions.append(ContributionStatistics(node, dataset, LAYERS, packed.shape[-1], read))
        statistics[expert] = sum_contributions(contributions)
    return statistics


@pytest.mark.parametrize("router_bias", [False, True])
def test_layer_by_layer_solve_gives_the_bytes_of_the_whole_tensor_solve(router_bias):
    grams = random_statistics(seed=int(router_bias))
    # The whole-tensor solve sums the statistics as collected: experts weighed by their tokens.
    settings = MergeSettings(router_bias=router_bias, temperature=1.5, expert_weighting="tokens")
    expected, expected_tokens, expected_counts = whole_tensor_solve(grams, settings)

    solved = solve_for_checkpoint(layered_statistics(grams), settings, "basis")

    assert len(solved.routers) == LAYERS
    for router, reference in zip(solved.routers, expected, strict=True):
        assert router.experts == reference.experts == ("alpha", "beta", "gamma")
        assert torch.equal(router.weight, reference.weight)
        assert (router.bias is None) == (not router_bias)
        assert router.bias is None or torch.equal(router.bias, reference.bias)
        assert router.ridge_lambda == reference.ridge_lambda
    block = solved.dume_block
    assert block["token_counts"] == expected_tokens
    assert block["contributions"] == {name: expected_counts[name] for name in ("alpha", "beta", "gamma")}
    assert list(block["contributions"]["alpha"]) == ["n0/books", "n0/code", "n1/web"]  # the order summed
    assert block["members_without_statistics"] == ["delta"] and not block["exact"]
    assert block["ridge_lambda"] == [router.ridge_lambda for router in expected]


def test_each_layer_of_every_contribution_is_read_once_in_layer_order():
    reads: list[tuple[str, int]] = []
    solve_for_checkpoint(layered_statistics(random_statistics(seed=2), reads), MergeSettings(), "basis")
    labels = [f"{node}/{dataset}" for expert in sorted(CONTRIBUTIONS)
              for node, dataset in sorted(CONTRIBUTIONS[expert])]
    assert reads == [(label, layer) for layer in range(LAYERS) for label in labels]


def test_the_packed_sum_unpacks_to_the_full_sum():
    grams = random_statistics(seed=3)
    statistics = layered_statistics(grams)
    full = grams[("n0", "books")] + grams[("n0", "code")] + grams[("n1", "web")]
    for layer in range(LAYERS):
        packed, counts = statistics["alpha"].layer(layer)
        assert torch.equal(from_upper_triangle(packed[None], HIDDEN + 1)[0], full[layer])
        assert counts == {"n0/books": 5 + 3 * 0, "n0/code": 5 + 3 * 1, "n1/web": 5 + 3 * 2}


def test_statistics_spilled_to_disk_give_the_same_routers(tmp_path):
    grams = random_statistics(seed=5)
    in_memory = layered_statistics(grams)
    spilled = {expert: sum_contributions(spill_contribution(tmp_path, c.node, c.dataset, upper_triangle(
        grams[(c.node, c.dataset)])) for c in statistics.contributions) if statistics else None
        for expert, statistics in in_memory.items()}
    assert len(list(tmp_path.glob("*/*.f64"))) == LAYERS * 6  # one file per contribution and layer
    expected, solved = (solve_for_checkpoint(statistics, MergeSettings(), "b") for statistics in (in_memory, spilled))
    assert solved.dume_block == expected.dume_block
    for router, reference in zip(solved.routers, expected.routers, strict=True):
        assert torch.equal(router.weight, reference.weight)


def test_statistics_of_different_depths_are_refused_in_one_line():
    grams = random_statistics(seed=4)
    shallow = packed_contribution("n9", "short", upper_triangle(grams[("n2", "math")])[:2])
    deep = packed_contribution("n2", "math", upper_triangle(grams[("n2", "math")]))
    with pytest.raises(DumeError, match="different numbers of layers"):
        sum_contributions([deep, shallow])
    with pytest.raises(DumeError, match="different numbers of layers"):
        solve_for_checkpoint({"a": sum_contributions([deep]), "b": sum_contributions([shallow])}, MergeSettings(), "")
    with pytest.raises(DumeError, match="no member has statistics"):
        solve_for_checkpoint({"a": None}, MergeSettings(), "")


@pytest.mark.scenario("router capture")
def test_equal_expert_weighting_gives_a_member_nothing_for_repeating_its_data():
    """With ``expert_weighting="equal"`` every expert weighs as one token budget: statistics of the same data
    declared ten times over (G scaled by 10, consistent in every check) route exactly as the honest ones, up to
    rounding; weighed by tokens, the same inflation moves every router."""
    grams = random_statistics(3)
    inflated = {key: (gram * 10 if key == ("n2", "math") else gram) for key, gram in grams.items()}
    for weighting, moved in (("equal", False), ("tokens", True)):
        settings = MergeSettings(expert_weighting=weighting)
        honest = solve_for_checkpoint(layered_statistics(grams), settings, "b").routers
        attacked = solve_for_checkpoint(layered_statistics(inflated), settings, "b").routers
        for ours, theirs in zip(honest, attacked, strict=True):
            assert torch.allclose(ours.weight, theirs.weight, rtol=1e-9, atol=1e-12) is not moved, weighting


def test_an_unknown_expert_weighting_is_refused_in_one_line():
    with pytest.raises(DumeError, match="expert weighting 'fair' is not one of tokens, equal"):
        MergeSettings(expert_weighting="fair")


def test_experts_weigh_equally_by_default_but_a_federation_from_before_the_setting_keeps_tokens(tmp_path):
    """``equal`` is the default of `init` and `dume merge`; a state directory whose settings predate
    ``expert_weighting`` keeps solving as it did, so an upgrade does not change its next version's bytes."""
    assert MergeSettings().expert_weighting == "equal"
    state = initialise(tmp_path / "coordinator", "127.0.0.1:0", "127.0.0.1:0", None, None, MergeSettings(), None)
    assert state.settings().expert_weighting == "equal"
    config = state.config()
    del config["settings"]["expert_weighting"]
    state.config_path.write_text(json.dumps(config))
    assert state.settings().expert_weighting == "tokens"
