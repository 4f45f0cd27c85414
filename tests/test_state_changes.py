"""State changes under concurrency: a revocation that lands while a member's upload is being validated wins.

The coordinator runs in process on a real state directory (real ledger, blobs, staging files, certificates); the
race is made certain by having the revocation land from inside the validation step, the window in which it used
to be overwritten (issue: "a revocation can be undone by the revoked member").
"""

from __future__ import annotations

import pytest

from dume.coordinator import commits
from dume.coordinator.errors import Refused
from dume.coordinator.federation import Coordinator
from dume.coordinator.state_dir import initialise
from dume.node.agent import model_upload
from dume.shared.method.routers import MergeSettings
from dume.shared.transport.blobs import read_range
from dume.shared.trust import pki


@pytest.fixture
def coordinator(tmp_path):
    state = initialise(tmp_path / "coordinator", "127.0.0.1:0", "127.0.0.1:0", None, None,
                       MergeSettings(sequence_length=64), None)
    coordinator = Coordinator(state)
    coordinator.addresses = {"listen": "127.0.0.1:7600", "enrolment": "127.0.0.1:7601"}
    yield coordinator
    coordinator.close()


def enrolled(coordinator: Coordinator, name: str) -> pki.Identity:
    token = coordinator.create_token(name, 3600)
    key = pki.create_private_key()
    certificate, _ = coordinator.enrol(token.secret, pki.create_csr(key, name))
    return pki.identity_of(certificate)


def staged_model(coordinator: Coordinator, name: str, model_dir) -> str:
    """Begins the member's model upload and sends every blob, as a node does; returns the upload id."""
    upload = model_upload(model_dir, name)
    planned = coordinator.begin_upload(name, upload.plan)
    for sha256 in planned.sizes:
        where, offset = upload.sources[sha256], 0
        for data in read_range(where.path, where.start, where.size):
            coordinator.uploads.write(planned, sha256, offset, data)
            offset += len(data)
    return planned.upload_id


def test_a_revocation_during_validation_wins_over_the_commit(coordinator, expert_factory, monkeypatch):
    identity = enrolled(coordinator, "code")
    upload_id = staged_model(coordinator, "code", expert_factory("llama")["code"].model_dir)
    validate = commits.validation.check_model

    def revoked_meanwhile(*args, **kwargs):
        validate(*args, **kwargs)
        coordinator.revoke("code", "revoked while its upload was validated")

    monkeypatch.setattr(commits.validation, "check_model", revoked_meanwhile)
    with pytest.raises(Refused, match="was revoked") as refused:
        coordinator.commit_upload(identity, upload_id)
    assert refused.value.kind == "permission"
    member = coordinator.ledger.member("code")
    assert (member.state, member.model) == ("revoked", None)
    with pytest.raises(Refused, match="was revoked"):
        coordinator.authorise(identity)
    with pytest.raises(Refused, match="was revoked"):
        coordinator.leave(identity)  # nor can a revocation be turned into a leave, which could rejoin
    assert coordinator.ledger.member("code").state == "revoked"


def test_a_leave_during_validation_wins_over_the_commit(coordinator, expert_factory, monkeypatch):
    identity = enrolled(coordinator, "math")
    upload_id = staged_model(coordinator, "math", expert_factory("llama")["math"].model_dir)
    validate = commits.validation.check_model

    def left_meanwhile(*args, **kwargs):
        validate(*args, **kwargs)
        coordinator.leave(identity)

    monkeypatch.setattr(commits.validation, "check_model", left_meanwhile)
    with pytest.raises(Refused, match="has left"):
        coordinator.commit_upload(identity, upload_id)
    assert coordinator.ledger.member("math").state == "left"
