"""Refused: a call the coordinator declines, typed by kind so that only the servicers know gRPC status codes."""

from __future__ import annotations

import errno
import sqlite3
from typing import Literal

from dume.shared.errors import DumeError
from dume.shared.files import FULL

# "stale": the upload was overtaken (its expert's weights moved, or its dataset was taken out): the node does not
# send it again, it acts on what the federation now says.
RefusalKind = Literal["unauthenticated", "permission", "invalid", "precondition", "not_found", "exhausted",
                      "unavailable", "stale"]
MESSAGE_CHARACTERS = 2000  # a refusal's message travels in a gRPC trailer (metadata is capped at 8-16 KiB)
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class Refused(DumeError):
    """The caller asked for something the coordinator will not do; the message says why and what to do instead."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(one_line(message))
        self.kind = kind


def one_line(message: str, limit: int = MESSAGE_CHARACTERS) -> str:
    """The message as one printable line of bounded length. Refusals quote what the caller sent (tensor and file
    names, upload ids), which may hold newlines or run to megabytes; the cut is in the middle, so the fix the message
    ends with stays."""
    line = "".join(character if character.isprintable() else repr(character)[1:-1] for character in message)
    if len(line) <= limit:
        return line
    half = (limit - 5) // 2
    return f"{line[:half]} ... {line[-half:]}"


def storage_refusal(error: Exception) -> Refused | None:
    """A full or unwritable state directory as the refusal a caller can act on (its paths stay in the daemon's
    log); None for any other error. Both kinds are retried by nodes, so work goes on once the operator fixed it."""
    message = str(error).lower()
    if (isinstance(error, OSError) and error.errno in FULL) or (
            isinstance(error, sqlite3.OperationalError) and "full" in message):
        return Refused("exhausted", "the coordinator's disk is full: its operator must free space in the state "
                       "directory; nodes retry and go on from where they were")
    if (isinstance(error, OSError) and error.errno in NOT_WRITABLE) or (
            isinstance(error, sqlite3.OperationalError) and ("readonly" in message or "read-only" in message)):
        return Refused("unavailable", "the coordinator cannot write its state directory (read-only or not "
                       "permitted): its operator must make it writable; reading versions still works")
    return None
