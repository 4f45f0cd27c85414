"""Output directories that appear only complete: built in a staging folder beside them, renamed at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dume.shared.errors import DumeError


def check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DumeError(f"output {out_dir} already exists: remove it or choose another --out")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh folder beside ``out_dir`` (made at once, so an unwritable --out fails before any heavy work);
    renames it to ``out_dir`` when the block succeeds and removes it when the block fails."""
    check_free(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a checkpoint is an ordinary output directory
    except OSError as error:
        raise DumeError(f"cannot create {out_dir} ({error.strerror}): choose a writable --out") from None
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
