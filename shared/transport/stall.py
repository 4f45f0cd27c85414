"""A deadline that restarts at every chunk: a streaming transfer may take as long as it needs while it moves, and
is cancelled once it has moved nothing for ``seconds``.

A fixed gRPC deadline cannot tell a large, slow transfer from a stalled one, and without any deadline a link that
silently stops forwarding (a black-holing middlebox, a peer that stopped reading) holds the call until TCP gives up,
which can take many minutes. The cancelled call is reported as ``Stalled``, a DEADLINE_EXCEEDED that the callers
retry like any other transient failure, resuming from what the other side already holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import grpc

STALL_SECONDS = 60.0


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


class Stalled(grpc.RpcError):
    """A call this side cancelled because it made no progress for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no progress for {seconds:g} s")
        self.seconds = seconds

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return f"no progress for {self.seconds:g} s, the transfer was cancelled to be resumed"


class ProgressDeadline:
    """Call ``progressed`` at every chunk; ``watching(*calls)`` cancels the calls once ``seconds`` pass without one
    (several streams of one transfer share a deadline: progress on any of them counts)."""

    def __init__(self, seconds: float = STALL_SECONDS) -> None:
        self.seconds = seconds
        self.last = time.monotonic()
        self.fired = False

    def progressed(self) -> None:
        self.last = time.monotonic()

    @contextmanager
    def watching(self, *calls: Cancellable) -> Iterator[None]:
        """Watches ``calls`` for the block; raises ``Stalled`` (instead of the cancellation) if it fired."""
        self.last, self.fired, done = time.monotonic(), False, threading.Event()

        def watch() -> None:
            while not done.wait(min(1.0, self.seconds / 10)):
                if time.monotonic() - self.last > self.seconds:
                    self.fired = True
                    for call in calls:
                        call.cancel()
                    return

        watcher = threading.Thread(target=watch, name="progress-deadline", daemon=True)
        watcher.start()
        try:
            yield
        except (grpc.RpcError, grpc.FutureCancelledError):
            if self.fired:
                raise Stalled(self.seconds) from None
            raise
        finally:
            done.set()
            watcher.join()
