"""The method's guarantees: oracle equivalence, identical copies, order invariance, the checkpoint's fidelity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import dume
from dume.coordinator.publication import StoredMember, manifest_into
from dume.coordinator.records import Member
from dume.shared.errors import DumeError
from dume.shared.method import averaging
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import load_tokenizer, pack_documents, read_documents
from dume.shared.method.expert import ExpertDirectory, load_dense_model, overwrite_parameters
from dume.shared.method.merge import ExpertSpec, member_statistics, merge, open_experts
from dume.shared.method.routers import MergeSettings, solve_for_checkpoint
from dume.shared.method.routing import build_routed_model, build_weight_averaged_model
from dume.shared.transport.blobs import BlobStore

from conftest import FAMILIES

SETTINGS = MergeSettings(sequence_length=64)
TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def routers_for(specs: dict[str, ExpertSpec], settings: MergeSettings = SETTINGS):
    experts = open_experts(list(specs.values()))
    basis = compute_basis(experts)
    statistics = member_statistics(list(specs.values()), experts, basis, settings)
    routers = solve_for_checkpoint(statistics, settings, "").routers
    return experts, basis, statistics, routers


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def directory_bytes(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_routing_equals_member_dense_model_under_basis(expert_factory, family):
    specs = expert_factory(family)
    experts = open_experts(list(specs.values()))
    basis = compute_basis(experts)
    for name in specs:
        merged = build_routed_model(experts, basis, mode="oracle", oracle_expert=name)
        dense = load_dense_model(experts[name])
        overwrite_parameters(dense, basis)
        assert torch.equal(logits(merged), logits(dense))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router_bias", [False, True])
def test_checkpoint_loaded_by_transformers_matches_library_forward(expert_factory, tmp_path, family, router_bias):
    specs = expert_factory(family)
    settings = MergeSettings(sequence_length=64, router_bias=router_bias, top_k=2)
    out = merge(list(specs.values()), tmp_path / "merged", settings)
    stock = dume.load_merged(out).eval()  # registers the router-bias classes first
    experts, basis, _, routers = routers_for(specs, settings)
    library = build_routed_model(experts, basis, routers, top_k=2)
    torch.testing.assert_close(logits(stock), logits(library), rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2
    assert config["dume"]["members"] == sorted(specs)
    assert config["dume"]["router_bias"] is router_bias
    assert config["model_type"].startswith("dume_") is router_bias


def test_bias_free_checkpoint_loads_without_dume(expert_factory, tmp_path):
    """A stock checkpoint: a process that never imports dume loads it and gets the library's logits."""
    specs = expert_factory("qwen3")
    out = merge(list(specs.values()), tmp_path / "merged", SETTINGS)
    torch.save(TOKENS, tmp_path / "tokens.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True).eval()\n"
        "assert 'dume' not in sys.modules\n"
        "with torch.no_grad(): torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
                   check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    experts, basis, _, routers = routers_for(specs)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(build_routed_model(experts, basis, routers)))


def test_identical_copies_merge_to_the_same_model(expert_factory, tmp_path):
    source = expert_factory("llama")["code"]
    copies = [ExpertSpec(f"copy{i}", source.model_dir, source.data_path) for i in range(3)]
    out = merge(copies, tmp_path / "merged", SETTINGS)
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(source.model_dir), local_files_only=True).eval()
    torch.testing.assert_close(logits(merged), logits(dense), rtol=1e-6, atol=1e-6)


def test_member_order_changes_no_output_byte(expert_factory, tmp_path):
    specs = list(expert_factory("mistral").values())
    first = merge(specs, tmp_path / "a", SETTINGS)
    second = merge(list(reversed(specs)), tmp_path / "b", SETTINGS)
    assert directory_bytes(first) == directory_bytes(second)


def test_router_sends_each_domain_to_its_own_expert(expert_factory):
    """On distinct domains the router picks the domain's own expert far above chance (1/3), even in tiny random
    models whose hidden states barely separate the domains (trained experts do much better: see benchmarks)."""
    specs = expert_factory("llama")
    experts, basis, _, routers = routers_for(specs)
    model = build_routed_model(experts, basis, routers)
    chosen: list[torch.Tensor] = []
    model.model.layers[-1].mlp.register_forward_hook(
        lambda module, inputs, _: chosen.append(module.route(inputs[0].reshape(-1, inputs[0].shape[-1]))[1][:, 0])
    )
    for position, name in enumerate(routers[0].experts):
        spec = specs[name]
        data = pack_documents(read_documents(spec.data_path), load_tokenizer(spec.model_dir), 64)
        chosen.clear()
        with torch.no_grad():
            model(input_ids=data.input_ids, attention_mask=data.attention_mask)
        routed = chosen[0][data.attention_mask.reshape(-1).bool()]
        assert (routed == position).float().mean() > 0.5, name


def test_random_routing_is_seeded_and_spreads_tokens(expert_factory):
    specs = expert_factory("llama")
    experts = open_experts(list(specs.values()))
    basis = compute_basis(experts)
    first = logits(build_routed_model(experts, basis, mode="random", seed=3))
    again = logits(build_routed_model(experts, basis, mode="random", seed=3))
    other = logits(build_routed_model(experts, basis, mode="random", seed=4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_weight_averaging_baseline_averages_every_parameter(expert_factory):
    specs = expert_factory("llama")
    experts = open_experts(list(specs.values()))
    averaged = build_weight_averaged_model(experts)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = torch.stack([experts[member].tensor(name) for member in sorted(experts)]).double().mean(0).float()
    torch.testing.assert_close(averaged.get_parameter(name).detach(), expected)


def test_a_shared_weight_stored_as_integers_is_refused_by_name(expert_factory, tmp_path):
    """Weights the merge cannot average (here an integer tensor) are named with their dtype, not reported as a
    tensor missing from the model."""
    source = ExpertDirectory(expert_factory("llama")["code"].model_dir)
    tensors = {key: source.tensor(key) for key in source.parameter_names}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    folder = tmp_path / "integers"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_bytes((source.path / "config.json").read_bytes())
    with pytest.raises(DumeError, match="model.norm.weight of expert 'integers' is stored as I64"):
        ExpertDirectory(folder, "integers").tensor_shape("model.norm.weight")


def test_shared_weights_are_averaged_a_block_of_rows_at_a_time_with_the_bytes_of_whole_tensors(
        expert_factory, tmp_path, monkeypatch):
    """The basis (the vocabulary matrices included) is averaged a few rows at a time, read from each member's
    directory or from the coordinator's blobs alike, and gives the bytes of the float64 mean of whole tensors
    summed in sorted member order: no float64 copy of a whole vocabulary matrix, the same model."""
    source = ExpertDirectory(expert_factory("llama")["code"].model_dir)
    blobs = BlobStore(tmp_path / "blobs")
    config = (source.path / "config.json").read_bytes()
    directories, stored = {}, {}
    generator = torch.Generator().manual_seed(1)
    for index, name in enumerate(["code", "arith", "prose"]):  # joined out of sorted order
        tensors = {key: (source.tensor(key) + index * torch.randn(source.tensor(key).shape, generator=generator))
                   .to(torch.bfloat16) for key in source.parameter_names}
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_bytes(config)
        directories[name] = ExpertDirectory(folder, name)
        member = Member(name, "active", None, "", manifest_into(blobs, tensors),
                        {"config.json": blobs.put_bytes(config)}, name)
        stored[name] = StoredMember(member, blobs)
    monkeypatch.setattr(averaging, "SUM_BLOCK", 7)  # blocks of a row or a few: every boundary is crossed

    from_directories, from_blobs = compute_basis(directories), compute_basis(stored)
    assert "model.embed_tokens.weight" in from_directories
    for key in source.shared_names:
        total = torch.zeros(source.tensor(key).shape, dtype=torch.float64)
        for member in sorted(directories):
            total += directories[member].tensor(key).double()
        expected = (total / len(directories)).to(torch.bfloat16)
        assert torch.equal(from_directories[key].view(torch.int16), expected.view(torch.int16)), key
        assert torch.equal(from_blobs[key].view(torch.int16), expected.view(torch.int16)), key
