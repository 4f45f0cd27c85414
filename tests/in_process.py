"""A coordinator run in the test process, below gRPC: the real ``Coordinator`` on a fresh state directory, and
nodes enrolled into it with real tokens, keys and certificates. For tests of state changes that need no daemon."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dume.coordinator.federation import Coordinator
from dume.coordinator.limits import Limits
from dume.coordinator.state_dir import StateDir, initialise
from dume.coordinator.uploads import PlannedUpload
from dume.node.agent import Upload
from dume.shared.method.routers import MergeSettings
from dume.shared.transport.blobs import read_range
from dume.shared.trust import pki


def make_coordinator(root: Path, architecture: dict | None = None, **limits: float) -> Coordinator:
    """A coordinator on a new state directory at ``root``; ``limits`` override the default resource limits."""
    state = initialise(root, "127.0.0.1:0", "127.0.0.1:0", None, None, MergeSettings(sequence_length=64),
                       architecture)
    if limits:
        state.update_config(limits={**asdict(Limits()), **limits})
    return started(state)


def started(state: StateDir) -> Coordinator:
    """The coordinator of an existing state directory, as a (re)started daemon opens it."""
    coordinator = Coordinator(state)
    coordinator.addresses = {"listen": "127.0.0.1:7600", "enrolment": "127.0.0.1:7601"}
    return coordinator


def enrolled(coordinator: Coordinator, name: str, expert: str = "") -> pki.Identity:
    """A node named ``name`` enrolled with a fresh token and key (owning an expert, or contributing to
    ``expert``): the identity its certificate carries."""
    token = coordinator.create_token(name, 3600, expert)
    certificate, _, _ = coordinator.enrol(token.secret, pki.create_csr(pki.create_private_key(), name))
    return pki.identity_of(certificate)


def send(coordinator: Coordinator, planned: PlannedUpload, upload: Upload, limit: int | None = None) -> None:
    """Sends the blobs the coordinator lacks (at most ``limit`` bytes of each), as a node does."""
    for sha256, offset in coordinator.uploads.held(planned).items():
        where = upload.sources[sha256]
        left = where.size - offset if limit is None else min(limit, where.size - offset)
        for data in read_range(where.path, where.start + offset, left):
            coordinator.uploads.write(planned, sha256, offset, data)
            offset += len(data)
