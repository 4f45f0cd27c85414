"""``dume-coordinator backup`` and ``restore``: a consistent copy of a state directory, taken while it serves.

The ledger is copied with SQLite's online backup API (a snapshot of one committed state, whatever the daemon
writes meanwhile); the blobs that snapshot names are then added as they are. Blobs are content-addressed and
immutable, and each one is in the store before any row names it, so every blob the snapshot names is there. The
archive is a plain tar (tensors do not compress): config, CA, admin identity, ledger and those blobs; not the
uploads in progress (nodes resume them) nor the daemon's pid and lock files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from pathlib import Path

from dume.coordinator.ledger import Ledger
from dume.coordinator.state_dir import StateDir
from dume.shared.errors import DumeError
from dume.shared.files import atomic_path
from dume.shared.transport.blobs import BlobStore, sha256_file

MANIFEST = "dume-backup.json"
FORMAT = 1


def backup(state: StateDir, out: Path) -> tuple[int, int]:
    """Writes the archive to ``out`` atomically; returns (blobs, bytes of blobs) it holds."""
    state.config()  # "not a state directory" first
    if out.exists():
        raise DumeError(f"{out} exists: choose a new --out file (a backup never overwrites one)")
    if not out.parent.is_dir():
        raise DumeError(f"{out.parent} is not a directory: create it or choose another --out")
    blobs = BlobStore(state.blobs)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".dume-backup-") as scratch:
        snapshot = Path(scratch) / "ledger.sqlite"
        _snapshot_ledger(state.ledger, snapshot)
        ledger = Ledger(snapshot)
        try:
            referenced = sorted(ledger.referenced_blobs())
        finally:
            ledger.close()
        missing = [sha for sha in referenced if not blobs.has(sha)]
        if missing:
            raise DumeError(f"the state directory lacks {len(missing)} blobs its ledger names (first "
                            f"{missing[0][:12]}): it is damaged; back up an intact copy")
        total = 0
        with atomic_path(out, mode=0o600) as partial, tarfile.open(partial, "w") as archive:
            _add_bytes(archive, MANIFEST, json.dumps({"format": FORMAT, "blobs": referenced}).encode())
            for relative in ("config.json", "ca/key.pem", "ca/cert.pem", "admin/key.pem", "admin/cert.pem"):
                archive.add(state.root / relative, relative)
            archive.add(snapshot, "ledger.sqlite")
            for sha in referenced:
                archive.add(blobs.path(sha), blobs.path(sha).relative_to(state.root).as_posix())
                total += blobs.path(sha).stat().st_size
    return len(referenced), total


def _snapshot_ledger(source: Path, target: Path) -> None:
    if not source.is_file():
        raise DumeError(f"{source} is missing: this state directory has no ledger yet; start `serve` once first")
    live = sqlite3.connect(source, timeout=30)
    copy = sqlite3.connect(target)
    try:
        live.backup(copy)
    finally:
        copy.close()
        live.close()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    archive.addfile(info, io.BytesIO(data))


def restore(archive_path: Path, root: Path) -> int:
    """Recreates a state directory at ``root`` (which must not exist or be empty); returns the blobs restored.

    Everything is unpacked and every blob checked against its name beside ``root`` first, then renamed into
    place, so a bad archive leaves nothing behind.
    """
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DumeError(f"{root} is not empty: restore into a new --state directory")
    if not archive_path.is_file():
        raise DumeError(f"{archive_path} does not exist: give the file `dume-coordinator backup --out` wrote")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.restoring-"))
    try:
        try:
            with tarfile.open(archive_path, "r") as archive:
                archive.extractall(staging, filter="data")  # no absolute paths, links out, or devices
            manifest = json.loads((staging / MANIFEST).read_text())
        except (tarfile.TarError, OSError, ValueError) as error:
            raise DumeError(f"{archive_path} is not a readable coordinator backup ({error}): give the file "
                            "`dume-coordinator backup --out` wrote") from None
        if manifest.get("format") != FORMAT:
            raise DumeError(f"{archive_path} has backup format {manifest.get('format')}; this version reads "
                            f"format {FORMAT}: restore it with the dume version that wrote it")
        blobs = BlobStore(staging / "blobs")
        for sha in manifest["blobs"]:
            if not blobs.has(sha) or sha256_file(blobs.path(sha)) != sha:
                raise DumeError(f"{archive_path} is damaged: blob {sha[:12]} is missing or corrupt; use another "
                                "backup")
        (staging / MANIFEST).unlink()
        for secret in ("ca/key.pem", "admin/key.pem"):
            os.chmod(staging / secret, 0o600)
        staging.chmod(0o700)
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    StateDir(root).config()
    return len(manifest["blobs"])
