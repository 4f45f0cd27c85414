"""Real coordinator and node processes on loopback ports, driven through their command lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dume.coordinator.cli import admin_stubs, status_object
from dume.coordinator.state_dir import StateDir
from dume.v1 import federation_pb2 as pb

COORDINATOR = [sys.executable, "-c", "import sys; from dume.coordinator.cli import main; sys.exit(main())"]
NODE = [sys.executable, "-c", "import sys; from dume.node.cli import main; sys.exit(main())"]
DUME = [sys.executable, "-c", "import sys; from dume.shared.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command[3:]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.3)


class Federation:
    """A coordinator state directory with fixed loopback ports, its daemon, and node processes."""

    def __init__(self, root: Path, *settings: str) -> None:
        self.root = root
        self.state = root / "coordinator"
        self.daemon: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        run([*COORDINATOR, "init", "--state", str(self.state), "--listen", f"127.0.0.1:{free_port()}",
             "--enrolment-listen", f"127.0.0.1:{free_port()}", "--sequence-length", "64", *settings])

    def start(self) -> None:
        (self.state / "daemon.json").unlink(missing_ok=True)
        log = open(self.root / "coordinator.log", "ab")
        self.daemon = subprocess.Popen([*COORDINATOR, "serve", "--state", str(self.state)], stdout=log,
                                       stderr=subprocess.STDOUT)
        wait_until(lambda: (self.state / "daemon.json").exists(), 60, "the coordinator to listen")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signum)
        return self.daemon.wait(timeout=60)

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([*COORDINATOR, *args, "--state", str(self.state)], check=check)

    def token(self, node: str, ttl_seconds: float = 3600) -> str:
        """In-process admin call (the CLI's own stubs), to keep the tests quick; `token` itself is tested too."""
        admin, _ = admin_stubs(StateDir(self.state))
        return admin.CreateToken(pb.TokenRequest(node=node, ttl_seconds=ttl_seconds)).token

    def status(self) -> dict:
        return status_object(StateDir(self.state))

    def join(self, name: str, model: Path, data: Path, token: str | None = None, *extra: str) -> subprocess.Popen:
        command = [*NODE, "join", "--model", str(model), "--data", str(data), "--workdir", str(self.workdir(name)),
                   *(["--token", token] if token else []), *extra]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.nodes.append(process)
        return process

    def workdir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def wait_exact(self, members: list[str], timeout: float = 180) -> dict:
        """Until the latest version is exact over exactly ``members``, all with current statistics."""
        def done() -> bool:
            status = self.status()
            active = sorted(m["name"] for m in status["members"] if m["state"] == "active")
            return status["exact"] and active == sorted(members) and all(
                m["stats_current"] for m in status["members"] if m["state"] == "active")
        wait_until(done, timeout, f"an exact version over {members}")
        return self.status()

    def publications(self) -> list[dict]:
        """The audit log's publish entries: {version, exact, members}."""
        entries = []
        for line in self.admin("audit").stdout.splitlines():
            fields = line.split()
            if fields[3] == "publish":
                entries.append({"version": int(fields[4]), **json.loads(fields[5])})
        return entries

    def close(self) -> None:
        for process in [*self.nodes, self.daemon]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def terminate(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
