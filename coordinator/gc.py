"""``dume-coordinator gc``: deletes the blobs and staged bytes nothing needs any more.

What goes: staging of uploads that expired or whose member was revoked or left; blobs in the store that no row
names (a crash between adopting a blob and recording the row that names it leaves one); the models of revoked or
departed members; the blobs of versions the operator prunes and of bases nothing kept was made under. A blob that
anything kept still names stays, whoever else named it (experts share most of their non-MLP tensors).

Safety: the daemon runs ``collect`` on its own ledger, with publication paused (a round writes its blobs before
the row that names them) and inside one ledger transaction, which is also where a commit adopts its blobs and
writes its row: the set of blobs in use cannot grow while it is computed and the files are deleted. Open uploads
of current members count as in use, since their plans may name blobs the store already holds. The rows stop
naming what goes in the same transaction, before the files are deleted; a crash in between leaves at worst
orphaned blobs, which the next ``gc`` deletes.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from dume.coordinator.ledger import Ledger
from dume.coordinator.records import BlobUse, GarbageReport
from dume.coordinator.uploads import EMPTY_SHA256, MEMBER_FILE, Uploads
from dume.shared.transport.blobs import BlobStore

log = logging.getLogger("dume.coordinator")
BLOB_NAME = re.compile(r"[0-9a-f]{64}")
TEMPORARY_GRACE_SECONDS = 600.0  # a temporary file younger than this may still be written


def collect(ledger: Ledger, blobs: BlobStore, uploads: Uploads, prune_before: int, dry_run: bool) -> GarbageReport:
    """Deletes (or with ``dry_run`` only counts) what nothing needs; the caller has paused publication."""
    with ledger.exclusive():
        with ledger.transaction():
            members = {member.name: member.state for member in ledger.members()}
            dead_uploads = _dead_uploads(uploads, members)
            use = ledger.blob_use(prune_before)
            live = use.live | _open_upload_blobs(uploads, dead_uploads) | {EMPTY_SHA256}
            garbage = {sha: path for sha, path in _stored_blobs(blobs) if sha not in live}
            temporary = list(_temporary_files(blobs))
            kinds = _classify(garbage, use)
            report = GarbageReport(
                dry_run=dry_run, blobs=len(garbage), bytes=sum(_size(path) for path in garbage.values()),
                orphaned_blobs=kinds["orphan"], member_blobs=kinds["member"], version_blobs=kinds["version"],
                basis_blobs=kinds["basis"], uploads=len(dead_uploads),
                upload_bytes=sum(_tree_size(directory) for directory in dead_uploads),
                temporary_files=len(temporary), pruned_versions=use.pruning, members=sorted(use.departed))
            if dry_run:
                return report
            ledger.forget(use, set(garbage))
            ledger.audit("gc", "blobs", **asdict(report))
        # The rows no longer name these (committed): deleting them now, still holding the ledger, is safe.
        for path in [*garbage.values(), *temporary]:
            path.unlink(missing_ok=True)
        for directory in dead_uploads:
            shutil.rmtree(directory, ignore_errors=True)
    log.info("gc deleted %d blobs (%d bytes) and %d staged uploads; pruned versions %s; members %s", report.blobs,
             report.bytes, report.uploads, use.pruning or "none", ", ".join(report.members) or "none")
    return report


def _dead_uploads(uploads: Uploads, members: dict[str, str]) -> list[Path]:
    """Staging directories that can never be committed: expired, or of a member no longer enrolled or active."""
    dead = set(uploads.stale())
    for directory in uploads.root.iterdir():
        try:
            member = (directory / MEMBER_FILE).read_text()
        except OSError:
            continue  # being created (or broken: then it expires)
        if members.get(member) not in ("enrolled", "active"):
            dead.add(directory)
    return sorted(dead)


def _open_upload_blobs(uploads: Uploads, dead: list[Path]) -> set[str]:
    """Every blob the open uploads of current members name: their commits may count the store's copy as sent."""
    dead_ids = {directory.name for directory in dead}
    return {sha for planned in uploads.open_plans() if planned.upload_id not in dead_ids for sha in planned.sizes}


def _stored_blobs(blobs: BlobStore) -> Iterator[tuple[str, Path]]:
    for folder in blobs.root.iterdir():
        if folder.is_dir() and len(folder.name) == 2:
            for path in folder.iterdir():
                if BLOB_NAME.fullmatch(path.name) and path.name.startswith(folder.name):
                    yield path.name, path


def _temporary_files(blobs: BlobStore) -> Iterator[Path]:
    """Files a crash left mid-write: in the store's tmp folder, or beside the blobs under a name no blob has."""
    before = time.time() - TEMPORARY_GRACE_SECONDS
    for folder in blobs.root.iterdir():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if (folder == blobs.temporary or not BLOB_NAME.fullmatch(path.name)) and path.is_file() \
                    and path.stat().st_mtime < before:
                yield path


def _classify(garbage: dict[str, Path], use: BlobUse) -> dict[str, int]:
    """How many blobs of each kind go; a blob named by several counts once, as the first kind that names it."""
    member = set().union(*use.departed.values())
    version = set().union(*use.pruned.values())
    basis = set().union(*use.superseded.values())
    kinds = {"member": 0, "version": 0, "basis": 0, "orphan": 0}
    for sha in garbage:
        kind = "member" if sha in member else "version" if sha in version else "basis" if sha in basis else "orphan"
        kinds[kind] += 1
    return kinds


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_size(directory: Path) -> int:
    return sum(_size(path) for path in directory.rglob("*") if path.is_file())
