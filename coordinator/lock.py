"""One daemon per state directory: ``serve`` holds an exclusive ``flock`` on ``daemon.lock`` for its whole life.

The kernel drops the lock when the process dies, however it dies (SIGKILL included), so a stale lock file never
blocks a restart; the pid written into it only names the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dume.shared.errors import DumeError


class StateLock:
    """The exclusive lock on a state directory; ``acquire`` refuses with the holder's pid when another has it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DumeError(f"another coordinator (pid {holder}) is serving {self.path.parent}: stop it first, or "
                            "serve another --state") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmlessly
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
