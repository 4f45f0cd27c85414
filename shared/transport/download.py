"""Downloading a published version: fetch only the blobs not held locally, then write the Hugging Face directory.

The directory is assembled from blobs exactly as ``dume merge`` writes it (the same shard files, index, config
and tokenizer files), into a staging folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc

from dume.shared.errors import DumeError
from dume.shared.files import check_free, staged_directory
from dume.shared.method.writer import save_shard
from dume.shared.progress import byte_progress
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.channels import TRANSIENT, refusal
from dume.shared.transport.stall import STALL_SECONDS, ProgressDeadline
from dume.shared.transport.wire import tensor_from_bytes
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

LocalLookup = Callable[[str], bytes | None]


def version_blobs(version: pb.Version) -> dict[str, int]:
    """Every blob a version names, with its size."""
    blobs = {file.sha256: file.size_bytes for file in version.files if file.sha256}
    for file in version.files:
        blobs.update({entry.sha256: entry.size_bytes for entry in file.shard.tensors})
    return blobs


class Retry(Protocol):
    """How a caller waits out a transient failure (``dume.node``'s reconnect backoff): ``failed`` sleeps before the
    next attempt or raises to give up; ``succeeded`` says bytes moved again, so its clock starts over."""

    def failed(self, error: grpc.RpcError, what_failed: str) -> None: ...

    def succeeded(self) -> None: ...


def download_blob(stub: rpc.FederationStub, sha256: str, cache: BlobStore,
                  received_chunk: Callable[[int], object] = lambda size: None, retry: Retry | None = None,
                  stall_seconds: float = STALL_SECONDS) -> int:
    """Streams one blob into the cache (verified before it is adopted), telling ``received_chunk`` each chunk's
    size; returns the bytes received. With ``retry``, a transient failure (a cut or stalled stream) is retried
    from the bytes already received; without, it raises."""
    temporary = cache.new_temporary("download-")
    digest, received = hashlib.sha256(), 0
    deadline = ProgressDeadline(stall_seconds)
    try:
        with open(temporary, "wb") as handle:
            while True:
                before = handle.tell()
                call = stub.ReadBlob(pb.BlobRequest(sha256=sha256, offset=before))
                try:
                    with deadline.watching(call):
                        for chunk in call:
                            if chunk.offset != handle.tell():
                                raise DumeError(f"blob {sha256[:12]} arrived out of order: fetch again")
                            handle.write(chunk.data)
                            digest.update(chunk.data)
                            received += len(chunk.data)
                            deadline.progressed()
                            received_chunk(len(chunk.data))
                    break
                except grpc.RpcError as error:
                    if retry is None or error.code() not in TRANSIENT:
                        raise
                    if handle.tell() > before:
                        retry.succeeded()  # it moved: the time allowed without progress starts over
                    retry.failed(error, f"download of blob {sha256[:12]} interrupted at byte {handle.tell()}")
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != sha256:
            raise DumeError(f"blob {sha256[:12]} arrived corrupted: fetch again")
        cache.adopt(temporary, sha256)
    finally:
        temporary.unlink(missing_ok=True)
    return received


def fetch_missing(stub: rpc.FederationStub, wanted: dict[str, int], cache: BlobStore,
                  local: LocalLookup | None = None, retry: Retry | None = None,
                  stall_seconds: float = STALL_SECONDS) -> tuple[int, int]:
    """Downloads the wanted blobs neither in the cache nor available locally; returns (blobs, bytes) fetched."""
    missing = []
    for sha256 in sorted(wanted):
        if cache.has(sha256):
            continue
        data = local(sha256) if local else None
        if data is not None and hashlib.sha256(data).hexdigest() == sha256:
            cache.put_bytes(data)
            continue
        missing.append(sha256)
    total = 0
    with byte_progress(sum(wanted[sha256] for sha256 in missing), "download") as bar:
        for sha256 in missing:
            total += download_blob(stub, sha256, cache, bar.update, retry, stall_seconds)
    return len(missing), total


def write_version(version: pb.Version, cache: BlobStore, out_dir: Path) -> Path:
    """Writes the version's checkpoint directory from cached blobs; ``out_dir`` must not exist or be empty."""
    with staged_directory(out_dir) as staging:
        for file in version.files:
            if file.sha256:
                shutil.copyfile(cache.path(file.sha256), staging / file.name)
            else:
                tensors = {entry.name: tensor_from_bytes(entry, cache.read_bytes(entry.sha256))
                           for entry in file.shard.tensors}
                save_shard(staging / file.name, tensors)
    return out_dir


def fetch_version(stub: rpc.FederationStub, number: int, cache: BlobStore, out_dir: Path,
                  local: LocalLookup | None = None, retry: Retry | None = None,
                  stall_seconds: float = STALL_SECONDS) -> tuple[pb.Version, int, int]:
    """Fetches version ``number`` (0: the latest) into ``out_dir``; returns it and the (blobs, bytes) downloaded.
    With ``retry``, a blob whose stream is cut or stalls resumes from the bytes already received."""
    check_free(out_dir)
    try:
        version = stub.GetVersion(pb.VersionRequest(version=number), timeout=60)
        count, total = fetch_missing(stub, version_blobs(version), cache, local, retry, stall_seconds)
    except grpc.RpcError as error:
        raise refusal(error, "cannot fetch the model") from None
    write_version(version, cache, out_dir)
    return version, count, total
