"""A content-addressed blob directory: each blob is a file named by the SHA-256 of its bytes.

Used by the coordinator for every tensor it holds and by nodes as their download cache. A blob appears under its
final name only complete and verified (``dume.shared.files``: written beside it, fsynced, renamed), so a crash at any
instant leaves either no blob or the whole blob, never a half-written one under a name anything refers to.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dume.shared.files import replace_durably, write_atomically

READ_BYTES = 1 << 20


def sha256_file(path: Path, start: int = 0, size: int | None = None) -> str:
    """SHA-256 of ``size`` bytes of ``path`` from ``start`` (all of it by default), read a chunk at a time."""
    digest = hashlib.sha256()
    for chunk in read_range(path, start, size):
        digest.update(chunk)
    return digest.hexdigest()


def read_range(path: Path, start: int = 0, size: int | None = None, chunk_bytes: int = READ_BYTES) -> Iterator[bytes]:
    """The bytes of ``path`` from ``start``, ``chunk_bytes`` at a time, so memory never holds more than a chunk."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = size if size is not None else os.fstat(handle.fileno()).st_size - start
        while left > 0:
            chunk = handle.read(min(chunk_bytes, left))
            if not chunk:
                raise OSError(f"{path} ended {left} bytes early")
            left -= len(chunk)
            yield chunk


class BlobStore:
    """Blobs under ``root/ab/abcdef...``; temporary files under ``root/tmp`` (on the same filesystem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.temporary = root / "tmp"
        self.temporary.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def read_buffer(self, sha256: str) -> bytearray:
        """The blob's bytes read straight into a buffer the caller owns (for a tensor: no second copy)."""
        buffer = bytearray(self.path(sha256).stat().st_size)
        self.read_into(sha256, memoryview(buffer))
        return buffer

    def read_into(self, sha256: str, buffer: memoryview) -> None:
        """Fills ``buffer`` (exactly the blob's size: a tensor's memory, say) with the blob's bytes."""
        size, wanted = self.path(sha256).stat().st_size, memoryview(buffer).nbytes
        if size != wanted:
            raise OSError(f"{self.path(sha256)} holds {size} bytes, not {wanted}")
        self.read_range_into(sha256, 0, buffer)

    def read_range_into(self, sha256: str, start: int, buffer: memoryview) -> None:
        """Fills ``buffer`` with the blob's bytes from ``start`` on (a block of a tensor's rows, say)."""
        path, buffer = self.path(sha256), memoryview(buffer).cast("B")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(start)
            filled = 0
            while filled < buffer.nbytes:
                read = handle.readinto(buffer[filled:])
                if not read:
                    raise OSError(f"{path} ended {buffer.nbytes - filled} bytes early")
                filled += read

    def put_bytes(self, data: bytes | bytearray | memoryview) -> str:
        """Stores ``data`` (if not already held) and returns its SHA-256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self.path(sha256).parent.mkdir(exist_ok=True)
            write_atomically(self.path(sha256), data, mode=0o600)
        return sha256

    def adopt(self, file: Path, sha256: str) -> None:
        """Moves a complete, fsynced file whose SHA-256 was checked into the store under its name."""
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        replace_durably(file, target)

    def new_temporary(self, prefix: str = "") -> Path:
        """A fresh temporary file name inside the store's filesystem (for downloads that are then adopted)."""
        descriptor, name = tempfile.mkstemp(dir=self.temporary, prefix=prefix)
        os.close(descriptor)
        return Path(name)
