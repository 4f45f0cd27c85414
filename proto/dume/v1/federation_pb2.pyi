from dume.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_KIND_UNSPECIFIED: _ClassVar[UploadKind]
    UPLOAD_KIND_MODEL: _ClassVar[UploadKind]
    UPLOAD_KIND_STATISTICS: _ClassVar[UploadKind]
UPLOAD_KIND_UNSPECIFIED: UploadKind
UPLOAD_KIND_MODEL: UploadKind
UPLOAD_KIND_STATISTICS: UploadKind

class EnrolRequest(_message.Message):
    __slots__ = ("secret", "csr_pem")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    secret: str
    csr_pem: bytes
    def __init__(self, secret: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrolResponse(_message.Message):
    __slots__ = ("certificate_pem", "node", "expert")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    node: str
    expert: str
    def __init__(self, certificate_pem: _Optional[bytes] = ..., node: _Optional[str] = ..., expert: _Optional[str] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadPlan(_message.Message):
    __slots__ = ("kind", "manifest", "files", "statistics")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    kind: UploadKind
    manifest: _tensors_pb2.TensorManifest
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    statistics: _tensors_pb2.StatisticsHeader
    def __init__(self, kind: _Optional[_Union[UploadKind, str]] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., statistics: _Optional[_Union[_tensors_pb2.StatisticsHeader, _Mapping]] = ...) -> None: ...

class BlobOffset(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class UploadState(_message.Message):
    __slots__ = ("upload_id", "blobs")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    blobs: _containers.RepeatedCompositeFieldContainer[BlobOffset]
    def __init__(self, upload_id: _Optional[str] = ..., blobs: _Optional[_Iterable[_Union[BlobOffset, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("upload_id", "sha256", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    sha256: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("basis_hash", "held")
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    basis_hash: str
    held: str
    def __init__(self, basis_hash: _Optional[str] = ..., held: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Event(_message.Message):
    __slots__ = ("basis_hash", "version", "exact", "basis_members", "expert_hash", "removed_datasets")
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    BASIS_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HASH_FIELD_NUMBER: _ClassVar[int]
    REMOVED_DATASETS_FIELD_NUMBER: _ClassVar[int]
    basis_hash: str
    version: int
    exact: bool
    basis_members: _containers.RepeatedScalarFieldContainer[str]
    expert_hash: str
    removed_datasets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, basis_hash: _Optional[str] = ..., version: _Optional[int] = ..., exact: _Optional[bool] = ..., basis_members: _Optional[_Iterable[str]] = ..., expert_hash: _Optional[str] = ..., removed_datasets: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Expert(_message.Message):
    __slots__ = ("name", "expert_hash", "manifest", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HASH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    expert_hash: str
    manifest: _tensors_pb2.TensorManifest
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, name: _Optional[str] = ..., expert_hash: _Optional[str] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class BasisRequest(_message.Message):
    __slots__ = ("basis_hash",)
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    basis_hash: str
    def __init__(self, basis_hash: _Optional[str] = ...) -> None: ...

class Basis(_message.Message):
    __slots__ = ("basis_hash", "members", "manifest", "sequence_length", "batch_size")
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    basis_hash: str
    members: _containers.RepeatedScalarFieldContainer[str]
    manifest: _tensors_pb2.TensorManifest
    sequence_length: int
    batch_size: int
    def __init__(self, basis_hash: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., sequence_length: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class VersionFile(_message.Message):
    __slots__ = ("name", "sha256", "shard", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    shard: _tensors_pb2.TensorManifest
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., shard: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("version", "exact", "basis_hash", "members", "files", "published_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    exact: bool
    basis_hash: str
    members: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.RepeatedCompositeFieldContainer[VersionFile]
    published_at: float
    def __init__(self, version: _Optional[int] = ..., exact: _Optional[bool] = ..., basis_hash: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., files: _Optional[_Iterable[_Union[VersionFile, _Mapping]]] = ..., published_at: _Optional[float] = ...) -> None: ...

class BlobRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("version", "publication_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLICATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: int
    publication_error: str
    def __init__(self, version: _Optional[int] = ..., publication_error: _Optional[str] = ...) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("node", "ttl_seconds", "expert")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    node: str
    ttl_seconds: float
    expert: str
    def __init__(self, node: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., expert: _Optional[str] = ...) -> None: ...

class TokenResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: float
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("name", "state", "online", "stats_current", "reason", "token_count", "expert")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    STATS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    online: bool
    stats_current: bool
    reason: str
    token_count: int
    expert: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., online: _Optional[bool] = ..., stats_current: _Optional[bool] = ..., reason: _Optional[str] = ..., token_count: _Optional[int] = ..., expert: _Optional[str] = ...) -> None: ...

class ContributionStatus(_message.Message):
    __slots__ = ("node", "dataset", "token_count", "basis_hash", "current")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    node: str
    dataset: str
    token_count: int
    basis_hash: str
    current: bool
    def __init__(self, node: _Optional[str] = ..., dataset: _Optional[str] = ..., token_count: _Optional[int] = ..., basis_hash: _Optional[str] = ..., current: _Optional[bool] = ...) -> None: ...

class ExpertStatus(_message.Message):
    __slots__ = ("name", "owner", "expert_hash", "contributors", "contributions", "pending")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    expert_hash: str
    contributors: _containers.RepeatedScalarFieldContainer[str]
    contributions: _containers.RepeatedCompositeFieldContainer[ContributionStatus]
    pending: _containers.RepeatedCompositeFieldContainer[ContributionStatus]
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., expert_hash: _Optional[str] = ..., contributors: _Optional[_Iterable[str]] = ..., contributions: _Optional[_Iterable[_Union[ContributionStatus, _Mapping]]] = ..., pending: _Optional[_Iterable[_Union[ContributionStatus, _Mapping]]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "exact", "basis_hash", "members", "audit_entries", "settings_json", "publication_error", "experts", "version_contributions", "routing")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    BASIS_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    PUBLICATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    version: int
    exact: bool
    basis_hash: str
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    audit_entries: int
    settings_json: str
    publication_error: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertStatus]
    version_contributions: _containers.RepeatedScalarFieldContainer[str]
    routing: RoutingProbe
    def __init__(self, version: _Optional[int] = ..., exact: _Optional[bool] = ..., basis_hash: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., audit_entries: _Optional[int] = ..., settings_json: _Optional[str] = ..., publication_error: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertStatus, _Mapping]]] = ..., version_contributions: _Optional[_Iterable[str]] = ..., routing: _Optional[_Union[RoutingProbe, _Mapping]] = ...) -> None: ...

class RoutingProbe(_message.Message):
    __slots__ = ("version", "tokens", "error", "flag_ratio", "shares")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FLAG_RATIO_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    version: int
    tokens: int
    error: str
    flag_ratio: float
    shares: _containers.RepeatedCompositeFieldContainer[RoutingShare]
    def __init__(self, version: _Optional[int] = ..., tokens: _Optional[int] = ..., error: _Optional[str] = ..., flag_ratio: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[RoutingShare, _Mapping]]] = ...) -> None: ...

class RoutingShare(_message.Message):
    __slots__ = ("expert", "share", "per_layer", "flagged")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    expert: str
    share: float
    per_layer: _containers.RepeatedScalarFieldContainer[float]
    flagged: bool
    def __init__(self, expert: _Optional[str] = ..., share: _Optional[float] = ..., per_layer: _Optional[_Iterable[float]] = ..., flagged: _Optional[bool] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("node", "reason", "dataset")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    node: str
    reason: str
    dataset: str
    def __init__(self, node: _Optional[str] = ..., reason: _Optional[str] = ..., dataset: _Optional[str] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("node", "dataset", "refuse")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    REFUSE_FIELD_NUMBER: _ClassVar[int]
    node: str
    dataset: str
    refuse: bool
    def __init__(self, node: _Optional[str] = ..., dataset: _Optional[str] = ..., refuse: _Optional[bool] = ...) -> None: ...

class ApproveResponse(_message.Message):
    __slots__ = ("version", "publication_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLICATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: int
    publication_error: str
    def __init__(self, version: _Optional[int] = ..., publication_error: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("version", "publication_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLICATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: int
    publication_error: str
    def __init__(self, version: _Optional[int] = ..., publication_error: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "at", "kind", "subject", "detail_json", "previous_hash", "entry_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    at: float
    kind: str
    subject: str
    detail_json: str
    previous_hash: str
    entry_hash: str
    def __init__(self, sequence: _Optional[int] = ..., at: _Optional[float] = ..., kind: _Optional[str] = ..., subject: _Optional[str] = ..., detail_json: _Optional[str] = ..., previous_hash: _Optional[str] = ..., entry_hash: _Optional[str] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class GarbageRequest(_message.Message):
    __slots__ = ("prune_versions_before", "dry_run")
    PRUNE_VERSIONS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    prune_versions_before: int
    dry_run: bool
    def __init__(self, prune_versions_before: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GarbageReport(_message.Message):
    __slots__ = ("dry_run", "blobs", "bytes", "orphaned_blobs", "member_blobs", "version_blobs", "basis_blobs", "uploads", "upload_bytes", "temporary_files", "pruned_versions", "members")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ORPHANED_BLOBS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_BLOBS_FIELD_NUMBER: _ClassVar[int]
    VERSION_BLOBS_FIELD_NUMBER: _ClassVar[int]
    BASIS_BLOBS_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPORARY_FILES_FIELD_NUMBER: _ClassVar[int]
    PRUNED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    blobs: int
    bytes: int
    orphaned_blobs: int
    member_blobs: int
    version_blobs: int
    basis_blobs: int
    uploads: int
    upload_bytes: int
    temporary_files: int
    pruned_versions: _containers.RepeatedScalarFieldContainer[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dry_run: _Optional[bool] = ..., blobs: _Optional[int] = ..., bytes: _Optional[int] = ..., orphaned_blobs: _Optional[int] = ..., member_blobs: _Optional[int] = ..., version_blobs: _Optional[int] = ..., basis_blobs: _Optional[int] = ..., uploads: _Optional[int] = ..., upload_bytes: _Optional[int] = ..., temporary_files: _Optional[int] = ..., pruned_versions: _Optional[_Iterable[int]] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...
