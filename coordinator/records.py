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
    """An enrolled node. It owns the expert named after it when ``expert == name`` (its model is the expert's
    weights), else it contributes statistics to ``expert``."""

    name: str
    state: str  # enrolled, active, left, revoked
    cert_serial: str | None
    reason: str
    model: tensors_pb2.TensorManifest | None
    files: dict[str, str]  # file name -> blob sha256
    expert: str = ""

    @property
    def owner(self) -> bool:
        return self.expert == self.name


@dataclass(frozen=True)
class Contribution:
    """The statistics of one named dataset of one node toward one expert, and what they were computed under."""

    node: str
    dataset: str
    expert: str
    basis_hash: str
    expert_hash: str
    token_count: int
    manifest: tensors_pb2.TensorManifest

    @property
    def label(self) -> str:
        return f"{self.node}/{self.dataset}"


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
    pruned_at: float | None = None  # when ``gc`` deleted its blobs; a pruned version is no longer served
    contributions: list[str] = field(default_factory=list)  # "node/dataset" of every contribution it holds


@dataclass(frozen=True)
class RoutingProbeRecord:
    """A version run over the operator's probe text: per layer, each expert's share of the real tokens its router
    ranks first (``experts`` order), or why the probe failed (``error``, and no shares)."""

    version: int
    experts: list[str]
    per_layer: list[list[float]]
    tokens: int
    error: str = ""

    def mean(self) -> dict[str, float]:
        """Each expert's share averaged over layers."""
        if not self.per_layer:
            return {}
        return {name: sum(row[index] for row in self.per_layer) / len(self.per_layer)
                for index, name in enumerate(self.experts)}


@dataclass(frozen=True)
class RoutingStatus:
    """The latest probe as status shows it: the record, and the flag ratio the daemon runs with."""

    probe: RoutingProbeRecord
    flag_ratio: float

    def flagged(self) -> list[str]:
        """Experts whose mean share exceeds ``flag_ratio`` times the fair share 1/E."""
        fair = 1 / len(self.probe.experts) if self.probe.experts else 0.0
        return [name for name, share in self.probe.mean().items() if share > self.flag_ratio * fair]


@dataclass(frozen=True)
class Published:
    """What a watching node is told: the current basis and the latest version (0 when none)."""

    basis_hash: str
    basis_members: list[str]
    version: int
    exact: bool
    expert_hash: str = ""  # the current weights of the watching node's expert
    removed_datasets: list[str] = field(default_factory=list)  # the watching node's datasets taken out


@dataclass(frozen=True)
class MemberStatus:
    name: str
    state: str
    online: bool
    stats_current: bool
    reason: str
    token_count: int
    expert: str


@dataclass(frozen=True)
class ContributionStatus:
    node: str
    dataset: str
    token_count: int
    basis_hash: str
    current: bool  # under the current basis and its expert's current weights


@dataclass(frozen=True)
class ExpertStatus:
    name: str
    owner: str
    expert_hash: str  # "" before the owner's upload
    contributors: list[str]  # nodes admitted to its group besides the owner
    contributions: list[ContributionStatus]  # in the order they are summed
    pending: list[ContributionStatus] = field(default_factory=list)  # held for approval: in no version


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
    experts: list[ExpertStatus] = field(default_factory=list)
    version_contributions: list[str] = field(default_factory=list)  # "node/dataset" the latest version holds
    routing: RoutingStatus | None = None  # the latest probe of routing shares (None: no probe configured or run)


@dataclass(frozen=True)
class Removal:
    """What a revocation or leave published: the latest version, which no longer contains the member (0 when none
    was ever published), or, when the latest version still contains it, why no version without it was published."""

    version: int
    publication_error: str = ""


@dataclass(frozen=True)
class BlobUse:
    """What the ledger's rows make of the blob store, for ``gc``: the blobs something kept needs, and those named
    only by what may be dropped (each by who names it)."""

    live: set[str]
    departed: dict[str, set[str]]  # revoked or departed member whose model is still recorded -> its model's blobs
    pruned: dict[int, set[str]]  # version pruned now or earlier -> its blobs
    pruning: list[int]  # the versions pruned now
    superseded: dict[str, set[str]]  # basis hash nothing kept names -> its blobs


@dataclass(frozen=True)
class GarbageReport:
    """What one ``gc`` deleted (or, in a dry run, would delete)."""

    dry_run: bool
    blobs: int
    bytes: int
    orphaned_blobs: int  # in the store, named by no row (left by a crash)
    member_blobs: int  # of revoked or departed members
    version_blobs: int  # of pruned versions
    basis_blobs: int  # of bases nothing kept names
    uploads: int  # staged uploads expired or of members no longer enrolled or active
    upload_bytes: int
    temporary_files: int  # left by a crash mid-write
    pruned_versions: list[int]
    members: list[str]  # revoked or departed members whose blobs went
