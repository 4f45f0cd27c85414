"""Resumable uploads: each blob of a declared plan is appended to a staging file, hashed and checked as it arrives.

The staging directory of an upload is ``state/uploads/<upload_id>``, where the id is derived from the member,
the kind and the plan, so the same plan resumes against the same files after a dropped connection or a restart
of either side. The plan itself is held there too (``plan.pb`` and ``member``), never in the daemon's memory, so
open uploads cost disk, not RAM, and survive a restart. A blob's durable offset is its staging file's size, fsynced
before it is reported (``BlobReceiver`` says when bytes become durable); a complete blob, whose SHA-256 was
computed as its chunks arrived, is renamed to ``<sha>`` (``<sha>.part`` while partial), with ``<sha>.finite``
beside it when its values were all finite, so neither the hash nor that check reads it again. Nothing outside the
staging directory changes until commit, so an upload that fails validation is removed without a trace.

Limits (``Limits``): a plan is refused before any byte is accepted when its declared bytes, with those of the
member's other open plans, pass the member's staging quota, when the member holds too many open plans, or when
the disk would keep less than its reserve; an upload untouched for ``staging_expiry_seconds`` is deleted.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dume.coordinator.errors import Refused
from dume.coordinator.limits import Limits
from dume.coordinator.validation import MODEL_FILES
from dume.shared.files import fsync_file, write_atomically
from dume.shared.transport.blobs import BlobStore, read_range, sha256_file
from dume.shared.transport.wire import DTYPES, all_finite, expected_size
from dume.v1 import federation_pb2

MAX_CHUNK_BYTES = 1 << 20
MAX_BLOBS = 100_000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
PLAN_FILE, MEMBER_FILE = "plan.pb", "member"
FINITE_SUFFIX = ".finite"  # beside a complete staged blob: its values were all finite as they arrived
log = logging.getLogger("dume.coordinator")


@dataclass(frozen=True)
class PlannedUpload:
    upload_id: str
    member: str
    plan: federation_pb2.UploadPlan
    sizes: dict[str, int]  # sha256 -> bytes


def upload_id(member: str, plan: federation_pb2.UploadPlan) -> str:
    return hashlib.sha256(member.encode() + b"\0" + plan.SerializeToString(deterministic=True)).hexdigest()[:32]


def planned_sizes(plan: federation_pb2.UploadPlan, max_file_bytes: int) -> dict[str, int]:
    """Each blob's size, after checking the plan describes itself consistently."""
    if plan.kind not in (federation_pb2.UPLOAD_KIND_MODEL, federation_pb2.UPLOAD_KIND_STATISTICS):
        raise Refused("invalid", "the upload kind is missing: say whether it is a model or statistics")
    names = [entry.name for entry in plan.manifest.tensors] + [file.name for file in plan.files]
    if len(set(names)) != len(names) or len(names) > MAX_BLOBS:
        raise Refused("invalid", "the upload names a tensor or file twice (or too many): send each once")
    sizes: dict[str, int] = {}
    for entry in plan.manifest.tensors:
        if entry.dtype not in DTYPES or any(dimension < 0 for dimension in entry.shape):
            raise Refused("invalid", f"tensor {entry.name} has dtype {entry.dtype!r} and shape "
                          f"{list(entry.shape)}: use one of {sorted(DTYPES)} and a non-negative shape")
        if entry.size_bytes != expected_size(entry):
            raise Refused("invalid", f"tensor {entry.name} declares {entry.size_bytes} bytes, its shape and dtype "
                          f"make {expected_size(entry)}")
        sizes[_checked_sha(entry.sha256, entry.name, entry.size_bytes)] = entry.size_bytes
    for file in plan.files:
        if file.name not in MODEL_FILES or plan.kind != federation_pb2.UPLOAD_KIND_MODEL:
            raise Refused("invalid", f"file {file.name!r} is not one a model upload carries: only "
                          f"{', '.join(sorted(MODEL_FILES))}")
        if not 0 <= file.size_bytes <= max_file_bytes:
            raise Refused("invalid", f"file {file.name} declares {file.size_bytes} bytes; the coordinator takes "
                          f"0 to {max_file_bytes} (limit max_file_bytes in its config.json)")
        sizes[_checked_sha(file.sha256, file.name, file.size_bytes)] = file.size_bytes
    return sizes


def _checked_sha(sha256: str, name: str, size: int) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise Refused("invalid", f"{name} has no valid SHA-256 (64 lowercase hex digits)")
    if size == 0 and sha256 != EMPTY_SHA256:
        raise Refused("invalid", f"{name} declares 0 bytes but not the SHA-256 of no bytes: describe it again")
    return sha256


class Uploads:
    """The uploads in progress: their plans and their staged blobs, all on disk under ``root``."""

    def __init__(self, root: Path, blobs: BlobStore, limits: Limits,
                 may_reuse: Callable[[str, str], bool]) -> None:
        """``may_reuse(member, sha256)``: whether a blob the store holds counts as sent for that member."""
        self.root = root
        self.blobs = blobs
        self.limits = limits
        self.may_reuse = may_reuse
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one plan admitted at a time, so two cannot both take the last of a quota
        # A full staging file is named by its hash either by the stream that wrote its last chunk or, after a crash
        # between that chunk and the rename, by the next look at what is held: never by both at once.
        self.finishing = threading.Lock()

    def begin(self, member: str, plan: federation_pb2.UploadPlan) -> PlannedUpload:
        """Opens (or reopens, to resume) an upload, after checking it fits the member's limits and the disk."""
        planned = PlannedUpload(upload_id(member, plan), member, plan, planned_sizes(plan, self.limits.max_file_bytes))
        directory = self.root / planned.upload_id
        with self._lock:
            if (directory / PLAN_FILE).is_file():
                os.utime(directory / PLAN_FILE)  # resumed: its expiry starts again
            else:
                self._check_room(planned)
                directory.mkdir(exist_ok=True)
                write_atomically(directory / MEMBER_FILE, member.encode(), mode=0o600)
                write_atomically(directory / PLAN_FILE, plan.SerializeToString(deterministic=True), mode=0o600)
        if EMPTY_SHA256 in planned.sizes:
            self.blobs.put_bytes(b"")  # nothing is ever sent for an empty file: the store holds it from the start
        return planned

    def _unheld_bytes(self, planned: PlannedUpload) -> int:
        """Bytes of the plan the member must still send: what staging it may cost (a blob the store holds counts
        as sent only where the member may reuse it, so naming other members' blobs does not dodge the quota)."""
        return sum(size for sha, size in planned.sizes.items()
                   if not (self.blobs.has(sha) and self.may_reuse(planned.member, sha)))

    def _check_room(self, planned: PlannedUpload) -> None:
        limits, member = self.limits, planned.member
        needed = self._unheld_bytes(planned)
        if needed > limits.staging_quota_bytes:
            raise Refused("invalid", f"the upload declares {needed} bytes, more than the {limits.staging_quota_bytes} "
                          "one member may stage: the coordinator's operator can raise limits.staging_quota_bytes "
                          "in its config.json")
        others = [self._read(upload) for upload in self._open_of(member)]
        if len(others) >= limits.open_uploads_per_member:
            raise Refused("exhausted", f"{member} already holds {len(others)} open uploads, the most a member may: "
                          "commit them, or wait until they expire after "
                          f"{limits.staging_expiry_seconds:.0f} s without progress")
        staged = sum(self._unheld_bytes(other) for other in others if other is not None)
        if staged + needed > limits.staging_quota_bytes:
            raise Refused("exhausted", f"{member} has {staged} bytes staged in open uploads; {needed} more would "
                          f"pass its quota of {limits.staging_quota_bytes}: commit the open uploads, or wait until "
                          f"they expire after {limits.staging_expiry_seconds:.0f} s without progress")
        free = shutil.disk_usage(self.root).free
        if free - needed < limits.min_free_bytes:
            raise Refused("exhausted", f"the coordinator's disk has {free} bytes free; the upload needs {needed} and "
                          f"{limits.min_free_bytes} must stay free: the operator must free space, then the node "
                          "resumes")

    def _open_of(self, member: str) -> list[str]:
        """The ids of the member's open uploads."""
        found = []
        for directory in self.root.iterdir():
            try:
                if (directory / MEMBER_FILE).read_text() == member:
                    found.append(directory.name)
            except OSError:
                continue  # being created, committed or expired right now
        return found

    def open_plans(self) -> list[PlannedUpload]:
        """Every upload in progress (of any member)."""
        return [planned for directory in self.root.iterdir() if (planned := self._read(directory.name)) is not None]

    def _read(self, upload: str) -> PlannedUpload | None:
        directory = self.root / upload
        try:
            member = (directory / MEMBER_FILE).read_text()
            plan = federation_pb2.UploadPlan.FromString((directory / PLAN_FILE).read_bytes())
        except OSError:
            return None
        return PlannedUpload(upload, member, plan, planned_sizes(plan, self.limits.max_file_bytes))

    def expire(self, now: float | None = None) -> int:
        """Deletes every upload untouched for ``staging_expiry_seconds``, with its staged bytes; returns how many."""
        stale = self.stale(now)
        for directory in stale:
            shutil.rmtree(directory, ignore_errors=True)
        if stale:
            log.info("expired %d uploads without progress for %.0f s", len(stale), self.limits.staging_expiry_seconds)
        return len(stale)

    def stale(self, now: float | None = None) -> list[Path]:
        """The staging directories of uploads untouched for ``staging_expiry_seconds``."""
        now = time.time() if now is None else now
        found = []
        for directory in list(self.root.iterdir()):
            try:
                plan = directory / PLAN_FILE
                touched = (plan if plan.exists() else directory).stat().st_mtime
            except OSError:
                continue
            if now - touched > self.limits.staging_expiry_seconds:
                found.append(directory)
        return found

    def held(self, planned: PlannedUpload) -> dict[str, int]:
        """Bytes durably held of each blob (sha256 -> offset): where a resumed upload continues. A partial blob is
        fsynced before its size is reported, so an offset reported is never one a crash could take back."""
        for sha256 in planned.sizes:
            try:
                fsync_file(self.part_path(planned, sha256))
            except FileNotFoundError:
                pass
        return {sha: self._held(planned, sha) for sha in sorted(planned.sizes)}

    def planned(self, member: str, upload: str) -> PlannedUpload:
        planned = self._read(upload) if len(upload) == 32 and upload.isalnum() else None
        if planned is None:
            raise Refused("precondition",
                          f"upload {upload} is not open (committed, expired or never begun): begin it again")
        if planned.member != member:
            raise Refused("permission",
                          f"upload {upload} belongs to {planned.member!r}; a node uploads only for itself")
        return planned

    def _held(self, planned: PlannedUpload, sha256: str) -> int:
        """Bytes of the blob held: complete, partly staged, or already in the store for this member. Another
        stream may name a staged blob by its hash at any moment, so a staging file that vanishes is looked for
        again under its hash."""
        size = planned.sizes[sha256]
        complete, part = self.complete_path(planned, sha256), self.part_path(planned, sha256)
        if complete.exists():
            return size
        try:
            held = part.stat().st_size
        except FileNotFoundError:
            held = None
        if held is None:
            if complete.exists():  # the stream that wrote its last chunk named it meanwhile
                return size
        elif held == size:  # written whole, but the daemon died before it verified and named it
            with self.finishing:
                if complete.exists():  # the stream that wrote it named it meanwhile
                    return size
                return size if part.exists() and self._finish(planned, sha256) else 0
        else:
            return held
        if self.blobs.has(sha256) and self.may_reuse(planned.member, sha256):
            return planned.sizes[sha256]
        return 0

    def complete_path(self, planned: PlannedUpload, sha256: str) -> Path:
        return self.root / planned.upload_id / sha256

    def write(self, planned: PlannedUpload, sha256: str, offset: int, data: bytes) -> None:
        """Appends one chunk at the offset already held, durably; a finished blob is verified at once. (A stream of
        chunks goes through one ``receiving`` block instead, which keeps the blob open between chunks.)"""
        with self.receiving() as receiver:
            receiver.write(planned, sha256, offset, data)

    @contextmanager
    def receiving(self) -> Iterator[BlobReceiver]:
        """A receiver for one stream of chunks; whatever it holds open is made durable when the block ends."""
        receiver = BlobReceiver(self)
        try:
            yield receiver
        finally:
            receiver.close()

    def touch(self, planned: PlannedUpload) -> None:
        """Progress: the upload's expiry starts again (refused if it expired or was committed meanwhile)."""
        try:
            os.utime(self.root / planned.upload_id / PLAN_FILE)
        except FileNotFoundError:
            raise Refused("precondition", f"upload {planned.upload_id} expired or was committed: begin it again") \
                from None

    def part_path(self, planned: PlannedUpload, sha256: str) -> Path:
        return self.root / planned.upload_id / f"{sha256}.part"

    def checked_finite(self, planned: PlannedUpload, sha256: str) -> bool:
        """Whether the staged blob was found finite as it arrived, in every dtype the plan reads it as."""
        return (self.root / planned.upload_id / f"{sha256}{FINITE_SUFFIX}").exists()

    def _finish(self, planned: PlannedUpload, sha256: str) -> bool:
        """Names a blob's full staging file by its hash once its bytes match it (the daemon died after the last
        chunk was made durable, before the blob was verified and renamed); discards it (False) if they do not."""
        part = self.part_path(planned, sha256)
        if sha256_file(part) != sha256:
            part.unlink()
            return False
        os.replace(part, self.complete_path(planned, sha256))
        return True

    def blob_path(self, planned: PlannedUpload, sha256: str) -> Path:
        """Where a complete blob of the upload lies: its staging file, or the store if it already held it."""
        staged = self.complete_path(planned, sha256)
        return staged if staged.exists() else self.blobs.path(sha256)

    def missing(self, planned: PlannedUpload) -> list[str]:
        return [sha for sha, size in sorted(planned.sizes.items()) if self._held(planned, sha) != size]

    def adopt(self, planned: PlannedUpload) -> None:
        """Moves the upload's complete blobs into the store, and checks that the store then holds every blob the
        upload names: the ledger row that names them is written only after this returns."""
        for sha256 in sorted(planned.sizes):
            staged = self.complete_path(planned, sha256)
            if staged.exists():
                with open(staged, "rb") as handle:
                    os.fsync(handle.fileno())
                self.blobs.adopt(staged, sha256)
        missing = [sha256 for sha256 in sorted(planned.sizes) if not self.blobs.has(sha256)]
        if missing:
            raise Refused("precondition", f"{len(missing)} blobs of the upload are not held (the first is "
                          f"{missing[0][:12]}): send them again")

    def discard(self, planned: PlannedUpload) -> None:
        shutil.rmtree(self.root / planned.upload_id, ignore_errors=True)


class BlobReceiver:
    """Appends one stream's chunks to staged blobs. The blob being received stays open from chunk to chunk and is
    hashed and checked for non-finite values as its chunks arrive, so nothing reads it again; it is fsynced once,
    when complete (before it is renamed to its hash) or when the stream ends.

    Durability: every offset the coordinator reports (``Uploads.held``, after BeginUpload and SendChunks) was
    fsynced first, so a crash never takes back bytes a node was told are held. Bytes past the last report may be
    lost in a power cut; if a filesystem kept a partial blob's size but not its bytes, the blob's SHA-256 fails on
    completion and it is discarded and sent again: it is never adopted.
    """

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads
        self._blob: _PartialBlob | None = None
        self._dtypes: tuple[str, dict[str, list[str]]] = ("", {})  # one upload's sha256 -> dtypes, made once

    def _dtypes_of(self, planned: PlannedUpload, sha256: str) -> list[str]:
        """Every dtype a tensor of the plan reads the blob as (none for a file): what its values are checked in."""
        if self._dtypes[0] != planned.upload_id:
            dtypes: dict[str, set[str]] = {}
            for entry in planned.plan.manifest.tensors:
                dtypes.setdefault(entry.sha256, set()).add(entry.dtype)
            self._dtypes = (planned.upload_id, {sha: sorted(names) for sha, names in dtypes.items()})
        return self._dtypes[1].get(sha256, [])

    def write(self, planned: PlannedUpload, sha256: str, offset: int, data: bytes) -> None:
        """Appends one chunk at the offset already held; a finished blob is verified and renamed to its hash."""
        size = planned.sizes.get(sha256)
        if size is None:
            raise Refused("precondition", f"blob {sha256[:12]} is not part of upload {planned.upload_id}")
        if len(data) > MAX_CHUNK_BYTES:
            raise Refused("precondition", f"a chunk holds {len(data)} bytes; send at most {MAX_CHUNK_BYTES}")
        if offset + len(data) > size:
            raise Refused("precondition", f"blob {sha256[:12]}: a chunk of {len(data)} bytes at offset {offset} runs "
                          f"past the {size} bytes the plan declares for it: send the blob's own bytes only")
        blob = self._blob
        if blob is None or (blob.planned.upload_id, blob.sha256) != (planned.upload_id, sha256):
            self.close()
            held = self.uploads._held(planned, sha256)
            if offset != held or held + len(data) > size:
                raise self._discontinuous(sha256, offset, held, size)
            if held == size:
                return  # an empty chunk after the last byte: nothing to add
            self._blob = blob = _PartialBlob.open(planned, sha256, self.uploads.part_path(planned, sha256), held,
                                                  self._dtypes_of(planned, sha256))
        elif offset != blob.held or blob.held + len(data) > size or blob.on_disk() != blob.held:
            # another stream of the same upload appended meanwhile (a reconnect overlapping a stale stream)
            held = blob.on_disk()
            self.close()
            raise self._discontinuous(sha256, offset, held, size)
        self.uploads.touch(planned)
        try:
            blob.append(data)
        except OSError:
            self.close()
            raise
        if blob.held == size:
            self._blob = None
            with self.uploads.finishing:
                blob.finish(self.uploads.complete_path(planned, sha256))

    @staticmethod
    def _discontinuous(sha256: str, offset: int, held: int, size: int) -> Refused:
        return Refused("precondition", f"blob {sha256[:12]}: chunk at offset {offset} does not continue the "
                       f"{held} of {size} bytes held: resume from the offset BeginUpload reports")

    def close(self) -> None:
        """Makes the bytes of the blob being received durable and closes it."""
        blob, self._blob = self._blob, None
        if blob is not None:
            blob.close()


@dataclass
class _PartialBlob:
    """A staged blob being appended to: its open file, the running SHA-256, and the finiteness checks."""

    planned: PlannedUpload
    sha256: str
    path: Path
    handle: io.FileIO
    held: int
    digest: Any  # hashlib's running SHA-256
    dtypes: list[str]  # every dtype a tensor of the plan reads this blob as; checked for NaN and infinities
    tail: bytes = b""  # bytes past the last whole value of the widest dtype, checked with the next chunk
    finite: bool = True

    @classmethod
    def open(cls, planned: PlannedUpload, sha256: str, path: Path, held: int, dtypes: list[str]) -> _PartialBlob:
        blob = cls(planned, sha256, path, open(path, "ab", buffering=0), held, hashlib.sha256(), dtypes)
        if held:  # resumed: the running hash and checks start over the bytes already staged (read once)
            blob.held = 0
            for chunk in read_range(path, 0, held):
                blob._account(chunk)
        return blob

    def on_disk(self) -> int:
        return os.fstat(self.handle.fileno()).st_size

    def _account(self, data: bytes) -> None:
        self.digest.update(data)
        self.held += len(data)
        if self.dtypes and self.finite:
            width = max(DTYPES[dtype].itemsize for dtype in self.dtypes)
            values = self.tail + data if self.tail else data
            whole = len(values) - len(values) % width
            view = memoryview(values)[:whole]
            self.finite = all(all_finite(view, dtype) for dtype in self.dtypes)
            self.tail = bytes(values[whole:])

    def append(self, data: bytes) -> None:
        """Writes the whole chunk, or (a full disk cut it short) nothing of it."""
        try:
            written = 0
            while written < len(data):
                written += self.handle.write(memoryview(data)[written:])
        except OSError:
            os.truncate(self.path, self.held)
            raise
        self._account(data)

    def finish(self, complete: Path) -> None:
        """Verifies the complete blob against its name; renames it to its hash when it matches, else discards it."""
        os.fsync(self.handle.fileno())
        self.handle.close()
        if complete.exists() and not self.path.exists():
            return  # a look at what is held found it whole, verified it and named it first
        if self.digest.hexdigest() != self.sha256 or self.path.stat().st_size != self.held:
            self.path.unlink()
            raise Refused("precondition", f"blob {self.sha256[:12]} does not match its SHA-256: it was corrupted; "
                          "it is discarded, send it again")
        if self.dtypes and self.finite and not self.tail:
            complete.with_name(f"{self.sha256}{FINITE_SUFFIX}").touch()
        os.replace(self.path, complete)

    def close(self) -> None:
        try:
            os.fsync(self.handle.fileno())
        finally:
            self.handle.close()
