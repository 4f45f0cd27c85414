"""Failpoints: named places in the coordinator where a test can stop the daemon dead, deterministically.

A test facility, inert in production. ``failpoint(name)`` does nothing unless the daemon was started with the
environment variable ``DUME_FAILPOINTS`` naming ``name`` (names separated by commas). When it does, the thread that
reaches the point writes the marker file ``<state>/failpoints/<name>`` and sleeps until the process is killed; the
rest of the daemon keeps serving. A test waits for the marker, SIGKILLs the daemon and restarts it without the
variable, so that a crash lands at exactly that point rather than wherever a timer happened to fall. The daemon
logs a warning at start when the variable names any point (``arm``); a coordinator that was not armed (every one
outside ``serve``) never stops at one.

The points (see the call sites):

* ``enrolment.answering``: a node's enrolment is recorded (its token spent); the answer is not sent yet.
* ``commit.validating_statistics``: a statistics upload is being validated; nothing of it is recorded yet.
* ``publication.solving``: the routers were solved for a new version; nothing of the version is written yet.
* ``publication.before_version_row``: the blobs of a new version are written; its ledger row is not.
* ``revocation.before_publication``: a member's revocation is recorded; no version without it is published yet.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dume.shared.errors import DumeError

VARIABLE = "DUME_FAILPOINTS"
POINTS = ("enrolment.answering", "commit.validating_statistics", "publication.solving",
          "publication.before_version_row", "revocation.before_publication")
_armed: set[str] = set()
_markers: Path | None = None


def arm(state_root: Path) -> list[str]:
    """Reads ``DUME_FAILPOINTS`` once, for the daemon serving ``state_root``; returns the points it names."""
    global _markers
    names = sorted({name.strip() for name in os.environ.get(VARIABLE, "").split(",") if name.strip()})
    unknown = sorted(set(names) - set(POINTS))
    if unknown:
        raise DumeError(f"{VARIABLE} names unknown failpoints {', '.join(unknown)}; known: {', '.join(POINTS)}")
    _armed.clear()
    _armed.update(names)
    _markers = state_root / "failpoints"
    return names


def failpoint(name: str) -> None:
    """Stops the calling thread for good at ``name`` when that point is armed (after leaving its marker)."""
    assert name in POINTS, name
    if name not in _armed or _markers is None:
        return
    _markers.mkdir(exist_ok=True)
    (_markers / name).write_text(f"{os.getpid()}\n")
    threading.Event().wait()  # until the test kills the process
