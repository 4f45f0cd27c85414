"""The hash-chained audit log: each entry's hash covers the previous entry's hash and its own fields.

    entry_hash = SHA-256(previous_hash | sequence | at | kind | subject | detail_json)

so changing, dropping or reordering any entry breaks every later hash. The coordinator appends; anyone holding
the entries can verify them with ``verify_chain``. A chain alone cannot show that entries were cut off its end, or
that it was rewritten whole from some entry on: for that, keep the last hash an earlier verification printed
somewhere the coordinator's host cannot change, and pass it as ``anchor``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    sequence: int
    at: float
    kind: str
    subject: str
    detail_json: str
    previous_hash: str
    entry_hash: str


def canonical_json(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"))


def entry_hash(previous_hash: str, sequence: int, at: float, kind: str, subject: str, detail_json: str) -> str:
    fields = [previous_hash, str(sequence), repr(float(at)), kind, subject, detail_json]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()


def verify_chain(entries: Iterable[AuditEntry], anchor: str | None = None) -> int:
    """The number of entries, if the chain is intact (and holds the entry hashed ``anchor``, when given); raises
    ValueError naming the first broken entry."""
    previous, count, anchored = GENESIS, 0, anchor is None
    for count, entry in enumerate(entries, start=1):
        if entry.sequence != count:
            raise ValueError(f"audit entry {count} is missing (found entry {entry.sequence} in its place)")
        if entry.previous_hash != previous:
            raise ValueError(f"audit entry {entry.sequence} does not follow entry {entry.sequence - 1}")
        expected = entry_hash(previous, entry.sequence, entry.at, entry.kind, entry.subject, entry.detail_json)
        if entry.entry_hash != expected:
            raise ValueError(f"audit entry {entry.sequence} ({entry.kind} {entry.subject}) was altered")
        previous = entry.entry_hash
        anchored = anchored or entry.entry_hash == anchor
    if not anchored:
        raise ValueError(f"no entry has the anchor hash {anchor}: entries were removed from the end of the log, or "
                         f"it was rewritten from some entry on (it now ends at entry {count})")
    return count
