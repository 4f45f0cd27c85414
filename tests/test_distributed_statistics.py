"""Statistics over several processes (``--nproc``): real worker processes joined by gloo on loopback.

Two workers sum the same batches as one process, in another order: the statistics agree within float64 rounding
and their routers route held-out tokens the same; the same N gives the same bytes, in ``dume merge`` and in a
federation; a worker that dies ends the command with one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dume.shared.errors import DumeError
from dume.shared.lab.harness import (
    FEDERATION_THREADS,
    Federation,
    differing_files,
    environment,
    torch_threads,
    wait_until,
)
from dume.shared.lab.tiny import synthetic_documents
from dume.shared.method.averaging import compute_basis, lazy_basis
from dume.shared.method.data import DocumentStream, load_tokenizer, pack_documents
from dume.shared.method.distributed_statistics import StatisticsTask, packed_statistics, packed_statistics_of
from dume.shared.method.expert import ExpertDirectory, load_decoder
from dume.shared.method.families import detect_family
from dume.shared.method.merge import merge, spilled_basis
from dume.shared.method.ridge import solve_routers
from dume.shared.method.settings import MergeSettings
from dume.shared.method.statistics import from_upper_triangle, layer_name, token_count
from dume.shared.method.statistics_checkpoint import StatisticsCheckpoint
from dume.shared.method.tensor_file import write_tensors
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import stored_tensors, tensor_bytes, tensor_entry

SEQUENCE = 64
# `dume merge`'s library call as each rank of `torchrun --nproc-per-node 2` runs it (the CLI takes two experts),
# counting how many averaged basis tensors the rank held at once (each is tracked until it is freed).
TORCHRUN_MERGE = """
import os, sys, weakref
from pathlib import Path
from dume.shared.method import averaging
from dume.shared.method.merge import merge
from dume.shared.method.settings import ExpertSpec, MergeSettings
model, data, out, sequence = sys.argv[1:]
alive, most = weakref.WeakSet(), [0]
def tracked_mean(experts, name, mean=averaging.canonical_mean):
    tensor = mean(experts, name)
    alive.add(tensor)
    most[0] = max(most[0], len(alive))
    return tensor
averaging.canonical_mean = tracked_mean
merge([ExpertSpec("code", Path(model), Path(data))], Path(out), MergeSettings(sequence_length=int(sequence)))
print(f"rank {os.environ['RANK']} held at most {most[0]} averaged basis tensors")
"""
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


def assert_within_rounding(packed: torch.Tensor, reference: torch.Tensor) -> None:
    """Every entry of G within float64 rounding of the reference's, relative to its bound sqrt(G_ii G_jj)."""
    size = int(round(((8 * packed.shape[-1] + 1) ** 0.5 - 1) / 2))
    mine, theirs = from_upper_triangle(packed, size), from_upper_triangle(reference, size)
    diagonal = theirs.diagonal(dim1=1, dim2=2)
    bound = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])  # |G_ij| <= sqrt(G_ii G_jj)
    assert float(((mine - theirs).abs() / bound).max()) < 1e-12


def test_a_member_with_two_gloo_workers_matches_one_process_and_merge_with_two_workers(experts, tmp_path):
    """One federation member joins with ``--nproc 2``: its uploaded statistics equal one process's within float64
    rounding (token counts exactly), the routers solved from them route held-out tokens as one process's do, and
    the exact version is byte-identical to ``dume merge --nproc 2`` and to ``dume merge`` under ``torchrun
    --nproc-per-node 2`` (three independent N=2 runs, the same bytes), where no rank holds the whole basis.
    One member keeps it short: its statistics are computed once (a second member would move the basis)."""
    fed = Federation(tmp_path / "federation", threads=FEDERATION_THREADS)
    try:
        fed.init("--sequence-length", str(SEQUENCE))
        fed.serve()
        fed.join("code", experts["code"].model_dir, experts["code"].data_path, fed.token("code"), "--nproc", "2",
                 "--once")
        fed.wait_exact(["code"])
        exported = fed.export(tmp_path / "federated")
    finally:
        fed.close()
    assert "by 2 worker processes" in fed.log("node-code").read_text()
    with torch_threads(FEDERATION_THREADS):
        merged = merge([experts["code"]], tmp_path / "merged", MergeSettings(sequence_length=SEQUENCE), nproc=2)
    assert not differing_files(exported, merged)
    # The merge started by torchrun: each rank takes its share of the statistics, rank 0 writes the same bytes.
    script = tmp_path / "merge_under_torchrun.py"
    script.write_text(TORCHRUN_MERGE)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(script), str(experts["code"].model_dir), str(experts["code"].data_path),
                            str(tmp_path / "torchrun"), str(SEQUENCE)],
                           env=environment(FEDERATION_THREADS), capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert not differing_files(merged, tmp_path / "torchrun")
    for rank in (0, 1):  # neither rank holds the whole basis: rank 0 spills it, rank 1 averages as its model loads
        assert f"rank {rank} held at most 1 averaged basis tensors" in ranks.stdout, ranks.stdout

    # The node's statistics (reduced from its two workers) against one process's, under the same basis.
    [uploaded] = (fed.workdir("code") / "statistics").glob("*.safetensors")
    tensors = load_file(uploaded)
    reduced_code = torch.stack([tensors[layer_name(layer)] for layer in range(len(tensors))])
    names = sorted(experts)
    directories = {name: ExpertDirectory(experts[name].model_dir, name) for name in names}
    basis = compute_basis({"code": directories["code"]})
    tasks = [StatisticsTask(directories[name], DocumentStream(experts[name].data_path,
                                                              load_tokenizer(experts[name].model_dir), SEQUENCE))
             for name in names]
    with torch_threads(FEDERATION_THREADS):
        one = dict(zip(names, packed_statistics_of(tasks, basis, MergeSettings().batch_size)))
    size = int(directories["code"].config["hidden_size"]) + 1
    assert token_count(reduced_code) == token_count(one["code"]) > size  # every token counted once, by one rank
    assert_within_rounding(reduced_code, one["code"])
    reduced = from_upper_triangle(reduced_code, size)

    # Routers over the three experts, with code's statistics from one process or from the two workers.
    full = {name: from_upper_triangle(one[name], size) for name in names}
    routers = {"one": solve_routers(full), "two": solve_routers({**full, "code": reduced})}
    agree = total = 0
    for index, name in enumerate(names):
        documents = synthetic_documents(name, 12, offset=500 + index)
        for layer, x in enumerate(held_out_router_inputs(directories[name], basis, documents)):
            choices = [(x @ routers[n][layer].weight.T).argmax(dim=1) for n in ("one", "two")]
            agree, total = agree + int((choices[0] == choices[1]).sum()), total + len(x)
    assert total > 500 and agree / total >= 0.999


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_worker_killed_ends_the_merge_with_one_line_and_stops_the_other(experts, tmp_path):
    expert_args = [arg for name in ("code", "math")
                   for arg in ("--expert", f"{name}={experts[name].model_dir}:{experts[name].data_path}")]
    command = subprocess.Popen([*DUME, "merge", *expert_args, "--nproc", "2", "--out", str(tmp_path / "merged")],
                             env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_until(lambda: len(found := children_of(command.pid)) == 2 and found, 60, "two workers")
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = command.communicate(timeout=120)
    finally:
        command.kill()
    assert command.returncode == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("dume: error: statistics worker 1 of 2 was killed by SIGKILL"), stderr[-2000:]
    assert "checkpoints" not in lines[-1]  # dume merge has none to resume from
    assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text()
    assert not (tmp_path / "merged").exists()


def ended(pid: int) -> bool:
    """Whether the process has exited (a zombie until its parent collects it)."""
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


def test_the_worker_killed_is_named_rather_than_its_peer_that_failed_in_turn(experts, tmp_path):
    """Rank 1 is killed by a signal Python has no name for, and rank 0 fails in turn (its collective's connection
    to rank 1 closed) before the command, stopped meanwhile, looks at either: the line names rank 1 and the signal
    (no traceback, no rank 0 error), and promises no checkpoints to resume from (dume merge has none)."""
    expert_args = [arg for name in ("code", "math")
                   for arg in ("--expert", f"{name}={experts[name].model_dir}:{experts[name].data_path}")]
    with open(tmp_path / "stderr", "w+") as stderr:  # a file: rank 0 writes to it while the command is stopped
        command = subprocess.Popen([*DUME, "merge", *expert_args, "--nproc", "2", "--out", str(tmp_path / "merged")],
                                   env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            workers = wait_until(lambda: len(found := children_of(command.pid)) == 2 and found, 60, "two workers")
            wait_until(lambda: "basis.safetensors" in Path(f"/proc/{workers[1]}/maps").read_text(), 120,
                       "rank 1 past the rendezvous (reading the basis)", every=0.01)
            os.kill(command.pid, signal.SIGSTOP)
            os.kill(workers[1], signal.SIGRTMIN + 6)
            wait_until(lambda: ended(workers[0]), 120, "rank 0 failing in turn")
            os.kill(command.pid, signal.SIGCONT)
            command.wait(timeout=120)
        finally:
            if command.poll() is None:  # the test failed midway: the command may still be stopped
                os.kill(command.pid, signal.SIGCONT)
                command.kill()
                command.wait()
        stderr.seek(0)
        said = stderr.read()
    assert command.returncode == 2, said[-2000:]
    lines = [line for line in said.splitlines() if line.strip()]
    number = int(signal.SIGRTMIN) + 6
    assert lines[-1] == f"dume: error: statistics worker 1 of 2 was killed by signal {number}: run again", said[-2000:]
    assert "Traceback" not in lines[-1] and not (tmp_path / "merged").exists()


def saved_batches(path: Path) -> int:
    try:
        with safe_open(path, framework="pt") as handle:
            return int(handle.metadata()["batches"])
    except Exception:  # not written yet, or being replaced
        return 0


def test_a_two_process_run_killed_mid_way_resumes_from_each_workers_checkpoint(experts, tmp_path, capfd):
    expert = ExpertDirectory(experts["code"].model_dir, "code")
    basis = compute_basis({"code": expert})
    (tmp_path / "long.txt").write_text("\n".join(synthetic_documents("code", 250)) + "\n")
    data = DocumentStream(tmp_path / "long.txt", load_tokenizer(expert.path), 16)
    partial = tmp_path / "statistics.safetensors.partial"
    rank_files = [tmp_path / f"statistics.safetensors.rank{rank}-of-2.partial" for rank in range(2)]

    def kill_rank_one() -> None:
        wait_until(lambda: saved_batches(rank_files[1]) >= 6, 120, "rank 1's checkpoint", every=0.01)
        os.kill(children_of(os.getpid())[1], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    every_batch = StatisticsCheckpoint(partial, "basis", every_batches=1)
    with pytest.raises(DumeError, match="statistics worker 1 of 2 was killed by SIGKILL"):
        packed_statistics(expert, basis, data, 1, checkpoint=every_batch, nproc=2, scratch=tmp_path)
    killer.join()
    assert all(saved_batches(path) >= 6 for path in rank_files)
    capfd.readouterr()
    resumed = packed_statistics(expert, basis, data, 1, checkpoint=StatisticsCheckpoint(partial, "basis"), nproc=2,
                                scratch=tmp_path)
    assert "resuming statistics from" in capfd.readouterr().err  # rank 0's own line; rank 1's goes to its log
    assert not any(path.exists() for path in rank_files)  # removed once the result is in
    assert not list(tmp_path.glob("dume-statistics-*"))  # nor is the workers' folder (basis, job, results) left
    # Neither a batch lost nor one counted twice: one process's token count, and its sums within float64 rounding.
    one = packed_statistics(expert, basis, data, 1)
    assert token_count(resumed) == token_count(one)
    assert_within_rounding(resumed, one)


def test_join_started_by_torchrun_is_refused_before_enrolling(experts, tmp_path):
    """N copies of `join` would each enrol and upload: under torchrun it refuses and names --nproc."""
    join = subprocess.run([sys.executable, "-m", "dume.node", "join", "--token", "dume1.unused", "--model",
                           str(experts["code"].model_dir), "--data", str(experts["code"].data_path), "--workdir",
                           str(tmp_path / "node"), "--nproc", "2"],
                          env={**environment(), "WORLD_SIZE": "2", "RANK": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert join.returncode == 2
    assert join.stderr.strip().splitlines() == [
        "dume-node: error: dume-node join was started by torchrun (WORLD_SIZE=2): start it once with --nproc 2 "
        "instead; it starts its statistics workers itself (one enrolment, one upload)"]
    assert not (tmp_path / "node").exists()


def test_a_worker_error_comes_back_as_one_line_naming_the_worker(experts, tmp_path):
    """Data that breaks in the workers (here binary; `join` and `merge` check it earlier, but a file may change
    under a long run) ends the run with the worker's own one-line error."""
    expert = ExpertDirectory(experts["code"].model_dir, "code")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\x00more\n")
    with pytest.raises(DumeError) as error:
        packed_statistics(expert, compute_basis({"code": expert}), DocumentStream(binary, load_tokenizer(expert.path),
                                                                                  SEQUENCE), 1, nproc=2)
    assert re.match(f"statistics worker [01] of 2 failed: {re.escape(str(binary))} line 1 holds a NUL byte",
                    str(error.value))  # both fail alike: whichever the command saw first
    assert "\n" not in str(error.value)


class CountedExpert(ExpertDirectory):
    """A real expert directory that counts each tensor's reads (averaging reads every member's rows)."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(path, name)
        self.reads: Counter[str] = Counter()

    def tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.reads[name] += 1
        return super().tensor_rows(name, start, stop)


class CountedBlobs(BlobStore):
    """A real blob store that counts the blobs it reads."""

    reads = 0

    def read_range_into(self, sha256: str, start: int, buffer: memoryview) -> None:
        self.reads += 1
        super().read_range_into(sha256, start, buffer)


def test_the_basis_file_reads_each_tensor_once_averaged_or_from_its_blob(experts, tmp_path):
    """``write_tensors`` (dume merge's spilled basis; a node's workers' copy of its blobs) takes its header from the
    tensors' shapes and dtypes, not their data: each shared tensor is averaged once (one read of each member's
    rows, the tiny tensors being one block), each blob read once, and the file holds safetensors' bytes."""
    counted = {name: CountedExpert(spec.model_dir, name) for name, spec in experts.items()}
    basis = compute_basis({name: ExpertDirectory(spec.model_dir, name) for name, spec in experts.items()})
    save_file(basis, str(tmp_path / "expected.safetensors"))
    write_tensors(lazy_basis(counted), tmp_path / "averaged.safetensors")
    for expert in counted.values():
        assert expert.reads == Counter(expert.shared_names), expert.name
    blobs = CountedBlobs(tmp_path / "blobs")
    entries = [tensor_entry(name, tensor, blobs.put_bytes(tensor_bytes(tensor))) for name, tensor in basis.items()]
    write_tensors(stored_tensors(entries, blobs), tmp_path / "stored.safetensors")
    assert blobs.reads == len(entries)
    expected = (tmp_path / "expected.safetensors").read_bytes()
    assert (tmp_path / "averaged.safetensors").read_bytes() == expected
    assert (tmp_path / "stored.safetensors").read_bytes() == expected


def test_merge_workers_read_the_spilled_basis_rather_than_a_copy(experts, tmp_path):
    """``dume merge --nproc 2`` spills the basis once: its workers are given that file to read, and their folder
    (job, results) holds no second copy of it."""
    expert = ExpertDirectory(experts["code"].model_dir, "code")
    data = DocumentStream(experts["code"].data_path, load_tokenizer(expert.path), SEQUENCE)
    spill = tmp_path / "spill"
    spill.mkdir()
    with spilled_basis({"code": expert}, spill) as basis, \
            closing(packed_statistics_of([StatisticsTask(expert, data)], basis, 4, nproc=2, scratch=spill)) as results:
        packed = next(results)  # the workers' folder stays until the generator is closed
        [folder] = spill.glob("dume-statistics-*")
        assert json.loads((folder / "job.json").read_text())["basis_file"] == str(spill / "basis.safetensors")
        assert sorted(path.name for path in folder.iterdir()) == ["job.json", "rank1.log", "result-0.safetensors"]
    assert token_count(packed) > 0
