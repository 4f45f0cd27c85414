"""Contributions, end to end: a second node feeding an expert, datasets added, forgotten and revoked, an expert's
weights updated and its owner revoked. Real coordinator and node processes on loopback; after each step the exact
version is compared byte for byte with `dume merge` given the same experts and datasets.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.coordinator.errors import Refused
from dume.coordinator.ledger import Ledger
from dume.coordinator.records import Contribution
from dume.node.workdir import Workdir
from dume.shared.lab.harness import Federation, cli, differing_files, wait_until
from dume.shared.lab.tiny import build_tiny_model
from dume.shared.method.merge import merge
from dume.shared.method.routers import MergeSettings
from dume.shared.method.settings import DatasetSpec, ExpertSpec

from conftest import write_domain_text
from in_process import enrolled
from test_state_changes import contributed, staged_model, statistics_committed

SETTINGS = MergeSettings(sequence_length=64)


@pytest.fixture(scope="module")
def experts(expert_factory):
    return expert_factory("llama")


def new_fine_tune_of_mlps(model_dir: Path, out: Path) -> Path:
    """A copy of the model whose MLPs (only) moved, as a new fine-tune of an expert's MLPs leaves it."""
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(11)
    for name, tensor in weights.items():
        if ".mlp." in name:
            tensor.add_(0.3 * tensor.std() * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def statistics_uploads(fed: Federation, node: str) -> list[str]:
    """The datasets whose statistics ``node`` uploaded, in order (from its transfer record)."""
    return [t["dataset"] for t in Workdir(fed.workdir(node)).transfers()
            if t["event"] == "upload" and t["what"] == "statistics"]


def test_contributions_added_updated_forgotten_and_revoked_give_the_merge_bytes(experts, tmp_path):
    math, code = experts["math"], experts["code"]
    notes = {name: write_domain_text(tmp_path / f"math-{name}.txt", "math", documents=20, offset=offset)
             for name, offset in (("a", 100), ("b", 200), ("c", 300))}
    math_v2 = new_fine_tune_of_mlps(math.model_dir, tmp_path / "math-v2")
    fed = Federation(tmp_path / "federation")
    fed.init("--sequence-length", "64", fixed_ports=True)
    fed.serve()

    def matches(label: str, expected: list[str], specs: list[ExpertSpec], members: tuple[str, ...] = ()) -> None:
        """The exact version over ``expected`` contributions is `dume merge` of ``specs``, byte for byte."""
        members = sorted({label.split("/")[0] for label in expected} | {spec.name for spec in specs} | set(members))
        fed.wait_exact(members, contributions=expected)
        reference = merge(specs, tmp_path / f"reference-{label}", SETTINGS)
        assert not differing_files(fed.export(tmp_path / f"exported-{label}"), reference), label

    def math_expert(model, *datasets: DatasetSpec) -> ExpertSpec:
        return ExpertSpec("math", model, datasets=datasets)

    try:
        # A second node feeds the math expert with its own dataset; it sends no weights. Every node follows the
        # federation (the basis moves as the owners join; statistics under an old one are stale).
        fed.join("math", math.model_dir, [f"a={notes['a']}"], fed.token("math"))
        fed.join("code", code.model_dir, code.data_path, fed.token("code"))
        wait_until(lambda: any(m["name"] == "math" for m in fed.status()["members"]), 60, "math enrolled")
        contributor = fed.admin("token", "--node", "math2", "--expert", "math").stdout.strip()
        fed.join("math2", None, [f"b={notes['b']}"], contributor)  # recomputes when the weights move
        matches("two-nodes", ["math/a", "math2/b", "code/default"],
                [math_expert(math.model_dir, DatasetSpec("a", notes["a"]), DatasetSpec("b", notes["b"], "math2")),
                 code])
        assert [t["what"] for t in Workdir(fed.workdir("math2")).transfers() if t["event"] == "upload"] == [
            "statistics"] * len(statistics_uploads(fed, "math2"))

        # This year's data added to an owner (its service restarted with one more --data): only that dataset's
        # statistics travel.
        assert fed.stop("node-math") == 0
        uploads = statistics_uploads(fed, "math")
        no_model = cli("node", "join", "--data", f"c={notes['c']}", "--workdir", str(fed.workdir("math")), check=False)
        assert no_model.returncode == 2 and "give its weights with --model" in no_model.stderr
        assert fed.join("math", math.model_dir, [f"a={notes['a']}", f"c={notes['c']}"], None, "--once").wait(120) == 0
        assert statistics_uploads(fed, "math") == uploads + ["c"]
        matches("added", ["math/a", "math/c", "math2/b", "code/default"],
                [math_expert(math.model_dir, DatasetSpec("a", notes["a"]), DatasetSpec("c", notes["c"]),
                             DatasetSpec("b", notes["b"], "math2")), code])

        # The owner's new fine-tune: every contribution to math is recomputed with it, code's stay as they are.
        wide = build_tiny_model("llama", tmp_path / "wide", intermediate_size=96)
        refused = cli("node", "update", "--workdir", str(fed.workdir("math")), "--model", str(wide), check=False)
        assert refused.returncode == 2 and "cannot replace the expert" in refused.stderr.strip().splitlines()[-1]
        code_uploads, math2_uploads = statistics_uploads(fed, "code"), statistics_uploads(fed, "math2")
        cli("node", "update", "--workdir", str(fed.workdir("math")), "--model", str(math_v2))
        matches("updated", ["math/a", "math/c", "math2/b", "code/default"],
                [math_expert(math_v2, DatasetSpec("a", notes["a"]), DatasetSpec("c", notes["c"]),
                             DatasetSpec("b", notes["b"], "math2")), code])
        assert statistics_uploads(fed, "code") == code_uploads
        assert statistics_uploads(fed, "math2") == math2_uploads + ["b"]

        # One dataset forgotten by its node, another revoked by the admin: each as if never contributed.
        unknown = cli("node", "forget", "--workdir", str(fed.workdir("math")), "--dataset", "z", check=False)
        assert unknown.returncode == 2 and "no dataset 'z' (it has: a, c)" in unknown.stderr
        forgot = cli("node", "forget", "--workdir", str(fed.workdir("math")), "--dataset", "a", "--json")
        assert json.loads(forgot.stdout)["forgotten"] == "a"
        matches("forgotten", ["math/c", "math2/b", "code/default"],
                [math_expert(math_v2, DatasetSpec("c", notes["c"]), DatasetSpec("b", notes["b"], "math2")), code])
        again = cli("node", "join", "--model", str(math_v2), "--data", f"a={notes['a']}", "--workdir",
                    str(fed.workdir("math")), "--once", check=False)
        assert again.returncode == 2 and "dataset 'a' was taken out of the federation" in again.stderr
        fed.admin("revoke", "math2", "--dataset", "b", "--reason", "consent withdrawn")
        matches("revoked-dataset", ["math/c", "code/default"],
                [math_expert(math_v2, DatasetSpec("c", notes["c"])), code], members=("math2",))
        status = json.loads(fed.admin("status", "--json").stdout)
        assert {e["name"]: e["contributors"] for e in status["experts"]} == {"code": [], "math": ["math2"]}

        # Revoking the owner takes its expert and every contribution to it: the build without math. Its contributor
        # has nothing left to feed and is told so.
        fed.admin("revoke", "math", "--reason", "left the consortium")
        fed.wait_exact(["code"], contributions=["code/default"])
        assert fed.exited("node-math2") == 5
        assert "its expert math is revoked" in fed.log("node-math2").read_text()
        assert not differing_files(fed.export(tmp_path / "exported-no-math"),
                                   merge([code], tmp_path / "reference-no-math", SETTINGS))
    finally:
        fed.close()


def test_bad_contributions_are_refused_with_one_line_and_change_nothing(coordinator, experts, tmp_path):
    with pytest.raises(Refused, match="there is no expert 'clinical' to contribute to") as refused:
        coordinator.create_token("hospital2", 3600, "clinical")
    assert refused.value.kind == "not_found"
    enrolled(coordinator, "math")
    enrolled(coordinator, "code")
    with pytest.raises(Refused, match="node 'math' owns expert 'math'; a node contributes to one expert"):
        coordinator.create_token("math", 3600, "code")
    before = coordinator.ledger.audit_entries()
    contributor = enrolled(coordinator, "math2", "math")
    from dume.node.agent import model_upload

    with pytest.raises(Refused, match="a contributor sends statistics only") as refused:
        coordinator.begin_upload(contributor.name, model_upload(experts["math"].model_dir, "math2").plan)
    assert refused.value.kind == "permission"
    with pytest.raises(Refused, match="expert 'math' has no weights in the federation yet"):
        coordinator.expert(contributor.name)
    assert [e.kind for e in coordinator.ledger.audit_entries()[len(before):]] == ["token", "enrol"]

    spec = experts["math"]
    token = coordinator.create_token("math3", 3600, "math").encode()
    join = cli("node", "join", "--token", token, "--model", str(spec.model_dir), "--data", str(spec.data_path),
               "--workdir", str(tmp_path / "math3"), check=False)
    assert join.returncode == 2 and "drop --model" in join.stderr.strip().splitlines()[-1]
    twice = cli("node", "join", "--token", token, "--data", f"x={spec.data_path}", "--data", f"x={spec.data_path}",
                "--workdir", str(tmp_path / "math3"), check=False)
    assert twice.returncode == 2 and "dataset name 'x' is given twice" in twice.stderr.strip().splitlines()[-1]
    assert coordinator.ledger.member("math3") is None  # refused before enrolling: the token is still unused


def test_an_experts_weights_are_read_by_its_group_only_until_published(coordinator, experts, tmp_path):
    math = experts["math"]
    owner = enrolled(coordinator, "math")
    coordinator.commit_upload(owner, staged_model(coordinator, "math", math.model_dir))
    coordinator.publisher.wait(coordinator.publisher.request())  # the basis with math in it (no version yet)
    contributor, stranger = enrolled(coordinator, "math2", "math"), enrolled(coordinator, "code")
    weights_hash, weights = coordinator.expert(contributor.name)
    assert coordinator.ledger.expert_hashes() == {"math": weights_hash}
    assert {file.name for file in weights.files} >= {"config.json"}
    mlp = sorted(entry.sha256 for entry in weights.manifest.tensors)
    assert len(mlp) == 6 and all(".mlp." in entry.name for entry in weights.manifest.tensors)
    for sha256 in mlp:
        assert coordinator.published_blob(sha256, "math2").is_file()
        with pytest.raises(Refused, match="in no basis or version code may read"):
            coordinator.published_blob(sha256, "code")
    with pytest.raises(Refused, match="expert 'code' has no weights in the federation yet"):
        coordinator.expert(stranger.name)

    # The contributor's statistics count for math; after them, a version holds the weights for everyone.
    statistics_committed(coordinator, math, contributor, tmp_path, "notes")
    assert [c.label for c in coordinator.ledger.contributions()] == ["math2/notes"]
    assert all(coordinator.published_blob(sha256, "code").is_file() for sha256 in mlp)


def test_a_node_records_at_most_the_datasets_its_limit_allows(expert_factory, tmp_path):
    from in_process import make_coordinator

    coordinator = make_coordinator(tmp_path / "coordinator", datasets_per_node=2)
    try:
        math = expert_factory("llama")["math"]
        owner = enrolled(coordinator, "math")
        coordinator.commit_upload(owner, staged_model(coordinator, "math", math.model_dir))
        coordinator.publisher.wait(coordinator.publisher.request())
        for dataset in ("a", "b", "a"):  # a dataset sent again replaces its statistics: no room needed
            statistics_committed(coordinator, math, owner, tmp_path, dataset)
        with pytest.raises(Refused, match=r"math already contributes 2 datasets.*limits.datasets_per_node"):
            statistics_committed(coordinator, math, owner, tmp_path, "c")
        assert [c.label for c in coordinator.ledger.contributions()] == ["math/a", "math/b"]
    finally:
        coordinator.close()


def test_a_ledger_of_member_statistics_is_migrated_to_contributions(coordinator, experts, tmp_path):
    """A state directory of the release before contributions: one statistics row per member becomes that member's
    contribution of dataset ``default`` to its own expert, under the weights its model row holds."""
    math = experts["math"]
    contributed(coordinator, math, tmp_path)
    ledger_path = coordinator.ledger._db.execute("PRAGMA database_list").fetchone()[2]
    row = coordinator.ledger.contribution("math", "default")
    weights = coordinator.ledger.expert_hashes()["math"]
    coordinator.close()
    with sqlite3.connect(ledger_path) as db:  # back to the previous release's schema
        db.execute("CREATE TABLE statistics (member TEXT PRIMARY KEY, basis_hash TEXT NOT NULL, token_count "
                   "INTEGER NOT NULL, manifest BLOB NOT NULL, at REAL NOT NULL)")
        db.execute("INSERT INTO statistics VALUES ('math', ?, ?, ?, 0)",
                   (row.basis_hash, row.token_count, row.manifest.SerializeToString(deterministic=True)))
        db.execute("DROP TABLE contributions")
        db.execute("ALTER TABLE members DROP COLUMN expert")
    migrated = Ledger(Path(ledger_path))
    try:
        assert migrated.contributions() == [Contribution("math", "default", "math", row.basis_hash, weights,
                                                         row.token_count, row.manifest)]
        assert migrated.member("math").expert == "math"
        assert not migrated._rows("SELECT 1 FROM sqlite_master WHERE name = 'statistics'")
    finally:
        migrated.close()


def test_statistics_overtaken_by_new_weights_or_a_removal_are_refused_as_stale(coordinator, experts, tmp_path,
                                                                               monkeypatch):
    """Statistics computed with weights the expert no longer has, or of a dataset taken out, are refused as stale
    (ABORTED): a node does not send them again as they are, it acts on the next event instead."""
    math = experts["math"]
    owner = enrolled(coordinator, "math")
    coordinator.commit_upload(owner, staged_model(coordinator, "math", math.model_dir))
    coordinator.publisher.wait(coordinator.publisher.request())
    for dataset in ("a", "c"):
        statistics_committed(coordinator, math, owner, tmp_path, dataset)
    assert coordinator.forget(owner, "a").publication_error == ""
    with pytest.raises(Refused, match="dataset 'a' of math was taken out of the federation") as refused:
        statistics_committed(coordinator, math, owner, tmp_path, "a")
    assert refused.value.kind == "stale"
    current = coordinator.ledger.expert_hashes
    monkeypatch.setattr(coordinator.ledger, "expert_hashes", lambda: {"math": "0" * 64})  # a node's older weights
    with pytest.raises(Refused, match="whose current weights are") as refused:
        statistics_committed(coordinator, math, owner, tmp_path, "b")
    assert refused.value.kind == "stale"
    monkeypatch.setattr(coordinator.ledger, "expert_hashes", current)
    assert [c.label for c in coordinator.ledger.contributions()] == ["math/c"]
