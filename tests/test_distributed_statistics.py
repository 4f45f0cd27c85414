"""Statistics over several processes (``--nproc``): real worker processes joined by gloo on loopback.

Two workers sum the same batches as one process, in another order: the statistics agree within float64 rounding
and their routers route held-out tokens the same; the same N gives the same bytes, in ``dume merge`` and in a
federation; a worker that dies ends the command with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dume.shared.lab.harness import Federation, differing_files, environment, wait_until
from dume.shared.lab.tiny import synthetic_documents
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import DocumentStream, load_tokenizer, pack_documents
from dume.shared.method.distributed_statistics import StatisticsTask, packed_statistics_of
from dume.shared.method.expert import ExpertDirectory, load_decoder
from dume.shared.method.families import detect_family
from dume.shared.method.ridge import solve_routers
from dume.shared.method.statistics import from_upper_triangle, token_count

SEQUENCE = 32
DUME = [sys.executable, "-c", "import sys; from dume.shared.cli import main; sys.exit(main())"]  # `dume`


@pytest.fixture(scope="module")
def experts(expert_factory):
    return expert_factory("llama")


def held_out_router_inputs(expert: ExpertDirectory, basis: dict, documents: list[str]) -> list[torch.Tensor]:
    """Each layer's router inputs (real tokens only) for ``documents`` the statistics never saw: the expert's own
    model under the basis, as the merged model runs it with oracle routing."""
    model = load_decoder(expert, replacements=basis)
    family = detect_family(model.config.to_dict())
    data = pack_documents(documents, load_tokenizer(expert.path), SEQUENCE)
    mask = data.attention_mask.reshape(-1).bool()
    captured: list[torch.Tensor] = []
    handles = [getattr(layer, family.router_input).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output.reshape(-1, output.shape[-1])[mask].double()))
        for layer in model.layers]
    with torch.inference_mode():
        model(input_ids=data.input_ids, attention_mask=data.attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def test_two_gloo_processes_give_one_process_statistics_and_its_routing(experts):
    names = sorted(experts)
    directories = {name: ExpertDirectory(experts[name].model_dir, name) for name in names}
    basis = compute_basis(directories)
    tasks = [StatisticsTask(directories[name], DocumentStream(experts[name].data_path,
                                                              load_tokenizer(experts[name].model_dir), SEQUENCE))
             for name in names]
    one = dict(zip(names, packed_statistics_of(tasks, basis, batch_size=2)))
    two = dict(zip(names, packed_statistics_of(tasks, basis, batch_size=2, nproc=2)))
    size = int(directories[names[0]].config["hidden_size"]) + 1
    for name in names:
        assert token_count(two[name]) == token_count(one[name]) > size  # every token counted once, by one rank
        reference, reduced = from_upper_triangle(one[name], size), from_upper_triangle(two[name], size)
        diagonal = reference.diagonal(dim1=1, dim2=2)
        bound = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])  # |G_ij| <= sqrt(G_ii G_jj)
        assert float(((reduced - reference).abs() / bound).max()) < 1e-12, name
    routers = {n: solve_routers({name: from_upper_triangle(packed[name], size) for name in names})
               for n, packed in (("one", one), ("two", two))}
    agree = total = 0
    for index, name in enumerate(names):
        documents = synthetic_documents(name, 12, offset=500 + index)
        for layer, x in enumerate(held_out_router_inputs(directories[name], basis, documents)):
            choices = [(x @ routers[n][layer].weight.T).argmax(dim=1) for n in ("one", "two")]
            agree, total = agree + int((choices[0] == choices[1]).sum()), total + len(x)
    assert total > 500 and agree / total >= 0.999


def test_a_federation_of_two_process_members_publishes_the_bytes_of_merge_with_two_processes(experts, tmp_path):
    names = ("code", "math")
    fed = Federation(tmp_path / "federation")
    try:
        fed.init("--sequence-length", "64")
        fed.serve()
        tokens = fed.tokens(list(names))
        for name in names:
            fed.join(name, experts[name].model_dir, experts[name].data_path, tokens[name], "--nproc", "2")
        fed.wait_exact(list(names))
        exported = fed.export(tmp_path / "federated")
    finally:
        fed.close()
    expert_args = [arg for name in names
                   for arg in ("--expert", f"{name}={experts[name].model_dir}:{experts[name].data_path}")]
    subprocess.run([*DUME, "merge", *expert_args, "--sequence-length", "64", "--nproc", "2", "--out",
                    str(tmp_path / "merged")], env=environment(), stdin=subprocess.DEVNULL, check=True, timeout=300)
    assert not differing_files(exported, tmp_path / "merged")


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_worker_killed_ends_the_merge_with_one_line_and_stops_the_other(experts, tmp_path):
    long_data = tmp_path / "long.txt"
    long_data.write_text("\n".join(synthetic_documents("code", 3000)) + "\n")
    expert_args = [arg for name in ("code", "math") for arg in ("--expert", f"{name}={experts[name].model_dir}:"
                                                                          f"{long_data}")]
    merge = subprocess.Popen([*DUME, "merge", *expert_args, "--sequence-length", "16", "--batch-size", "1",
                              "--nproc", "2", "--out", str(tmp_path / "merged")],
                             env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_until(lambda: len(found := children_of(merge.pid)) == 2 and found, 60, "two workers")
        time.sleep(1.0)  # the workers import torch, join the group and start on their batches
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = merge.communicate(timeout=120)
    finally:
        merge.kill()
    assert merge.returncode == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("dume: error: statistics worker 1 of 2 was killed by SIGKILL"), stderr[-2000:]
    assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text()
    assert not (tmp_path / "merged").exists()
