"""Publication: one worker brings the basis over the experts, and the model version built from it, up to date with
the ledger.

Nothing here is specific to the federation's math: the basis is ``dume.shared.method.averaging.lazy_basis``,
the routers and the ``dume`` block ``dume.shared.method.routers.solve_for_checkpoint`` and the checkpoint
``dume.shared.method.writer.write_moe_checkpoint``, reading each expert's tensors and each contribution's
statistics from their blobs in canonical (expert, node, dataset) order; the routers are solved one layer at a time,
so the statistics held at once are one layer's, whatever the number of layers. So the same experts and contributions
give the same bytes as ``dume merge``, whatever the order they joined, left or were revoked in.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from dume.coordinator.failpoints import failpoint
from dume.coordinator.ledger import Ledger
from dume.coordinator.metrics import Metrics
from dume.coordinator.records import BasisRecord, Contribution, Member, VersionFile
from dume.shared.method.averaging import lazy_basis, tensors_hash
from dume.shared.method.expert import DenseWeights
from dume.shared.method.families import detect_family
from dume.shared.method.routers import ContributionStatistics, MergeSettings, solve_for_checkpoint, sum_contributions
from dume.shared.method.statistics import layer_name
from dume.shared.method.writer import LazyTensors, write_moe_checkpoint
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import DTYPES, stored_tensors, tensor_entry, tensor_from_bytes, tensor_view
from dume.v1 import tensors_pb2

log = logging.getLogger("dume.coordinator")


class StoredMember(DenseWeights):
    """A member's dense model as recorded in the ledger, read tensor by tensor from the blob store."""

    def __init__(self, member: Member, blobs: BlobStore) -> None:
        assert member.model is not None
        self.name = member.name
        self._blobs = blobs
        self._entries = {entry.name: entry for entry in member.model.tensors}
        self._files = member.files
        self.config = json.loads(blobs.read_bytes(member.files["config.json"]))
        self.family = detect_family(self.config, f"member {member.name!r}")

    @property
    def parameter_names(self) -> list[str]:
        return sorted(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return tensor_from_bytes(entry, self._blobs.read_buffer(entry.sha256))

    def tensor_shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self._entries[name]
        return tuple(entry.shape), DTYPES[entry.dtype]

    def tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        entry = self._entries[name]
        shape, dtype = tuple(entry.shape), DTYPES[entry.dtype]
        if not shape:
            return self.tensor(name)
        rows = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        row_bytes = rows[0].numel() * dtype.itemsize if len(rows) else 0
        self._blobs.read_range_into(entry.sha256, start * row_bytes, rows.view(-1).view(torch.uint8).numpy())
        return rows

    def read_file(self, name: str) -> bytes | None:
        sha256 = self._files.get(name)
        return self._blobs.read_bytes(sha256) if sha256 else None


class BlobSink:
    """A checkpoint written into the blob store: the version's file list, each shard as a manifest of tensor blobs."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self.files: list[VersionFile] = []

    def write_shard(self, name: str, tensors: LazyTensors) -> int:
        """Stores the shard's tensors one at a time, each computed, hashed, written and dropped before the next."""
        entries, total = [], 0
        for tensor_name in sorted(tensors):
            entry = store_tensor(self._blobs, tensor_name, tensors[tensor_name]())
            entries.append(entry)
            total += entry.size_bytes
        self.files.append(VersionFile(name, shard=tensors_pb2.TensorManifest(tensors=entries)))
        return total

    def write_file(self, name: str, data: bytes) -> None:
        self.files.append(VersionFile(name, sha256=self._blobs.put_bytes(data), size_bytes=len(data)))


def store_tensor(blobs: BlobStore, name: str, tensor: torch.Tensor) -> tensors_pb2.TensorEntry:
    """Stores one tensor's bytes as a blob (read in place, hashed once) and returns its entry."""
    sha256 = blobs.put_bytes(tensor_view(tensor))
    return tensor_entry(name, tensor, sha256)


def manifest_into(blobs: BlobStore, tensors: Mapping[str, torch.Tensor]) -> tensors_pb2.TensorManifest:
    """Stores each tensor as a blob (a lazy mapping's one at a time); returns their manifest, sorted by name."""
    return tensors_pb2.TensorManifest(tensors=[store_tensor(blobs, name, tensors[name]) for name in sorted(tensors)])


def contribution_statistics(contribution: Contribution, blobs: BlobStore) -> ContributionStatistics:
    """One contribution's statistics as its node uploaded them, one blob per layer's upper triangle: each is read
    only when the solve reaches its layer, straight into the buffer the solve gives."""
    entries = {entry.name: entry for entry in contribution.manifest.tensors}

    def read_layer_into(layer: int, out: torch.Tensor) -> None:
        blobs.read_into(entries[layer_name(layer)].sha256, memoryview(out.numpy()).cast("B"))

    return ContributionStatistics(contribution.node, contribution.dataset, len(entries),
                                  int(entries[layer_name(0)].shape[0]), read_layer_into)


def basis_inputs(experts: dict[str, Member]) -> str:
    """Names the models a basis averages: the current basis is up to date when it was computed from these."""
    return hashlib.sha256(b"".join(name.encode() + b"\0" + experts[name].model.SerializeToString(deterministic=True)
                                   for name in sorted(experts))).hexdigest()


def basis_is_current(ledger: Ledger, experts: dict[str, Member]) -> bool:
    """Whether the current basis averages ``experts``' models (the ledger's ``experts()``) as recorded now, not while
    a new model or an expert's departure waits for the publisher."""
    return ledger.get_meta("basis_inputs") == basis_inputs(experts)


def refresh_basis(ledger: Ledger, blobs: BlobStore) -> BasisRecord | None:
    """Makes the basis over the current experts (their owners' models) the current one; returns it if it is new."""
    active = ledger.experts()
    key = basis_inputs(active)
    if ledger.get_meta("basis_inputs") == key:
        return None
    if not active:
        ledger.set_meta("current_basis", None)
        ledger.set_meta("basis_inputs", key)
        return None
    # Each mean is computed, stored and dropped before the next; the hash reads them back a tensor at a time.
    manifest = manifest_into(blobs, lazy_basis({name: StoredMember(member, blobs) for name, member in active.items()}))
    record = BasisRecord(tensors_hash(stored_tensors(manifest.tensors, blobs)), sorted(active), manifest)
    with ledger.transaction():
        ledger.add_basis(record)
        ledger.set_meta("current_basis", record.hash)
        ledger.set_meta("basis_inputs", key)
        ledger.audit("basis", record.hash, members=record.members)
    return record


def publish_if_due(ledger: Ledger, blobs: BlobStore, settings: MergeSettings,
                   solving: Callable[[], AbstractContextManager] = nullcontext) -> int | None:
    """Publishes the next version when one is due; returns its number.

    Due means: the basis moved since the latest version (a provisional one, from the statistics at hand), or every
    contribution is under the current basis and its expert's current weights, every expert has one, and the
    latest version is not already that model.
    """
    basis_hash = ledger.get_meta("current_basis")
    if not basis_hash:
        return None
    experts, weights = ledger.experts(), ledger.expert_hashes()
    contributions = [c for c in ledger.contributions() if c.expert in experts]
    if not contributions:
        return None
    stale = sorted(c.label for c in contributions
                   if c.basis_hash != basis_hash or c.expert_hash != weights[c.expert])
    exact = not stale and {c.expert for c in contributions} == set(experts)
    fingerprint = hashlib.sha256(json.dumps(
        [basis_hash, sorted(weights.items()),
         [(c.expert, c.node, c.dataset, c.basis_hash, c.expert_hash,
           c.manifest.SerializeToString(deterministic=True).hex()) for c in contributions]]).encode()).hexdigest()
    latest = ledger.version()
    if latest is not None and (latest.fingerprint == fingerprint or (latest.basis_hash == basis_hash and not exact)):
        return None
    members = {name: StoredMember(owner, blobs) for name, owner in experts.items()}
    statistics = {name: sum_contributions(contribution_statistics(c, blobs) for c in contributions if c.expert == name)
                  for name in sorted(experts)}
    with solving():
        solved = solve_for_checkpoint(statistics, settings, basis_hash, stale)
        failpoint("publication.solving")
    del statistics
    sink = BlobSink(blobs)
    write_moe_checkpoint(sink, members, solved.routers, solved.top_k, solved.dume_block)
    nodes = sorted(set(experts) | {c.node for c in contributions})
    labels = [c.label for c in contributions]
    failpoint("publication.before_version_row")
    with ledger.transaction():
        number = ledger.add_version(exact, basis_hash, nodes, sink.files, fingerprint, labels)
        ledger.audit("publish", str(number), exact=exact, basis_hash=basis_hash, members=nodes,
                     contributions=labels)
    return number


def give_memory_back() -> None:
    """Returns the memory a publication freed to the system. glibc keeps freed heap memory for reuse (notably the
    many tensor-sized buffers of a round, in the arenas of the worker threads), so without this the daemon's RSS
    stays at its publication peak; a C library without ``malloc_trim`` is left alone."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Publisher:
    """One worker thread that brings the basis and the published version up to date with the ledger.

    Uploads only ``request`` a round and return; leave and revoke ``wait`` for the round that follows their change.
    """

    def __init__(self, ledger: Ledger, blobs: BlobStore, settings: MergeSettings,
                 on_change: Callable[[], None], metrics: Metrics | None = None,
                 on_publish: Callable[[int], None] = lambda version: None) -> None:
        self._ledger, self._blobs, self._settings, self._on_change = ledger, blobs, settings, on_change
        self._on_publish = on_publish  # told each new version's number once its row is written (the routing probe)
        self._metrics = metrics or Metrics()
        self._condition = threading.Condition()
        self._wanted = self._done = 0
        self._stopping = False
        self.error = ""  # why the last round failed; "" after a round that succeeded
        self._round = threading.Lock()  # held for each round; ``paused`` takes it between rounds
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def request(self) -> int:
        with self._condition:
            self._wanted += 1
            self._condition.notify_all()
            return self._wanted

    def wait(self, ticket: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._done >= ticket or self._stopping)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No round runs inside the block (a round writes blobs before any row names them; ``gc`` must not see
        them in between)."""
        with self._round:
            yield

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._wanted > self._done or self._stopping)
                if self._stopping:
                    return
                ticket = self._wanted
            try:
                with self._round, self._metrics.timed(self._metrics.publication_seconds):
                    self._refresh()
                self.error = ""
            except Exception as error:  # a bad aggregate must not kill the daemon; the next change retries
                log.exception("publication failed")
                self.error = f"{type(error).__name__}: {error}"
                self._metrics.publication_failures.inc()
            finally:
                give_memory_back()
            with self._condition:
                self._done = ticket
                self._condition.notify_all()

    def _refresh(self) -> None:
        metrics, started = self._metrics, time.monotonic()
        basis = refresh_basis(self._ledger, self._blobs)
        if basis is not None:
            metrics.basis_seconds.observe(time.monotonic() - started)
            log.info("basis %s over %s", basis.hash[:12], ", ".join(basis.members))
        number = publish_if_due(self._ledger, self._blobs, self._settings,
                                lambda: metrics.timed(metrics.solve_seconds))
        if number is not None:
            version = self._ledger.version(number)
            metrics.versions.labels(str(version.exact).lower()).inc()
            metrics.latest_version.set(number)
            log.info("published version %d (%s) over %s", number, "exact" if version.exact else "provisional",
                     ", ".join(version.members))
            self._on_publish(number)
        self._on_change()
