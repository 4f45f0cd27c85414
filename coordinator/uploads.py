"""Resumable uploads: each blob of a declared plan is appended to a staging file, fsynced chunk by chunk.

The staging directory of an upload is ``state/uploads/<upload_id>``, where the id is derived from the member,
the kind and the plan, so the same plan resumes against the same files after a dropped connection or a restart
of either side. A blob's durable offset is its staging file's size; a complete blob is hashed and renamed to
``<sha>`` (``<sha>.part`` while partial). Nothing outside the staging directory changes until commit, so an
upload that fails validation is removed without a trace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from dume.coordinator.errors import Refused
from dume.shared.transport.blobs import BlobStore, sha256_file
from dume.shared.transport.wire import DTYPES, expected_size
from dume.v1 import federation_pb2

MAX_CHUNK_BYTES = 1 << 20
MAX_BLOBS = 100_000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class PlannedUpload:
    upload_id: str
    member: str
    plan: federation_pb2.UploadPlan
    sizes: dict[str, int]  # sha256 -> bytes


def upload_id(member: str, plan: federation_pb2.UploadPlan) -> str:
    return hashlib.sha256(member.encode() + b"\0" + plan.SerializeToString(deterministic=True)).hexdigest()[:32]


def planned_sizes(plan: federation_pb2.UploadPlan) -> dict[str, int]:
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
        if "/" in file.name or file.name.startswith(".") or file.size_bytes < 0:
            raise Refused("invalid", f"file name {file.name!r} is not a plain file name")
        sizes[_checked_sha(file.sha256, file.name, file.size_bytes)] = file.size_bytes
    return sizes


def _checked_sha(sha256: str, name: str, size: int) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise Refused("invalid", f"{name} has no valid SHA-256 (64 lowercase hex digits)")
    if size == 0 and sha256 != EMPTY_SHA256:
        raise Refused("invalid", f"{name} declares 0 bytes but not the SHA-256 of no bytes: describe it again")
    return sha256


class Uploads:
    """The uploads in progress: their plans in memory (a restart forgets them) and their staged blobs on disk."""

    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.root = root
        self.blobs = blobs
        root.mkdir(parents=True, exist_ok=True)
        self._plans: dict[str, PlannedUpload] = {}
        self._lock = threading.Lock()

    def begin(self, member: str, plan: federation_pb2.UploadPlan) -> PlannedUpload:
        planned = PlannedUpload(upload_id(member, plan), member, plan, planned_sizes(plan))
        if EMPTY_SHA256 in planned.sizes:
            self.blobs.put_bytes(b"")  # nothing is ever sent for an empty file: the store holds it from the start
        (self.root / planned.upload_id).mkdir(exist_ok=True)
        with self._lock:
            self._plans[planned.upload_id] = planned
        return planned

    def held(self, planned: PlannedUpload) -> dict[str, int]:
        """Bytes durably held of each blob (sha256 -> offset): where a resumed upload continues."""
        return {sha: self._held(planned, sha) for sha in sorted(planned.sizes)}

    def planned(self, member: str, upload: str) -> PlannedUpload:
        with self._lock:
            planned = self._plans.get(upload)
        if planned is None:
            raise Refused("precondition",
                          f"upload {upload} is not open (the coordinator may have restarted): begin it again")
        if planned.member != member:
            raise Refused("permission",
                          f"upload {upload} belongs to {planned.member!r}; a node uploads only for itself")
        return planned

    def _held(self, planned: PlannedUpload, sha256: str) -> int:
        if self.blobs.has(sha256) or self.complete_path(planned, sha256).exists():
            return planned.sizes[sha256]
        part = self._part_path(planned, sha256)
        return part.stat().st_size if part.exists() else 0

    def complete_path(self, planned: PlannedUpload, sha256: str) -> Path:
        return self.root / planned.upload_id / sha256

    def _part_path(self, planned: PlannedUpload, sha256: str) -> Path:
        return self.root / planned.upload_id / f"{sha256}.part"

    def write(self, planned: PlannedUpload, sha256: str, offset: int, data: bytes) -> None:
        """Appends one chunk at the offset already held, durably; a finished blob is verified at once."""
        size = planned.sizes.get(sha256)
        if size is None:
            raise Refused("precondition", f"blob {sha256[:12]} is not part of upload {planned.upload_id}")
        if len(data) > MAX_CHUNK_BYTES:
            raise Refused("precondition", f"a chunk holds {len(data)} bytes; send at most {MAX_CHUNK_BYTES}")
        held = self._held(planned, sha256)
        if offset != held or held + len(data) > size:
            raise Refused("precondition", f"blob {sha256[:12]}: chunk at offset {offset} does not continue the "
                          f"{held} of {size} bytes held: resume from the offset BeginUpload reports")
        part = self._part_path(planned, sha256)
        with open(part, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if held + len(data) == size:
            if sha256_file(part) != sha256:
                part.unlink()
                raise Refused("precondition", f"blob {sha256[:12]} does not match its SHA-256: it was corrupted; "
                              "it is discarded, send it again")
            os.replace(part, self.complete_path(planned, sha256))

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
        with self._lock:
            self._plans.pop(planned.upload_id, None)
        shutil.rmtree(self.root / planned.upload_id, ignore_errors=True)
