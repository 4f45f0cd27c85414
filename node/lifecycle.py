"""How a long-running ``dume-node join`` stops and how it waits for an unreachable coordinator.

SIGTERM and SIGINT raise ``StopRequested`` in the main thread wherever it is; everything the agent writes is
atomic (statistics files, node.json) and every upload resumes from what the coordinator holds, so abandoning the
step in progress is clean, and the next ``join`` picks up where this one stopped.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from dume.shared.errors import CoordinatorRefused, CoordinatorUnreachable

FIRST_PAUSE_SECONDS = 1.0
MAX_PAUSE_SECONDS = 30.0
PRECONDITION_RETRY_SECONDS = 600.0  # a refusal that a restart of either side may cure; not retried forever


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turns SIGTERM and SIGINT into ``StopRequested`` for the duration of the block."""
    def raise_stop(signum: int, _frame: object) -> None:
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, raise_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Reconnect:
    """Capped exponential backoff between attempts to reach the coordinator.

    ``give_up_after`` bounds how long it may stay unreachable (None: forever); the clock starts at the first
    failure since the last success.
    """

    def __init__(self, address: str, give_up_after: float | None) -> None:
        self.address = address
        self.give_up_after = give_up_after
        self.pause = FIRST_PAUSE_SECONDS
        self.failing_since: float | None = None

    def succeeded(self) -> None:
        self.pause, self.failing_since = FIRST_PAUSE_SECONDS, None

    def failed(self, error: grpc.RpcError, what_failed: str) -> None:
        """Sleeps before the next attempt, or raises once the coordinator has been unreachable for too long."""
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        elapsed, limit = now - self.failing_since, self.give_up_after
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            limit = min(limit or PRECONDITION_RETRY_SECONDS, PRECONDITION_RETRY_SECONDS)
        if limit is not None and elapsed >= limit:
            declined = error.code() == grpc.StatusCode.FAILED_PRECONDITION
            gave_up = CoordinatorRefused if declined else CoordinatorUnreachable
            raise gave_up(f"gave up after {elapsed:.0f} s: the coordinator at {self.address} kept failing "
                            f"({error.code().name}: {error.details()}); check that it runs and is reachable, then run "
                            "`dume-node join` again (without --once it keeps trying)")
        pause = self.pause if limit is None else min(self.pause, limit - elapsed)
        print(f"{what_failed} ({error.code().name}: {error.details()}); retrying in {pause:.0f}s", file=sys.stderr,
              flush=True)
        time.sleep(pause)
        self.pause = min(self.pause * 2, MAX_PAUSE_SECONDS)
