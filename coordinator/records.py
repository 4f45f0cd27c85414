"""The coordinator's typed records: the ledger's rows as read back, and the views the layers above build from them.

Tensor lists stay ``TensorManifest`` messages (they are the content-addressed wire contract itself); everything
else is plain Python, so the commit logic and the publisher never handle request or response messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dume.v1 import tensors_pb2


@dataclass(frozen=True)
class Member:
    name: str
    state: str  # enrolled, active, left, revoked
    cert_serial: str | None
    reason: str
    model: tensors_pb2.TensorManifest | None
    files: dict[str, str]  # file name -> blob sha256


@dataclass(frozen=True)
class Statistics:
    member: str
    basis_hash: str
    token_count: int
    manifest: tensors_pb2.TensorManifest


@dataclass(frozen=True)
class BasisRecord:
    hash: str
    members: list[str]
    manifest: tensors_pb2.TensorManifest


@dataclass(frozen=True)
class VersionFile:
    """One file of a published checkpoint: a plain file (its blob) or a safetensors shard (its tensor blobs)."""

    name: str
    sha256: str = ""  # plain files only
    size_bytes: int = 0  # plain files only
    shard: tensors_pb2.TensorManifest = field(default_factory=tensors_pb2.TensorManifest)  # empty for plain files

    def blob_hashes(self) -> list[str]:
        """The blobs a node reads to assemble this file (which publishing makes readable)."""
        return ([self.sha256] if self.sha256 else []) + [entry.sha256 for entry in self.shard.tensors]


@dataclass(frozen=True)
class VersionRecord:
    number: int
    exact: bool
    basis_hash: str
    members: list[str]
    files: list[VersionFile]
    fingerprint: str
    at: float


@dataclass(frozen=True)
class Published:
    """What a watching node is told: the current basis and the latest version (0 when none)."""

    basis_hash: str
    basis_members: list[str]
    version: int
    exact: bool


@dataclass(frozen=True)
class MemberStatus:
    name: str
    state: str
    online: bool
    stats_current: bool
    reason: str
    token_count: int


@dataclass(frozen=True)
class Status:
    """The admin's view: the latest version, the current basis, every member and the audit log's length."""

    version: int
    exact: bool
    basis_hash: str
    members: list[MemberStatus]
    audit_entries: int
    settings: dict[str, Any]
    publication_error: str  # why the last publication round failed; "" when it succeeded


@dataclass(frozen=True)
class Removal:
    """What a revocation or leave published: the latest version, which no longer contains the member (0 when none
    was ever published), or, when the latest version still contains it, why no version without it was published."""

    version: int
    publication_error: str = ""
