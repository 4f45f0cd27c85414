"""The routing probe: each published version run over the operator's public probe text, and each expert's share
of top-1 routing recorded with the version, so ``status`` shows a member whose statistics took the others'
routing (docs/limits.md, "Router capture").

It runs on its own thread after a version is recorded: publication never waits for it, and a probe that fails is
logged and its error recorded for ``status``, nothing else. It holds one copy of the version's model in memory
(the checkpoint's size) and writes the checkpoint once to ``probe/`` in the state directory, which is why it runs
only when the operator gives a probe text (``serve --probe-data``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dume.coordinator.ledger import Ledger
from dume.coordinator.records import RoutingProbeRecord, VersionRecord
from dume.shared.errors import DumeError
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.download import write_shard_from_blobs

log = logging.getLogger("dume.coordinator")

DEFAULT_PROBE_TOKENS = 4096
# An expert is flagged when it takes more than this multiple of the fair share 1/E: of three tiny experts, one
# whose statistics are its data repeated ten times takes 1.7x under ``tokens`` weighting (test_routing_probe.py).
DEFAULT_FLAG_RATIO = 1.5
STOP_SECONDS = 5.0


@dataclass(frozen=True)
class ProbeSettings:
    """``serve --probe-data PATH [--probe-tokens N] [--probe-flag-ratio R]``."""

    data: Path
    max_tokens: int = DEFAULT_PROBE_TOKENS
    flag_ratio: float = DEFAULT_FLAG_RATIO

    def check(self) -> None:
        """Refuses a probe text that is missing, unreadable or empty before the daemon starts."""
        from dume.shared.method.data import check_documents  # torch: not for `--help`

        check_documents(self.data)
        if self.flag_ratio < 1:
            raise DumeError(f"--probe-flag-ratio {self.flag_ratio} is below 1: no expert could stay unflagged; "
                            "use e.g. 1.5")


def write_checkpoint(version: VersionRecord, blobs: BlobStore, out_dir: Path) -> None:
    """The version's Hugging Face directory from its blobs (each shard's tensors are already its bytes)."""
    out_dir.mkdir()
    for file in version.files:
        if file.sha256:
            shutil.copyfile(blobs.path(file.sha256), out_dir / file.name)
        else:
            write_shard_from_blobs(out_dir / file.name, file.shard, blobs)


class RoutingProber:
    """One worker thread that measures the latest version asked for (a request overtaken by a newer version is
    skipped: only the newest matters to the operator)."""

    def __init__(self, settings: ProbeSettings, ledger: Ledger, blobs: BlobStore, scratch: Path,
                 sequence_length: int) -> None:
        self.settings, self._ledger, self._blobs = settings, ledger, blobs
        self._scratch, self._sequence_length = scratch, sequence_length
        shutil.rmtree(scratch, ignore_errors=True)  # what a crash left mid-probe
        scratch.mkdir(parents=True)
        self._condition = threading.Condition()
        self._wanted = self._done = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="routing-probe", daemon=True)
        self._thread.start()
        latest = ledger.version()
        if latest is not None and ledger.routing_probe(latest.number) is None:
            self.request(latest.number)  # published while the daemon ran without a probe, or before a crash

    def request(self, version: int) -> None:
        with self._condition:
            self._wanted = max(self._wanted, version)
            self._condition.notify_all()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stops taking requests; a probe still running is left to end with the process (its thread is a daemon):
        stopping the coordinator never waits for a forward pass over a large model."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._wanted > self._done or self._stopping)
                if self._stopping:
                    return
                number = self._wanted
            try:
                record = self._measure(number)
                log.info("routing probe of version %d: %s", number, ", ".join(
                    f"{name} {share:.1%}" for name, share in record.mean().items()))
            except Exception as error:  # a probe must never take the daemon or publication with it
                log.exception("routing probe of version %d failed", number)
                record = RoutingProbeRecord(number, [], [], 0, f"{type(error).__name__}: {error}")
            if self._stopping:
                return  # the ledger may be closed already: the next start measures this version again
            try:
                self._ledger.record_routing_probe(record)
            except Exception:
                log.exception("cannot record the routing probe of version %d", number)
            with self._condition:
                self._done = max(self._done, number)
                self._condition.notify_all()

    def _measure(self, number: int) -> RoutingProbeRecord:
        from dume.shared.method.routing_share import routing_shares  # torch and transformers: only when probing

        version = self._ledger.version(number)
        if version is None or version.pruned_at is not None:
            raise DumeError(f"version {number} is no longer stored")
        with tempfile.TemporaryDirectory(dir=self._scratch) as folder:
            model = Path(folder) / "model"
            write_checkpoint(version, self._blobs, model)
            shares = routing_shares(model, self.settings.data, self.settings.max_tokens, self._sequence_length)
        return RoutingProbeRecord(number, shares.experts, shares.per_layer, shares.tokens)
