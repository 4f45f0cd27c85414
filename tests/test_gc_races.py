"""`gc` racing the two writers of the blob store, in process on a real state directory: a publication round and an
upload's commit each store blobs before the row that names them, and a `gc` landing in between must wait for
the row, never delete the blobs. The race is made certain by starting the `gc` from inside that window. (Without
the publisher's pause, or without both the commit's transaction around the adoption and the open uploads counted
as in use, these tests fail: gc deletes the new blobs and publication then fails.)"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from dume.coordinator import publication
from dume.coordinator.federation import Coordinator
from dume.coordinator.records import GarbageReport
from dume.coordinator.uploads import Uploads

from in_process import enrolled
from test_state_changes import contributed, staged_model

pytestmark = pytest.mark.scenario("state changes and races")
WINDOW_SECONDS = 1.0  # how long the writer stays in its window with the gc started: ample for a gc of a few blobs


def collect_from_inside(coordinator: Coordinator, reports: list[GarbageReport]) -> Callable[[], None]:
    """Starts a `gc` on another thread and stays in the window a while, as a slow disk would; returns its join."""
    worker = threading.Thread(target=lambda: reports.append(coordinator.collect_garbage(0, dry_run=False)))
    worker.start()
    worker.join(WINDOW_SECONDS)
    return lambda: worker.join(120)


def missing_blobs(coordinator: Coordinator) -> list[str]:
    """Blobs the ledger names that the store lacks (empty when nothing referenced was deleted)."""
    return sorted(sha for sha in coordinator.ledger.referenced_blobs() if not coordinator.blobs.has(sha))


def test_gc_during_a_commit_waits_for_its_row_and_keeps_the_adopted_blobs(coordinator, expert_factory, monkeypatch):
    spec = expert_factory("llama")["code"]
    identity = enrolled(coordinator, "code")
    upload_id = staged_model(coordinator, "code", spec.model_dir)
    adopt, reports, joins = Uploads.adopt, [], []

    def adopt_then_collect(self, planned) -> None:
        adopt(self, planned)
        joins.append(collect_from_inside(coordinator, reports))

    monkeypatch.setattr(Uploads, "adopt", adopt_then_collect)
    coordinator.commit_upload(identity, upload_id)
    joins[0]()
    assert reports and reports[0].blobs == 0  # it ran after the row: nothing of the model was garbage
    assert coordinator.ledger.member("code").model is not None and not missing_blobs(coordinator)


def test_gc_during_a_publication_round_waits_for_the_version_and_keeps_its_blobs(
        coordinator, expert_factory, monkeypatch, tmp_path):
    specs = expert_factory("llama")
    contributed(coordinator, specs["code"], tmp_path)
    write, reports, joins = publication.write_moe_checkpoint, [], []

    def write_then_collect(*args, **kwargs) -> None:
        write(*args, **kwargs)  # the version's blobs are in the store; its row is not written yet
        if not joins:
            joins.append(collect_from_inside(coordinator, reports))

    monkeypatch.setattr(publication, "write_moe_checkpoint", write_then_collect)
    contributed(coordinator, specs["math"], tmp_path)
    joins[0]()
    latest = coordinator.ledger.version()
    assert reports and latest.members == ["code", "math"]
    assert all(coordinator.blobs.has(sha) for file in latest.files for sha in file.blob_hashes())
    assert not missing_blobs(coordinator)
