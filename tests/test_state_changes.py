"""State changes the coordinator reports and the races around them: a revocation or leave that lands while a
member's upload is being validated wins, and a revocation is reported done only when what is served is without it.

The coordinator runs in process on a real state directory (real ledger, blobs, staging files, certificates, the
publisher thread); a race is made certain by having the revocation land from inside the validation step, the
window in which it used to be overwritten, and a full disk by having the checkpoint writer fail.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace

import pytest
from safetensors.torch import save_file

from dume.coordinator import commits, publication
from dume.coordinator.errors import Refused
from dume.coordinator.federation import Coordinator
from dume.node.agent import Upload, described, model_upload
from dume.node.workdir import Workdir
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.statistics import statistics_tensors, statistics_under_basis, token_count
from dume.shared.transport.wire import safetensors_ranges, tensor_from_bytes
from dume.shared.trust import pki
from dume.v1 import federation_pb2 as pb
from dume.v1 import tensors_pb2

from in_process import enrolled, send

pytestmark = pytest.mark.scenario("state changes and races")


def staged_model(coordinator: Coordinator, name: str, model_dir) -> str:
    """Begins the member's model upload and sends every blob, as a node does; returns the upload id."""
    return staged(coordinator, name, model_upload(model_dir, name))


def staged(coordinator: Coordinator, name: str, upload: Upload) -> str:
    """Begins an upload and sends what the coordinator does not hold yet, as a node does; returns the upload id."""
    planned = coordinator.begin_upload(name, upload.plan)
    send(coordinator, planned, upload)
    return planned.upload_id


def contributed(coordinator: Coordinator, spec, tmp_path) -> pki.Identity:
    """A member whose model and statistics (under the current basis, computed as a node computes them) are in."""
    identity = enrolled(coordinator, spec.name)
    coordinator.commit_upload(identity, staged_model(coordinator, spec.name, spec.model_dir))
    coordinator.publisher.wait(coordinator.publisher.request())
    statistics_committed(coordinator, spec, identity, tmp_path)
    return identity


def statistics_committed(coordinator: Coordinator, spec, identity: pki.Identity, tmp_path, dataset: str = "default",
                         data=None) -> str:
    """Statistics of ``data`` (default: the expert's own) as dataset ``dataset`` of the node ``identity`` names, for
    the expert of ``spec``, under the current basis and computed as a node computes them, committed; returns why
    the coordinator holds them for approval ("" when recorded)."""
    basis = coordinator.basis("")
    tensors = {entry.name: tensor_from_bytes(entry, coordinator.blobs.read_bytes(entry.sha256))
               for entry in basis.manifest.tensors}
    data = DocumentStream(data or spec.data_path, load_tokenizer(spec.model_dir), coordinator.settings.sequence_length)
    gram = statistics_under_basis(ExpertDirectory(spec.model_dir), tensors, data, coordinator.settings.batch_size)
    path = tmp_path / f"{identity.name}-{dataset}-{basis.hash[:12]}-statistics.safetensors"
    save_file(statistics_tensors(gram), str(path))
    entries, sources = described(safetensors_ranges(path))
    header = tensors_pb2.StatisticsHeader(basis_hash=basis.hash, hidden_size=gram.shape[-1] - 1,
                                          num_layers=gram.shape[0], token_count=token_count(gram),
                                          sequence_length=coordinator.settings.sequence_length, dataset=dataset,
                                          expert_hash=coordinator.ledger.expert_hashes()[spec.name])
    plan = pb.UploadPlan(kind=pb.UPLOAD_KIND_STATISTICS, manifest=tensors_pb2.TensorManifest(tensors=entries),
                         statistics=header)
    _, held = coordinator.commit_upload(identity, staged(coordinator, identity.name, Upload(plan, sources,
                                                                                          "statistics")))
    coordinator.publisher.wait(coordinator.publisher.request())
    return held


def test_a_revocation_is_reported_done_only_when_the_latest_version_is_without_the_member(
        coordinator, expert_factory, tmp_path, monkeypatch):
    experts = expert_factory("llama")
    for name in ("code", "math"):
        contributed(coordinator, experts[name], tmp_path)
    assert coordinator.ledger.version().members == ["code", "math"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publication, "write_moe_checkpoint", disk_full)
    removal = coordinator.revoke("math", "contract ended")
    assert removal.version == 0
    assert "still contains math" in removal.publication_error and "No space left" in removal.publication_error
    assert "No space left" in coordinator.status().publication_error

    monkeypatch.undo()  # space is back: the next round publishes the version without math
    coordinator.publisher.wait(coordinator.publisher.request())
    assert coordinator.ledger.version().members == ["code"] and coordinator.status().publication_error == ""
    removal = coordinator.revoke("code", "the last one")
    assert removal.version == 0 and "no other contribution remains" in removal.publication_error


def test_an_empty_file_in_a_model_is_held_and_publication_goes_on(coordinator, expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    model = tmp_path / "with-an-empty-template"
    shutil.copytree(spec.model_dir, model)
    (model / "chat_template.jinja").write_bytes(b"")  # listed as a blob, yet no byte of it is ever sent
    contributed(coordinator, replace(spec, model_dir=model), tmp_path)
    assert coordinator.status().publication_error == ""
    version = coordinator.ledger.version()
    assert version is not None and version.members == ["code"]
    template = next(file for file in version.files if file.name == "chat_template.jinja")
    assert coordinator.blobs.read_bytes(template.sha256) == b""


def during_validation(monkeypatch, change: Callable[[], object]) -> None:
    """Makes ``change`` land while the next model upload is validated: after its authorisation, before its commit."""
    validate = commits.validation.check_model

    def validate_then_change(*args, **kwargs):
        validate(*args, **kwargs)
        change()

    monkeypatch.setattr(commits.validation, "check_model", validate_then_change)


def test_a_revocation_during_validation_wins_over_the_commit(coordinator, expert_factory, monkeypatch):
    identity = enrolled(coordinator, "code")
    upload_id = staged_model(coordinator, "code", expert_factory("llama")["code"].model_dir)
    during_validation(monkeypatch, lambda: coordinator.revoke("code", "revoked while its upload was validated"))
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
    during_validation(monkeypatch, lambda: coordinator.leave(identity))
    with pytest.raises(Refused, match="has left"):
        coordinator.commit_upload(identity, upload_id)
    assert coordinator.ledger.member("math").state == "left"


def test_a_commit_repeated_after_its_answer_was_lost_is_acknowledged_once(coordinator, expert_factory):
    """A node that died between the coordinator's commit and its own record commits the same upload again: the
    ledger, the audit log and the metrics keep one upload."""
    spec = expert_factory("llama")["code"]
    identity = enrolled(coordinator, spec.name)
    for _ in range(2):
        coordinator.commit_upload(identity, staged_model(coordinator, spec.name, spec.model_dir))
    uploads = [entry for entry in coordinator.ledger.audit_entries() if entry.kind == "upload"]
    assert len(uploads) == 1
    assert coordinator.metrics.registry.get_sample_value("dume_uploads_total", {"kind": "model"}) == 1


def test_an_enrolment_whose_answer_was_lost_is_answered_again_to_the_same_key_only(coordinator, tmp_path):
    """The token is spent when the coordinator signs; a node that never got the answer (cut connection, killed
    process) asks again with the key it kept on disk and gets the same certificate. Another key, or the same key
    once the member was revoked or enrolled anew, gets the refusal: a leaked secret alone buys nothing."""
    workdir = Workdir(tmp_path / "node")
    token = coordinator.create_token("code", 3600)
    key = workdir.enrolment_key()
    first, _, _ = coordinator.enrol(token.secret, pki.create_csr(key, "code"))  # this answer is "lost"
    assert workdir.enrolment_key() == key  # a second `join` finds the same key

    again, node, expert = coordinator.enrol(token.secret, pki.create_csr(key, "code"))
    assert (again, node, expert) == (first, "code", "code")
    assert coordinator.ledger.member("code").cert_serial == str(pki.identity_of(first).serial)
    with pytest.raises(Refused, match="already used"):
        coordinator.enrol(token.secret, pki.create_csr(pki.create_private_key(), "code"))

    workdir.save_identity(key, again, b"ca")
    assert not (workdir.identity / "enrolment-key.pem").exists()  # the next enrolment makes a new key
    coordinator.enrol(coordinator.create_token("code", 3600).secret, pki.create_csr(workdir.enrolment_key(), "code"))
    with pytest.raises(Refused, match="already used"):  # enrolled anew: the first certificate is not its any more
        coordinator.enrol(token.secret, pki.create_csr(key, "code"))

    second = coordinator.create_token("math", 3600)
    math_key = pki.create_private_key()
    coordinator.enrol(second.secret, pki.create_csr(math_key, "math"))
    coordinator.revoke("math", "left the consortium")
    with pytest.raises(Refused, match="already used"):
        coordinator.enrol(second.secret, pki.create_csr(math_key, "math"))
