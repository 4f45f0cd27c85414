"""One member's statistics collected by several processes (``--nproc N``), reduced to one result with
torch.distributed.

The command (``dume merge``, ``dume-node join`` or ``update``) stays one process holding its state and its gRPC
channels; for each statistics run it starts N fresh workers (``python -m`` this module, never a fork of itself)
with the torchrun environment convention (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Rank r loads
the model (on ``cuda:r`` where the placement is a GPU one, else on the CPU with its share of the CPU threads),
reads the same deterministic batch stream and sums batches r, r+N, r+2N... (``statistics.Shard``). The float64
sums are then gathered to rank 0 a layer at a time and added in rank order, so the bytes depend on N but not on
the collective's algorithm (gloo on the CPU, NCCL on GPUs); rank 0 writes them and the command reads them back.

What "exact" means across N: the same inputs, settings and N on the same machine give the same bytes. Another N
sums the batches in another order, which moves G by float64 rounding, and on the CPU gives each worker a share of
the threads, which moves the float32 forward and products as any change of thread count does (about 1e-7 of
sqrt(G_ii G_jj)). A federation's exact version equals ``dume merge`` only when both ran with the same N.

A worker that fails (bad data, out of memory, killed) ends the run at once: the command watches its workers,
stops the others and raises one line naming the worker and its error. A worker whose command died stops itself.
Each rank checkpoints its own partial sums (its rank and N in the fingerprint), so a killed run resumes with the
same N; the checkpoints are removed only once the reduced result is written.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from dume.shared.errors import DumeError
from dume.shared.files import FULL, atomic_path
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.lazy_tensors import LazyTensors, file_tensors
from dume.shared.method.placement import CPU, Placement
from dume.shared.method.settings import CHECKPOINT_EVERY_SECONDS
from dume.shared.method.statistics import (
    Shard,
    layer_name,
    packed_statistics_under_basis,
    statistics_tensors,
    token_count,
)
from dume.shared.method.statistics_checkpoint import StatisticsCheckpoint
from dume.shared.method.tensor_file import write_tensors

# How long a rank waits for the others at the rendezvous and the reduction. Ranks finish within about one batch
# of each other (more after an uneven resume: up to a checkpoint interval); a dead worker is caught sooner by the
# command watching its workers, so this only bounds a hung one.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
WATCH_SECONDS = 0.2  # how often the command looks at its workers
STOP_SECONDS = 10.0  # how long a stopped worker gets before SIGKILL
DISK_FULL_EXIT = 28  # a worker's exit code for a full disk (ENOSPC's number): no error file can be written then
SCRATCH_PREFIX = "dume-statistics-"  # the workers' folder (job, results, basis copy), removed after each run


@dataclass(frozen=True)
class StatisticsTask:
    """One statistics run: an expert over one dataset, with its checkpoint if it has one."""

    expert: ExpertDirectory
    data: DocumentStream
    checkpoint: StatisticsCheckpoint | None = None


@dataclass(frozen=True)
class WorkerRun:
    """A task as the workers read it (JSON): paths and settings, and where rank 0 writes the result."""

    expert_dir: str
    expert_name: str
    data_path: str
    sequence_length: int
    max_tokens: int | None
    result_file: str
    checkpoint_path: str | None = None
    checkpoint_inputs: str = ""
    checkpoint_every_seconds: float = CHECKPOINT_EVERY_SECONDS
    checkpoint_every_batches: int | None = None

    def checkpoint(self, shard: Shard) -> StatisticsCheckpoint | None:
        if self.checkpoint_path is None:
            return None
        checkpoint = StatisticsCheckpoint(Path(self.checkpoint_path), self.checkpoint_inputs,
                                          self.checkpoint_every_seconds, self.checkpoint_every_batches)
        return rank_checkpoint(checkpoint, shard)


@dataclass(frozen=True)
class WorkerJob:
    """Everything the workers need, written as JSON for them: the basis file, the settings and the runs (one per
    task, done in order by the same workers: one start-up and one rendezvous for all of a merge's statistics)."""

    basis_file: str
    batch_size: int
    device: str
    dtype: str
    threads: int
    runs: list[WorkerRun]


def rank_checkpoint(checkpoint: StatisticsCheckpoint, shard: Shard) -> StatisticsCheckpoint:
    """Rank r's own checkpoint beside the run's: ``NAME.rank<r>-of-<N>.partial`` for ``NAME.partial``."""
    stem = checkpoint.path.name.removesuffix(".partial")
    return replace(checkpoint, path=checkpoint.path.with_name(f"{stem}.rank{shard.rank}-of-{shard.world}.partial"))


def check_processes(nproc: int, placement: Placement) -> None:
    """Refuses a process count this machine cannot give each worker a device or a CPU core for."""
    device = placement.torch_device()
    if nproc == 1:
        return
    if launched_by_torchrun():
        raise DumeError(f"--nproc {nproc} under torchrun: torchrun already started the processes; drop --nproc")
    if device.type == "cuda":
        if device.index is not None:
            raise DumeError(f"--nproc {nproc} with --device {placement.device} would put every worker on one GPU: "
                            "use --device cuda (worker r runs on cuda:r)")
        if nproc > torch.cuda.device_count():
            raise DumeError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}: "
                            "use at most that many, or --device cpu")
    elif nproc > (os.cpu_count() or 1):
        raise DumeError(f"--nproc {nproc} exceeds this machine's {os.cpu_count()} CPU cores: use at most that many")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks torchrun started (WORLD_SIZE > 1 in the environment)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1


def writes_output() -> bool:
    """Whether this process writes the command's output: always, except a torchrun rank other than 0."""
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0


def check_not_under_torchrun(command: str) -> None:
    """Refuses a command that must run once per host (it enrols, it uploads) when torchrun started N copies."""
    if launched_by_torchrun():
        world = os.environ["WORLD_SIZE"]
        raise DumeError(f"{command} was started by torchrun (WORLD_SIZE={world}): start it once with --nproc "
                        f"{world} instead; it starts its statistics workers itself (one enrolment, one upload)")


def packed_statistics(expert: ExpertDirectory, basis: Mapping[str, torch.Tensor], data: DocumentStream,
                      batch_size: int, placement: Placement = CPU, checkpoint: StatisticsCheckpoint | None = None,
                      nproc: int = 1, scratch: Path | None = None) -> torch.Tensor:
    """``packed_statistics_under_basis`` over ``nproc`` worker processes (in this process when 1)."""
    tasks = [StatisticsTask(expert, data, checkpoint)]
    with closing(packed_statistics_of(tasks, basis, batch_size, placement, nproc, scratch)) as results:
        return next(results)  # closing: the workers' folder goes now, not when the generator is collected


def packed_statistics_of(tasks: Sequence[StatisticsTask], basis: Mapping[str, torch.Tensor], batch_size: int,
                         placement: Placement = CPU, nproc: int = 1,
                         scratch: Path | None = None) -> Iterator[torch.Tensor | None]:
    """Each task's packed statistics under ``basis``, in order: in this process when ``nproc`` is 1 (each computed
    as it is asked for), else by ``nproc`` workers started once for all of them (each read back from rank 0's file
    as it is asked for). The workers read a basis that is one safetensors file already (``LazyTensors.file``:
    ``dume merge``'s spilled basis) from that file, any other from a copy written under ``scratch`` (default: the
    system's temporary folder), where their results go too. In a process torchrun started, this rank takes its
    share and the statistics are reduced to rank 0: there they are given, and None on the other ranks."""
    if launched_by_torchrun():
        check_processes(nproc, placement)
        yield from _statistics_as_torchrun_rank(tasks, basis, batch_size, placement)
        return
    if nproc == 1:
        for task in tasks:
            yield packed_statistics_under_basis(task.expert, basis, task.data, batch_size, placement, task.checkpoint)
        return
    check_processes(nproc, placement)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=scratch) as folder:
        folder = Path(folder)
        basis_file = basis.file if isinstance(basis, LazyTensors) else None
        if basis_file is None:
            basis_file = folder / "basis.safetensors"
            write_tensors(basis, basis_file)
        runs = [WorkerRun(str(task.expert.path), task.expert.name, str(task.data.path), task.data.sequence_length,
                          task.data.max_tokens, str(folder / f"result-{index}.safetensors"),
                          **_checkpoint_fields(task.checkpoint))
                for index, task in enumerate(tasks)]
        job = WorkerJob(str(basis_file), batch_size, placement.device, placement.dtype,
                        max(1, torch.get_num_threads() // nproc), runs)
        (folder / "job.json").write_text(json.dumps(asdict(job)))
        run_workers(folder / "job.json", nproc)
        for task, run in zip(tasks, runs):
            packed = read_result(Path(run.result_file))
            if task.checkpoint is not None:
                for rank in range(nproc):
                    rank_checkpoint(task.checkpoint, Shard(rank, nproc)).remove()
            if not token_count(packed):
                raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's "
                                "tokenizer")
            yield packed
            del packed


def _statistics_as_torchrun_rank(tasks: Sequence[StatisticsTask], basis: Mapping[str, torch.Tensor],
                                 batch_size: int, placement: Placement) -> Iterator[torch.Tensor | None]:
    """This rank's share of each task, reduced to rank 0: the reduced statistics on rank 0, None on the others
    (``dume merge`` started by torchrun: every rank runs the command, only rank 0 writes)."""
    import torch.distributed as dist

    shard, local_rank = shard_from_environment()
    placement = rank_placement(placement, local_rank)
    if not dist.is_initialized():
        init_process_group(placement)
    for task in tasks:
        checkpoint = rank_checkpoint(task.checkpoint, shard) if task.checkpoint is not None else None
        packed = packed_statistics_under_basis(task.expert, basis, task.data, batch_size, placement, checkpoint,
                                               shard)
        total = reduce_to_rank_zero(packed, placement.torch_device())
        del packed
        if checkpoint is not None:
            dist.barrier()  # every rank's sums are in rank 0's result: the checkpoints may go
            checkpoint.remove()
        if total is not None and not token_count(total):
            raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's "
                            "tokenizer")
        yield total


def _checkpoint_fields(checkpoint: StatisticsCheckpoint | None) -> dict[str, object]:
    if checkpoint is None:
        return {}
    return {"checkpoint_path": str(checkpoint.path), "checkpoint_inputs": checkpoint.inputs,
            "checkpoint_every_seconds": checkpoint.every_seconds,
            "checkpoint_every_batches": checkpoint.every_batches}


def read_result(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return torch.stack([tensors[layer_name(layer)] for layer in range(len(tensors))])


# -- the command's side: start the workers, watch them -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_workers(job_file: Path, nproc: int) -> None:
    """Starts ``nproc`` workers on ``job_file`` and waits for them; the first to fail stops the rest and raises.
    Rank 0 shares this process's stderr (its progress bar); the others' output goes to files beside the job."""
    folder, job = job_file.parent, json.loads(job_file.read_text())
    common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
              "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": str(job["threads"]),
              "DUME_PARENT_PID": str(os.getpid())}
    resumable = any(run.get("checkpoint_path") for run in job["runs"])
    workers: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            log = None if rank == 0 else open(folder / f"rank{rank}.log", "wb")
            env = {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            workers.append(subprocess.Popen([sys.executable, "-m", __name__, str(job_file)], env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log))
            if log is not None:
                log.close()
        _wait_for(workers, folder, resumable)
    finally:
        _stop(workers)


def _wait_for(workers: list[subprocess.Popen], folder: Path, resumable: bool) -> None:
    """Returns when every worker succeeded; raises at the first failure, naming its cause (``_cause``). A full disk
    is an OSError (ENOSPC) on the workers' folder, which the command turns into its own one line."""
    while True:
        failed = _failed(workers)
        if failed:
            time.sleep(WATCH_SECONDS)  # a worker killed at the same moment as another failed is then seen too
            failed = _failed(workers)
            rank = _cause(failed)
            if failed[rank] == DISK_FULL_EXIT:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
            raise DumeError(_failure(rank, len(workers), failed[rank], folder, resumable))
        if all(worker.poll() == 0 for worker in workers):
            return
        time.sleep(WATCH_SECONDS)


def _failed(workers: list[subprocess.Popen]) -> dict[int, int]:
    """Rank -> exit code of each worker that has ended with an error (negative: killed by that signal)."""
    codes = {rank: worker.poll() for rank, worker in enumerate(workers)}
    return {rank: code for rank, code in codes.items() if code not in (None, 0)}


def _cause(failed: dict[int, int]) -> int:
    """The failed worker to name: one killed by a signal, then one whose disk filled, then the lowest rank. When a
    worker dies its peers fail in turn (the collective's connection to it closed), so the lowest rank may well be
    a consequence; a signal or a full disk never is."""
    return min(failed, key=lambda rank: (failed[rank] >= 0, failed[rank] != DISK_FULL_EXIT, rank))


def _failure(rank: int, world: int, code: int, folder: Path, resumable: bool) -> str:
    """One line for a failed worker: its own error line, or the signal that killed it, and running again resumes
    only where the run has checkpoints (``dume merge`` has none)."""
    if code < 0:
        name = signal_name(-code)
        cause = " (out of memory? see the kernel log)" if -code == signal.SIGKILL else ""
        resume = "; the statistics resume from the workers' checkpoints" if resumable else ""
        return f"statistics worker {rank} of {world} was killed by {name}{cause}: run again{resume}"
    error = folder / f"rank{rank}.error"
    message = error.read_text().strip() if error.is_file() else ""
    return f"statistics worker {rank} of {world} failed: {message or f'it exited with code {code}'}"


def signal_name(number: int) -> str:
    """SIGKILL for 9; ``signal 40`` for a number Python has no name for (a real-time signal)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _stop(workers: list[subprocess.Popen]) -> None:
    """Stops every worker still running: SIGTERM, then SIGKILL after ``STOP_SECONDS``."""
    running = [worker for worker in workers if worker.poll() is None]
    for worker in running:
        worker.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for worker in running:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# -- the worker's side --------------------------------------------------------------------------------------------
def shard_from_environment() -> tuple[Shard, int]:
    """This process's rank and world size, and its local rank, as torchrun (or ``run_workers``) set them."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return Shard(rank, world), int(os.environ.get("LOCAL_RANK", rank))


def rank_placement(placement: Placement, local_rank: int) -> Placement:
    """Where rank r runs: ``cuda:LOCAL_RANK`` when the placement is a GPU one, else the placement itself."""
    if placement.torch_device().type == "cuda":
        return Placement(f"cuda:{local_rank}", placement.dtype)
    return placement


def init_process_group(placement: Placement) -> None:
    """Joins the ranks (env:// rendezvous): NCCL on GPUs, gloo on the CPU."""
    import torch.distributed as dist

    device = placement.torch_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)


def reduce_to_rank_zero(packed: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The ranks' packed sums added on rank 0 (None elsewhere), a layer at a time: gathered, then added in rank
    order, so the bytes do not depend on how the backend would have reduced them."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.empty_like(packed) if rank == 0 else None
    for layer in range(len(packed)):
        mine = packed[layer].to(device)
        parts = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, parts, dst=0)
        if parts is not None:
            summed = parts[0]
            for part in parts[1:]:
                summed += part
            total[layer].copy_(summed)
        del mine, parts
    return total


def run_worker(job: WorkerJob, shard: Shard, local_rank: int) -> None:
    """One rank: its share of each run's statistics, then the run's reduction; rank 0 writes each result."""
    import torch.distributed as dist

    torch.set_num_threads(job.threads)
    placement = rank_placement(Placement(job.device, job.dtype), local_rank)
    init_process_group(placement)
    try:
        with file_tensors(Path(job.basis_file)) as basis:
            for run in job.runs:
                expert = ExpertDirectory(Path(run.expert_dir), run.expert_name)
                data = DocumentStream(Path(run.data_path), load_tokenizer(expert.path), run.sequence_length,
                                      run.max_tokens)
                packed = packed_statistics_under_basis(expert, basis, data, job.batch_size, placement,
                                                       run.checkpoint(shard), shard)
                total = reduce_to_rank_zero(packed, placement.torch_device())
                if total is not None:
                    with atomic_path(Path(run.result_file)) as partial:
                        write_tensors(statistics_tensors(total), partial)  # a full disk: an OSError (ENOSPC)
                del packed, total
    finally:
        dist.destroy_process_group()


def read_job(path: Path) -> WorkerJob:
    fields = json.loads(path.read_text())
    return WorkerJob(**{**fields, "runs": [WorkerRun(**run) for run in fields["runs"]]})


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when the command that started it is gone (killed without stopping its workers)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class _Stopped(BaseException):
    """SIGTERM from the command: unwinds the worker so that a checkpoint being written is not left half-made."""


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise _Stopped


def main(argv: list[str]) -> int:
    """The worker's entry point: ``python -m dume.shared.method.distributed_statistics JOB``. An error becomes one
    line in ``rank<r>.error`` beside the job, for the command to report; a full disk, where that file could not be
    written either, becomes the exit code ``DISK_FULL_EXIT``."""
    job_file = Path(argv[0])
    shard, local_rank = shard_from_environment()
    if "DUME_PARENT_PID" in os.environ:
        _exit_with_parent(int(os.environ["DUME_PARENT_PID"]))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_worker(read_job(job_file), shard, local_rank)
    except _Stopped:  # the command stops this worker: another failed, or the command itself was stopped
        return 128 + signal.SIGTERM
    except BaseException as error:  # one line for the command; it stops the other workers
        if isinstance(error, OSError) and error.errno in FULL:
            return DISK_FULL_EXIT
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = message if isinstance(error, DumeError) else f"{type(error).__name__}: {message}".rstrip(": ")
        (job_file.parent / f"rank{shard.rank}.error").write_text(text + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
