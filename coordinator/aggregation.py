"""Aggregation from the ledger: the basis over the active members, and the model versions built from it.

Nothing here is specific to the federation's math: the basis is ``dume.shared.averaging.compute_basis``, the
routers ``dume.shared.ridge.solve_routers`` and the checkpoint ``dume.shared.writer.write_moe_checkpoint``,
reading each member's tensors from its blobs in canonical (member-name) order. So the same member set and inputs
give the same bytes as ``dume merge``, whatever the order members joined, left or were revoked in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import cached_property
from typing import Any

import torch

from dume.coordinator.store import BasisRecord, Member, Statistics, Store
from dume.shared.architectures import Family, detect_family, mlp_location
from dume.shared.averaging import compute_basis, tensors_hash
from dume.shared.blobs import BlobStore
from dume.shared.merge import MergeSettings
from dume.shared.ridge import solve_routers
from dume.shared.statistics import from_upper_triangle
from dume.shared.wire import tensor_bytes, tensor_entry, tensor_from_bytes
from dume.shared.writer import write_moe_checkpoint
from dume.v1 import tensors_pb2


class StoredMember:
    """A member's dense model as recorded in the ledger, read tensor by tensor from the blob store."""

    def __init__(self, member: Member, blobs: BlobStore) -> None:
        assert member.model is not None
        self.name = member.name
        self._blobs = blobs
        self._entries = {entry.name: entry for entry in member.model.tensors}
        self._files = member.files
        self.config: dict[str, Any] = json.loads(blobs.read_bytes(member.files["config.json"]))
        self.family: Family = detect_family(self.config, f"member {member.name!r}")

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @cached_property
    def shared_names(self) -> list[str]:
        return sorted(name for name in self._entries if mlp_location(name) is None)

    def tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return tensor_from_bytes(entry, self._blobs.read_bytes(entry.sha256))

    def mlp_tensor(self, layer: int, projection: str) -> torch.Tensor:
        return self.tensor(f"model.layers.{layer}.mlp.{projection}.weight")

    def read_file(self, name: str) -> bytes | None:
        sha256 = self._files.get(name)
        return self._blobs.read_bytes(sha256) if sha256 else None


class BlobSink:
    """A checkpoint written into the blob store: the version's file list, each shard as a list of tensor blobs."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self.files: list[dict[str, Any]] = []

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        entries = []
        for tensor_name in sorted(tensors):
            entry = tensor_entry(tensor_name, tensors[tensor_name])
            self._blobs.put_bytes(tensor_bytes(tensors[tensor_name]))
            entries.append({"name": entry.name, "dtype": entry.dtype, "shape": list(entry.shape),
                            "sha256": entry.sha256, "size_bytes": entry.size_bytes})
        self.files.append({"name": name, "shard": entries})

    def write_file(self, name: str, data: bytes) -> None:
        self.files.append({"name": name, "sha256": self._blobs.put_bytes(data), "size_bytes": len(data)})


def statistics_tensor(statistics: Statistics, blobs: BlobStore, hidden_size: int) -> torch.Tensor:
    """A member's full (layers, d+1, d+1) G from the per-layer upper triangles it uploaded."""
    packed = torch.stack([tensor_from_bytes(entry, blobs.read_bytes(entry.sha256)) for entry in
                          sorted(statistics.manifest.tensors, key=lambda entry: int(entry.name.split(".")[1]))])
    return from_upper_triangle(packed, hidden_size + 1)


def refresh_basis(store: Store, blobs: BlobStore) -> BasisRecord | None:
    """Makes the basis of the current active members the current one; returns it if it is new."""
    active = {member.name: member for member in store.active_members() if member.model is not None}
    key = hashlib.sha256(b"".join(name.encode() + b"\0" + active[name].model.SerializeToString(deterministic=True)
                                  for name in sorted(active))).hexdigest()
    if store.get_meta("basis_inputs") == key:
        return None
    if not active:
        store.set_meta("current_basis", None)
        store.set_meta("basis_inputs", key)
        return None
    basis = compute_basis({name: StoredMember(member, blobs) for name, member in active.items()})
    entries = []
    for name in sorted(basis):
        blobs.put_bytes(tensor_bytes(basis[name]))
        entries.append(tensor_entry(name, basis[name]))
    record = BasisRecord(tensors_hash(basis), sorted(active), tensors_pb2.TensorManifest(tensors=entries))
    with store.transaction():
        store.add_basis(record)
        store.set_meta("current_basis", record.hash)
        store.set_meta("basis_inputs", key)
        store.audit("basis", record.hash, members=record.members)
    return record


def publish_if_due(store: Store, blobs: BlobStore, settings: MergeSettings) -> int | None:
    """Publishes the next version when one is due; returns its number.

    Due means: the basis moved since the latest version (a provisional one, from the statistics at hand), or every
    active member's statistics are under the current basis and the latest version is not already that model.
    """
    basis_hash = store.get_meta("current_basis")
    if not basis_hash:
        return None
    active = {member.name: member for member in store.active_members() if member.model is not None}
    statistics = {name: stats for name, stats in store.statistics().items() if name in active}
    if not statistics:
        return None
    exact = len(statistics) == len(active) and all(s.basis_hash == basis_hash for s in statistics.values())
    fingerprint = hashlib.sha256(json.dumps(
        [basis_hash, sorted((name, s.basis_hash, s.manifest.SerializeToString(deterministic=True).hex())
                            for name, s in statistics.items())]).encode()).hexdigest()
    latest = store.version()
    if latest is not None and (latest.fingerprint == fingerprint or (latest.basis_hash == basis_hash and not exact)):
        return None
    members = {name: StoredMember(member, blobs) for name, member in active.items()}
    hidden_size = int(next(iter(members.values())).config["hidden_size"])
    grams = {name: (statistics_tensor(statistics[name], blobs, hidden_size) if name in statistics else None)
             for name in sorted(active)}
    routers = solve_routers(grams, settings.rho, settings.router_bias, settings.normalize, settings.temperature)
    routed = list(routers[0].experts)
    top_k = min(settings.top_k, len(routed))
    dume_block: dict[str, Any] = {
        "members": routed,
        "members_without_statistics": sorted(set(active) - set(statistics)),
        "basis_hash": basis_hash,
        "exact": exact,
        "token_counts": {name: statistics[name].token_count for name in routed},
        "ridge_lambda": [router.ridge_lambda for router in routers],
        "column_normalization": "l2" if settings.normalize else "none",
        **asdict(settings),
        "top_k": top_k,  # at most the experts routed to while some members have no statistics yet
    }
    if not exact:
        dume_block["stale_statistics"] = sorted(name for name in routed if statistics[name].basis_hash != basis_hash)
    sink = BlobSink(blobs)
    write_moe_checkpoint(sink, members, routers, top_k, dume_block)
    with store.transaction():
        number = store.add_version(exact, basis_hash, sorted(active), sink.files, fingerprint)
        store.audit("publish", str(number), exact=exact, basis_hash=basis_hash, members=sorted(active))
    return number
