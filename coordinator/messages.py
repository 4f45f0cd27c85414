"""Every protobuf <-> Python conversion of the coordinator, so the layers below the servicers see typed records
and the ledger stores each structure one way (a serialized message), whatever reads it back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

from dume.coordinator.records import (
    BasisRecord,
    GarbageReport,
    Published,
    RoutingStatus,
    Status,
    VersionFile,
    VersionRecord,
)
from dume.shared.method.settings import MergeSettings
from dume.shared.trust.audit import AuditEntry
from dume.v1 import federation_pb2 as pb
from dume.v1 import tensors_pb2

UPLOAD_KINDS = {pb.UPLOAD_KIND_MODEL: "model", pb.UPLOAD_KIND_STATISTICS: "statistics"}


# -- models and their architecture -------------------------------------------------------------------------------
def layout_manifest(layout: dict[str, tuple[Sequence[int], str]]) -> tensors_pb2.TensorManifest:
    """A manifest of names, shapes and dtypes only (no blobs): enough to fix an architecture."""
    return tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorEntry(name=name, dtype=dtype, shape=list(shape))
                                               for name, (shape, dtype) in sorted(layout.items())])


def architecture_of(config: dict[str, Any], manifest: tensors_pb2.TensorManifest,
                    tokenizer_files: dict[str, str]) -> dict[str, Any]:
    """What every member must match: the config, each tensor's shape and dtype, and the tokenizer files and chat
    template (name -> sha256) that every published version carries."""
    return {"config": config, "files": dict(sorted(tokenizer_files.items())),
            "layout": {entry.name: [list(entry.shape), entry.dtype] for entry in manifest.tensors}}


def tokenizer_files(plan: pb.UploadPlan) -> dict[str, str]:
    """The files of a model upload besides config.json: name -> sha256."""
    return {name: sha for name, sha in file_hashes(plan).items() if name != "config.json"}


def file_hashes(plan: pb.UploadPlan) -> dict[str, str]:
    """The files of an uploaded model: name -> blob sha256."""
    return {file.name: file.sha256 for file in plan.files}


def upload_state_message(upload_id: str, held: dict[str, int]) -> pb.UploadState:
    """How far each blob of an upload has come (sha256 -> bytes held), so a client resumes where it stopped."""
    return pb.UploadState(upload_id=upload_id, blobs=[pb.BlobOffset(sha256=sha, offset=offset)
                                                      for sha, offset in sorted(held.items())])


# -- bases and versions ------------------------------------------------------------------------------------------
def basis_message(record: BasisRecord, settings: MergeSettings) -> pb.Basis:
    return pb.Basis(basis_hash=record.hash, members=record.members, manifest=record.manifest,
                    sequence_length=settings.sequence_length, batch_size=settings.batch_size)


def version_file_message(file: VersionFile) -> pb.VersionFile:
    return pb.VersionFile(name=file.name, sha256=file.sha256, shard=file.shard, size_bytes=file.size_bytes)


def version_file(message: pb.VersionFile) -> VersionFile:
    return VersionFile(message.name, message.sha256, message.size_bytes, message.shard)


def file_list_message(files: list[VersionFile]) -> pb.Version:
    """A version's file list alone, as the ledger stores it."""
    return pb.Version(files=[version_file_message(file) for file in files])


def file_list(message: pb.Version) -> list[VersionFile]:
    return [version_file(file) for file in message.files]


def version_message(record: VersionRecord) -> pb.Version:
    return pb.Version(version=record.number, exact=record.exact, basis_hash=record.basis_hash,
                      members=record.members, files=[version_file_message(file) for file in record.files],
                      published_at=record.at)


def event_message(published: Published) -> pb.Event:
    return pb.Event(basis_hash=published.basis_hash, basis_members=published.basis_members,
                    version=published.version, exact=published.exact, expert_hash=published.expert_hash,
                    removed_datasets=published.removed_datasets)


# -- administration ----------------------------------------------------------------------------------------------
def status_message(status: Status) -> pb.StatusResponse:
    members = [pb.MemberStatus(name=member.name, state=member.state, online=member.online,
                               stats_current=member.stats_current, reason=member.reason,
                               token_count=member.token_count, expert=member.expert) for member in status.members]
    experts = [pb.ExpertStatus(name=expert.name, owner=expert.owner, expert_hash=expert.expert_hash,
                               contributors=expert.contributors,
                               contributions=[pb.ContributionStatus(**asdict(c)) for c in expert.contributions],
                               pending=[pb.ContributionStatus(**asdict(c)) for c in expert.pending])
               for expert in status.experts]
    return pb.StatusResponse(version=status.version, exact=status.exact, basis_hash=status.basis_hash,
                             members=members, audit_entries=status.audit_entries,
                             settings_json=json.dumps(status.settings, sort_keys=True),
                             publication_error=status.publication_error, experts=experts,
                             version_contributions=status.version_contributions,
                             routing=routing_message(status.routing) if status.routing else None)


def routing_message(routing: RoutingStatus) -> pb.RoutingProbe:
    probe, flagged = routing.probe, set(routing.flagged())
    shares = [pb.RoutingShare(expert=name, share=share, flagged=name in flagged,
                              per_layer=[row[index] for row in probe.per_layer])
              for index, (name, share) in enumerate(probe.mean().items())]
    return pb.RoutingProbe(version=probe.version, tokens=probe.tokens, error=probe.error,
                           flag_ratio=routing.flag_ratio, shares=shares)


def status_dict(status: pb.StatusResponse) -> dict[str, Any]:
    """The status as ``dume-coordinator status --json`` prints it (absent values as null, a reason only if any)."""
    return {
        "version": status.version or None,
        "exact": status.exact,
        "basis_hash": status.basis_hash or None,
        "members": [{"name": m.name, "state": m.state, "expert": m.expert, "online": m.online,
                     "stats_current": m.stats_current, "token_count": m.token_count,
                     **({"reason": m.reason} if m.reason else {})}
                    for m in status.members],
        "experts": [{"name": e.name, "owner": e.owner, "expert_hash": e.expert_hash or None,
                     "contributors": list(e.contributors),
                     "contributions": [contribution_dict(c) for c in e.contributions],
                     "pending": [contribution_dict(c) for c in e.pending]}
                    for e in status.experts],
        "version_contributions": list(status.version_contributions),
        "audit_entries": status.audit_entries,
        "settings": json.loads(status.settings_json),
        "publication_error": status.publication_error or None,
        "routing": routing_dict(status.routing) if status.HasField("routing") else None,
    }


def contribution_dict(c: pb.ContributionStatus) -> dict[str, Any]:
    return {"node": c.node, "dataset": c.dataset, "token_count": c.token_count, "basis_hash": c.basis_hash,
            "current": c.current}


def routing_dict(routing: pb.RoutingProbe) -> dict[str, Any]:
    return {"version": routing.version, "tokens": routing.tokens, "error": routing.error or None,
            "flag_ratio": routing.flag_ratio,
            "shares": {share.expert: {"share": share.share, "per_layer": list(share.per_layer),
                                      "flagged": share.flagged} for share in routing.shares}}


def audit_entry_message(entry: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(sequence=entry.sequence, at=entry.at, kind=entry.kind, subject=entry.subject,
                         detail_json=entry.detail_json, previous_hash=entry.previous_hash,
                         entry_hash=entry.entry_hash)


def audit_entry(message: pb.AuditEntry) -> AuditEntry:
    return AuditEntry(message.sequence, message.at, message.kind, message.subject, message.detail_json,
                      message.previous_hash, message.entry_hash)


def garbage_report_message(report: GarbageReport) -> pb.GarbageReport:
    return pb.GarbageReport(**asdict(report))


def garbage_report(message: pb.GarbageReport) -> GarbageReport:
    return GarbageReport(**{field.name: (list(value) if field.type.startswith("list") else value)
                            for field in fields(GarbageReport) for value in [getattr(message, field.name)]})
