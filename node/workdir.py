"""A node's working directory: its identity, what it has contributed, and its blob cache.

    identity/key.pem, cert.pem, ca.pem   owner-only; the key is made here and never leaves
    node.json                            name, expert, coordinator address, model and dataset paths, what is
                                         uploaded
    blobs/                               downloaded bases and model versions (content-addressed)
    own-blobs.json                       sha256 -> where that blob lies in the node's own model files
    statistics/                          the statistics files uploaded, one per dataset, basis and weights
    experts/                             a contributor's downloaded expert weights, one directory per version
    transfers.jsonl                      one JSON object a line for each upload and statistics computation
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dume.shared.errors import DumeError
from dume.shared.files import write_atomically
from dume.shared.method.settings import DEFAULT_DATASET
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.channels import mutual_tls_channel
from dume.shared.trust import pki

# What a node does about a full disk (``disk_full_is_one_line``): everything it writes (its working directory, a
# fetched version) is atomic or resumable, so running again goes on.
NODE_DISK_FULL = ("free space there, or use a --workdir on another disk, and run the command again; it resumes where "
                  "it stopped")


def upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """node.json as this release writes it: a workdir from before experts and datasets held one ``data`` path,
    which is its dataset ``default``, and owned its own expert."""
    if "datasets" not in state and "data" in state:
        state = {**state, "datasets": {DEFAULT_DATASET: state.pop("data")}}
        state.pop("statistics_basis", None)  # recomputed (or found again) and acknowledged as the same upload
    state.setdefault("expert", state.get("name"))
    state.setdefault("removed_datasets", [])
    state.setdefault("uploaded", {})
    return state


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "identity"

    @property
    def state_path(self) -> Path:
        return self.root / "node.json"

    @property
    def statistics(self) -> Path:
        return self.root / "statistics"

    def blobs(self) -> BlobStore:
        return BlobStore(self.root / "blobs")

    def enrolled(self) -> bool:
        return (self.identity / "cert.pem").is_file() and self.state_path.is_file()

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def state(self) -> dict[str, Any]:
        if not self.enrolled():
            raise DumeError(f"{self.root} holds no enrolled node: run `dume-node join --token TOKEN ... --workdir "
                            f"{self.root}` first")
        return upgraded(json.loads(self.state_path.read_text()))

    def forget_locally(self, datasets: list[str]) -> dict[str, Any]:
        """Stops contributing ``datasets``: they leave the node's datasets and are remembered as removed."""
        state = self.state()
        return self.update(datasets={k: v for k, v in state["datasets"].items() if k not in datasets},
                           removed_datasets=sorted(set(state["removed_datasets"]) | set(datasets)),
                           uploaded={k: v for k, v in state["uploaded"].items() if k not in datasets})

    def update(self, **changes: Any) -> dict[str, Any]:
        """Merges ``changes`` into node.json atomically (fetch may read it while the agent runs)."""
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        state.update(changes)
        write_atomically(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode())
        return state

    def enrolment_key(self) -> bytes:
        """The key to enrol with, kept on disk before it is used: a node whose enrolment answer was lost (cut
        connection, killed process) asks again with the same key and gets the certificate its token bought."""
        pending = self.identity / "enrolment-key.pem"
        if pending.is_file():
            return pki.read_bytes(pending, "the pending enrolment key")
        key_pem = pki.create_private_key()
        pki.write_private(pending, key_pem)
        return key_pem

    def save_identity(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
        pki.write_private(self.identity / "key.pem", key_pem)
        pki.write_private(self.identity / "cert.pem", cert_pem)
        pki.write_private(self.identity / "ca.pem", ca_pem)
        (self.identity / "enrolment-key.pem").unlink(missing_ok=True)

    def channel(self) -> grpc.Channel:
        state = self.state()
        return mutual_tls_channel(state["coordinator"], pki.read_bytes(self.identity / "ca.pem", "the CA"),
                                  pki.read_bytes(self.identity / "key.pem", "the node key"),
                                  pki.read_bytes(self.identity / "cert.pem", "the node certificate"))

    def own_blobs(self) -> dict[str, tuple[str, int, int]]:
        """sha256 -> (file, start, size) of each blob of the node's own model, as ``record_own_blobs`` wrote them."""
        index_path = self.root / "own-blobs.json"
        return {sha: tuple(where) for sha, where in json.loads(index_path.read_text()).items()} \
            if index_path.is_file() else {}

    def own_blob(self, sha256: str) -> bytes | None:
        """A blob of the node's own model, read from its model files (so fetch never downloads it)."""
        where = self.own_blobs().get(sha256)
        if where is None:
            return None
        path, start, size = where
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                return handle.read(size)
        except OSError:
            return None

    @property
    def transfers_path(self) -> Path:
        return self.root / "transfers.jsonl"

    def record_transfer(self, event: str, **fields: Any) -> None:
        """Appends one transfer as a JSON line, so tools read what the node sent and computed without parsing its
        log (whose wording is for people and may change)."""
        with open(self.transfers_path, "a") as handle:
            handle.write(json.dumps({"event": event, **fields}) + "\n")

    def transfers(self) -> list[dict[str, Any]]:
        """The transfers recorded so far, oldest first."""
        if not self.transfers_path.is_file():
            return []
        return [json.loads(line) for line in self.transfers_path.read_text().splitlines() if line]

    def record_own_blobs(self, index: dict[str, tuple[str, int, int]]) -> None:
        write_atomically(self.root / "own-blobs.json", json.dumps(index, sort_keys=True).encode())

