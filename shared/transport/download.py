"""Downloading a published version: fetch only the blobs not held locally, then write the Hugging Face directory.

The directory is assembled from blobs exactly as ``dume merge`` writes it (the same shard files, index, config
and tokenizer files), into a staging folder that is renamed into place only when complete. A shard is its
header followed by its tensors' blobs, appended as they are (``shard_layout``), never rebuilt from tensors.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc

from dume.shared.errors import DumeError
from dume.shared.files import append_file, check_free, staged_directory
from dume.shared.method.shard_layout import SHARD_METADATA, ShardTensor, shard_header, shard_order
from dume.shared.progress import byte_progress
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.channels import TRANSIENT, refusal, spread
from dume.shared.transport.stall import STALL_SECONDS, ProgressDeadline
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc
from dume.v1 import tensors_pb2

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
                  received_chunk: Callable[[int], object] = lambda size: None,
                  opened: Callable[[grpc.Call], object] = lambda call: None, retry: Retry | None = None,
                  stall_seconds: float = STALL_SECONDS) -> int:
    """Streams one blob into the cache (verified before it is adopted), telling ``received_chunk`` each chunk's
    size and ``opened`` each call (so that another thread can cancel it); returns the bytes received. With
    ``retry``, a transient failure (a cut or stalled stream) is retried from the bytes already received; without,
    it raises."""
    temporary = cache.new_temporary("download-")
    digest, received = hashlib.sha256(), 0
    deadline = ProgressDeadline(stall_seconds)
    try:
        with open(temporary, "wb") as handle:
            while True:
                before = handle.tell()
                call = stub.ReadBlob(pb.BlobRequest(sha256=sha256, offset=before))
                opened(call)
                try:
                    with deadline.watching(call):
                        for chunk in call:
                            if chunk.offset != handle.tell():
                                raise DumeError(f"blob {sha256[:12]} arrived out of order: fetch again")
                            data = chunk.data  # each read of a bytes field copies it
                            handle.write(data)
                            digest.update(data)
                            received += len(data)
                            deadline.progressed()
                            received_chunk(len(data))
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
    """Downloads the wanted blobs neither in the cache nor available locally, on a few streams side by side;
    returns (blobs, bytes) fetched."""
    missing = []
    for sha256 in sorted(wanted):
        if cache.has(sha256):
            continue
        data = local(sha256) if local else None
        if data is not None and hashlib.sha256(data).hexdigest() == sha256:
            cache.put_bytes(data)
            continue
        missing.append(sha256)
    lock, calls, stopping = threading.Lock(), [], threading.Event()
    with byte_progress(sum(wanted[sha256] for sha256 in missing), "download") as bar:

        def received(size: int) -> None:
            with lock:
                bar.update(size)

        def opened(call: grpc.Call) -> None:
            calls.append(call)
            if stopping.is_set():
                call.cancel()

        def download_all(blobs: list[str]) -> int:
            return sum(download_blob(stub, sha256, cache, received, opened, retry, stall_seconds) for sha256 in blobs)

        streams = spread({sha256: wanted[sha256] for sha256 in missing})
        pool = ThreadPoolExecutor(max(1, len(streams)), thread_name_prefix="download")
        try:
            total = sum(pool.map(download_all, streams))
        except BaseException:  # a failed stream or SIGTERM: end the others now rather than wait for them
            stopping.set()
            for call in list(calls):
                call.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
    return len(missing), total


def write_version(version: pb.Version, cache: BlobStore, out_dir: Path) -> Path:
    """Writes the version's checkpoint directory from cached blobs; ``out_dir`` must not exist or be empty."""
    with staged_directory(out_dir) as staging:
        for file in version.files:
            if file.sha256:
                shutil.copyfile(cache.path(file.sha256), staging / file.name)
            else:
                write_shard_from_blobs(staging / file.name, file.shard, cache)
    return out_dir


def write_shard_from_blobs(path: Path, shard: tensors_pb2.TensorManifest, cache: BlobStore) -> None:
    """A shard file assembled from its tensors' blobs, which are already the bytes the file holds: its header,
    then each blob appended as it is (no tensor is deserialised or re-serialised)."""
    entries = {entry.name: entry for entry in shard.tensors}
    layout = [ShardTensor(entry.name, entry.dtype, tuple(entry.shape), entry.size_bytes) for entry in shard.tensors]
    with open(path, "wb", buffering=0) as handle:
        header = memoryview(shard_header(layout, SHARD_METADATA))
        while header:
            header = header[handle.write(header):]
        for tensor in shard_order(layout):
            append_file(cache.path(entries[tensor.name].sha256), handle.fileno(), tensor.size)


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
