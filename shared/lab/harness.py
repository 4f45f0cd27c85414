"""Real ``dume-coordinator`` and ``dume-node`` processes on loopback, driven through their command lines.

The one process harness of ``dume demo``, the quality benchmark and the federation tests: they differ only in
where a node's output goes (a log the demo keeps, or pipes a test reads) and how many threads the processes use.
Every process is started as ``python -m dume.node`` / ``python -m dume.coordinator`` with this interpreter, so no
console script needs to be on PATH. ``close`` stops whatever is still running, so nothing outlives a run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from transformers.utils import logging as transformers_logging

from dume.coordinator.cli import admin_stubs, status_object
from dume.coordinator.state_dir import StateDir
from dume.shared.errors import DumeError
from dume.v1 import federation_pb2 as pb

# The demo's and the benchmark's coordinator and nodes run with one torch thread each, so three or four nodes
# share 2 cores without oversubscription (at torch's default of a thread per core a node's statistics took
# 40-55 s instead of 1-4 s). An in-process reference merge must use the same count (`torch_threads`): a float32
# forward may differ across thread counts, and the byte-for-byte checks would see it.
FEDERATION_THREADS = 1

START_SECONDS = 60.0  # for the daemon to bind and write daemon.json
CONVERGE_SECONDS = 240.0  # for an exact version over the expected members
EXIT_SECONDS = 30.0  # for a process to exit once refused or signalled
POLL_SECONDS = 1.0  # between status reads while waiting for a version
COORDINATOR = "coordinator"

T = TypeVar("T")


def command(app: str, *args: str) -> list[str]:
    """``dume-<app> args`` as this interpreter runs it."""
    return [sys.executable, "-m", f"dume.{app}", *args]


def environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment, offline and without progress bars; ``threads`` caps torch's threads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def last_logged(path: Path) -> str:
    """The last line a process wrote to its log, for an error message."""
    try:
        return last_line(path.read_text(errors="replace"))
    except OSError:
        return "(no log)"


def cli(app: str, *args: str, env: dict[str, str] | None = None, log: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Runs one CLI call to completion, its output captured (or in ``log``); with ``check``, raises with the last
    line it printed when it fails."""
    run = command(app, *args)
    env = env or environment()
    if log is None:
        result = subprocess.run(run, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        said = last_line(result.stderr or result.stdout)
    else:
        with open(log, "wb") as handle:
            result = subprocess.run(run, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
        said = f"{last_logged(log)}; see {log}"
    if check and result.returncode != 0:
        raise DumeError(f"`dume-{app} {args[0]}` failed (exit {result.returncode}): {said}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, every: float = 0.2) -> T:
    """Polls ``condition`` until it returns something truthy, and returns that; raises after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (reached := condition()):
        if time.monotonic() > deadline:
            raise DumeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return reached


def describe(status: dict[str, Any]) -> str:
    """One line for a status: the version and what each member is doing."""
    version = status["version"]
    head = f"version {version} ({'exact' if status['exact'] else 'provisional'})" if version else "no version yet"
    members = []
    for member in status["members"]:
        if member["state"] == "active":
            doing = "statistics current" if member["stats_current"] else "computing statistics"
        elif member["state"] == "enrolled":  # an owner sends its model first; a contributor its first statistics
            doing = "uploading its model" if member.get("expert", member["name"]) == member["name"] else \
                "computing statistics"
        else:
            doing = member["state"]
        members.append(f"{member['name']} {doing}")
    return f"{head}: {', '.join(members) if members else 'no members yet'}"


def exact_over(status: dict[str, Any], members: list[str], contributions: list[str] | None = None) -> bool:
    """Whether the latest version is exact over exactly ``members``, all active with current statistics, and holds
    every contribution recorded, all current (exactly ``contributions``, "node/dataset", when given)."""
    active = [member for member in status["members"] if member["state"] == "active"]
    recorded = sorted(f"{c['node']}/{c['dataset']}" for expert in status["experts"] for c in expert["contributions"])
    current = all(c["current"] for expert in status["experts"] for c in expert["contributions"])
    return bool(status["exact"] and status["version"] and sorted(m["name"] for m in active) == sorted(members)
                and all(member["stats_current"] for member in active) and current
                and sorted(status["version_contributions"]) == recorded
                and (contributions is None or recorded == sorted(contributions)))


class Federation:
    """A coordinator state directory under ``root``, its daemon, and node processes, each known by a label
    (``coordinator``, ``node-<name>``).

    Background output goes to ``root/logs/<label>.log``; with ``pipe_nodes`` a node's stdout and stderr are pipes
    the caller reads instead. ``threads`` caps every process's torch threads; ``say`` reports status changes.
    """

    def __init__(self, root: Path, threads: int | None = None, pipe_nodes: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.root = root
        self.state = root / "coordinator"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = environment(threads)
        self.pipe_nodes = pipe_nodes
        self.say = say
        self.processes: dict[str, subprocess.Popen] = {}
        self._handles: list[IO[bytes]] = []
        self._shown = ""

    # -- one-shot admin calls -------------------------------------------------------------------------------------
    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``dume-coordinator args --state STATE``, to completion."""
        return cli(COORDINATOR, *args, "--state", str(self.state), env=self.env, check=check)

    def init(self, *settings: str, fixed_ports: bool = False) -> None:
        """``dume-coordinator init`` on loopback with the merge ``settings``. The system picks the ports when the
        daemon binds; ``fixed_ports`` picks free ones now instead, so a restarted daemon listens where its nodes
        expect it."""
        ports = (free_port(), free_port()) if fixed_ports else (0, 0)
        self.admin("init", "--listen", f"127.0.0.1:{ports[0]}", "--enrolment-listen", f"127.0.0.1:{ports[1]}",
                   *settings)

    def tokens(self, names: list[str]) -> dict[str, str]:
        """One-time join tokens from ``dume-coordinator token``, one call per node side by side (each pays the
        seconds of importing torch)."""
        with ThreadPoolExecutor(len(names)) as pool:
            issued = list(pool.map(lambda name: self.admin("token", "--node", name).stdout.strip(), names))
        return dict(zip(names, issued, strict=True))

    def token(self, node: str, ttl_seconds: float = 3600) -> str:
        """A join token made in this process over the CLI's own admin channel: quick, for tests that make many."""
        admin, _ = admin_stubs(StateDir(self.state))
        return admin.CreateToken(pb.TokenRequest(node=node, ttl_seconds=ttl_seconds)).token

    def export(self, out: Path, version: int | None = None) -> Path:
        """``dume-coordinator export`` of ``version`` (default the latest) to ``out``."""
        self.admin("export", "--out", str(out), *(["--version", str(version)] if version else []))
        return out

    def publications(self) -> list[dict[str, Any]]:
        """The audit log's publish entries: {version, exact, members, ...}."""
        entries = []
        for line in self.admin("audit").stdout.splitlines():
            fields = line.split()
            if fields[3] == "publish":
                entries.append({"version": int(fields[4]), **json.loads(fields[5])})
        return entries

    # -- background processes -------------------------------------------------------------------------------------
    def _start(self, label: str, app: str, *args: str, pipe: bool = False) -> subprocess.Popen:
        """Starts a background process, its output in logs/<label>.log (or in text pipes)."""
        if label in self.processes and self.processes[label].poll() is None:
            raise DumeError(f"{label} is already running")
        if pipe:
            output: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        else:
            self._handles.append(open(self.log(label), "ab"))
            output = {"stdout": self._handles[-1], "stderr": subprocess.STDOUT}
        self.processes[label] = subprocess.Popen(command(app, *args), env=self.env, stdin=subprocess.DEVNULL,
                                                 **output)
        return self.processes[label]

    def log(self, label: str) -> Path:
        return self.logs / f"{label}.log"

    def serve(self, *extra: str) -> None:
        """``dume-coordinator serve [extra]`` in the background; returns once the daemon listens."""
        (self.state / "daemon.json").unlink(missing_ok=True)
        self._start(COORDINATOR, COORDINATOR, "serve", "--state", str(self.state), *extra)
        wait_until(self._listening, START_SECONDS, f"the coordinator to listen (see {self.log(COORDINATOR)})")

    def _listening(self) -> bool:
        self.check_running([])
        return (self.state / "daemon.json").exists()

    def address(self) -> str:
        """Where the running daemon serves the federation."""
        return json.loads((self.state / "daemon.json").read_text())["listen"]

    def join(self, name: str, model: Path | None, data: Path | str | list[Path | str], token: str | None,
             *extra: str) -> subprocess.Popen:
        """``dume-node join`` for node ``name`` in the background, its workdir under nodes/: an owner with its
        ``model``, a contributor without; ``data`` one dataset or several (``[NAME=]PATH`` each); no token to
        rejoin from the workdir."""
        datasets = data if isinstance(data, list) else [data]
        return self._start(f"node-{name}", "node", "join", *(["--token", token] if token else []),
                           *(["--model", str(model)] if model is not None else []),
                           *(arg for item in datasets for arg in ("--data", str(item))),
                           "--workdir", str(self.workdir(name)), *extra, pipe=self.pipe_nodes)

    def workdir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def check_running(self, members: list[str]) -> None:
        """Raises if the coordinator or the node of one of ``members`` has exited with an error."""
        for label in (COORDINATOR, *(f"node-{name}" for name in members)):
            code = self.processes[label].poll() if label in self.processes else None
            if code not in (None, 0):
                raise DumeError(f"{label} exited early (exit {code}): {last_logged(self.log(label))} "
                                f"(logs in {self.logs})")

    # -- status ---------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The object `dume-coordinator status --json` prints, read in this process over the same admin channel
        (each `python -m dume.coordinator` pays ~4 s of CPU importing torch, which would starve the nodes)."""
        return status_object(StateDir(self.state))

    def wait_exact(self, members: list[str], timeout: float = CONVERGE_SECONDS,
                   contributions: list[str] | None = None) -> dict[str, Any]:
        """Polls the status, reporting each change, until the latest version is exact over exactly ``members`` (and
        ``contributions``, when given); returns that status. Fails early if the coordinator or one of those
        members' nodes fails."""
        return wait_until(lambda: self._exact_status(members, contributions), timeout,
                          f"an exact version over {', '.join(members)} (logs in {self.logs})", POLL_SECONDS)

    def _exact_status(self, members: list[str], contributions: list[str] | None = None) -> dict[str, Any] | None:
        self.check_running(members)
        status = self.status()
        if (line := describe(status)) != self._shown:
            self.say(line)
            self._shown = line
        return status if exact_over(status, members, contributions) else None

    # -- stopping -------------------------------------------------------------------------------------------------
    def exited(self, label: str, timeout: float = EXIT_SECONDS) -> int | None:
        """The exit code once ``label`` exits by itself within ``timeout``; None if it still runs."""
        try:
            return self.processes[label].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, label: str = COORDINATOR, signum: int = signal.SIGTERM) -> int:
        """Sends ``signum`` if it still runs, then returns the exit code (SIGKILL after EXIT_SECONDS, reported as a
        negative code as usual)."""
        process = self.processes[label]
        if process.poll() is None:
            process.send_signal(signum)
        if self.exited(label) is None:
            process.kill()
            process.wait()
        return process.returncode

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to every process, the nodes first and the coordinator last; their exit codes by label."""
        order = sorted(self.processes, key=lambda label: (label == COORDINATOR, label))
        return {label: self.stop(label) for label in order}

    def close(self) -> None:
        """Stops everything still running, then closes the logs."""
        self.stop_all()
        for handle in self._handles:
            handle.close()


# -- the in-process side of a lab run ------------------------------------------------------------------------------
@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the block with ``count`` torch threads, as the federation's processes run."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers for every model a lab run opens."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def differing_files(left: Path, right: Path) -> list[str]:
    """Relative paths whose bytes differ (or that exist on one side only); empty when the trees are identical."""
    files = {path.relative_to(left).as_posix() for path in left.rglob("*") if path.is_file()}
    files |= {path.relative_to(right).as_posix() for path in right.rglob("*") if path.is_file()}
    return sorted(name for name in files
                  if not ((left / name).is_file() and (right / name).is_file()
                          and (left / name).read_bytes() == (right / name).read_bytes()))
