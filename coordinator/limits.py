"""The coordinator's resource limits: what one member may make the daemon hold, and for how long.

They are settings of the state directory (``limits`` in config.json, written by ``init`` with these defaults and
read again at every start; a state directory made before they existed gets the defaults). A call that would go
past one is refused with RESOURCE_EXHAUSTED, which nodes retry with backoff, and a message naming the setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dume.shared.errors import DumeError

GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    staging_quota_bytes: int = 64 * GIB  # bytes one member may have staged (declared, not yet committed)
    open_uploads_per_member: int = 4  # upload plans one member may hold open at once
    staging_expiry_seconds: float = 86_400.0  # an upload untouched this long is deleted with its staged bytes
    max_file_bytes: int = 256 << 20  # one config or tokenizer file of a model
    min_free_bytes: int = GIB  # free space the state directory keeps after the bytes a new plan declares
    watch_streams_per_member: int = 2  # Watch streams one member may hold open (a reconnect may overlap the old)
    watch_streams_total: int = 64  # Watch streams in all; each holds a server thread
    watch_stream_seconds: float = 600.0  # a Watch stream then ends cleanly and the node reconnects
    transfers_per_member: int = 4  # SendChunks and ReadBlob streams one member may have open at once
    unary_workers: int = 32  # server threads for every other call, on top of the Watch streams
    datasets_per_node: int = 16  # contributions one node may have recorded (each holds a G per layer on disk)
    # A contribution that would make its expert's token total exceed this multiple of the median of the other
    # experts' totals is held for the operator (`dume-coordinator approve`); 0: off (docs/limits.md, router capture).
    approve_tokens_above_ratio: float = 0.0

    @classmethod
    def from_config(cls, values: dict[str, Any] | None) -> Limits:
        """The limits in config.json, every missing one at its default; an unknown or non-positive one refused."""
        values = values or {}
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DumeError(f"config.json sets unknown limit {unknown[0]!r}: the limits are {', '.join(sorted(known))}")
        limits = cls(**values)
        for name, value in asdict(limits).items():
            least = 0 if name in ("min_free_bytes", "approve_tokens_above_ratio") else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
                raise DumeError(f"config.json limit {name} = {value!r} must be a number of at least {least}")
        return limits
