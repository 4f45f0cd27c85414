"""Refused: a call the coordinator declines, typed by kind so that only the servicers know gRPC status codes."""

from __future__ import annotations

from typing import Literal

from dume.shared.errors import DumeError

RefusalKind = Literal["unauthenticated", "permission", "invalid", "precondition", "not_found"]


class Refused(DumeError):
    """The caller asked for something the coordinator will not do; the message says why and what to do instead."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
