"""Files that appear only complete: the one atomic-write routine, and output directories built beside their place.

A reader (another process, or this one after a crash) sees the old file or the new one, never half of one: the
data goes to a temporary file in the same directory, which is fsynced, renamed over the target, and then the
directory is fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dume.shared.errors import DumeError


def fsync_directory(path: Path) -> None:
    """Makes a rename or a new entry inside ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def append_file(source: Path, descriptor: int, size: int, buffer_bytes: int = 8 << 20) -> None:
    """Appends the first ``size`` bytes of ``source`` to the open file ``descriptor``, in the kernel where it can
    (``copy_file_range``: no copy through Python, a reflink on filesystems that share extents)."""
    with open(source, "rb", buffering=0) as handle:
        left = size
        try:
            while left > 0:
                copied = os.copy_file_range(handle.fileno(), descriptor, left)
                if copied == 0:
                    break
                left -= copied
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        handle.seek(size - left)
        while left > 0:
            chunk = handle.read(min(buffer_bytes, left))
            if not chunk:
                break
            left -= os.write(descriptor, chunk)
        if left:
            raise OSError(f"{source} ended {left} bytes early")


def replace_durably(source: Path, target: Path) -> None:
    """Renames a complete, fsynced file over ``target`` and makes the rename durable."""
    os.replace(source, target)
    fsync_directory(target.parent)


@contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for the caller to write; on success it is fsynced and renamed over
    ``path`` (created with ``mode`` from the start, so a secret is never readable by others, not even briefly); on
    failure it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            break
        except FileExistsError:
            continue
    try:
        yield temporary
        fsync_file(temporary)
        replace_durably(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` atomically and durably (see ``atomic_path``)."""
    with atomic_path(path, mode) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk, or the user's quota on it


@contextmanager
def disk_full_is_one_line(where: Path, remedy: str) -> Iterator[None]:
    """A full disk while a command writes (its output, its working directory) becomes the one line a person acts on
    instead of a traceback: where it was writing (the file, else ``where``) and ``remedy``, what to do about it."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL:
            raise
        raise DumeError(f"the disk is full (writing {error.filename or where}): {remedy}") from None


def check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DumeError(f"output {out_dir} already exists: remove it or choose another --out")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh folder beside ``out_dir`` (made at once, so an unwritable --out fails before any heavy work);
    when the block succeeds its files are fsynced and it is renamed to ``out_dir``; when it fails it is removed."""
    check_free(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a checkpoint is an ordinary output directory
    except OSError as error:
        raise DumeError(f"cannot create {out_dir} ({error.strerror}): choose a writable --out") from None
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_directory(staging)
        if out_dir.exists():
            out_dir.rmdir()
        replace_durably(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
