"""The routing probe: a real daemon runs each published version over the operator's probe text and `status` shows
each expert's share of routing, flagging one that takes far more than the fair share."""

from __future__ import annotations

import json

import pytest

from dume.coordinator.cli import main as coordinator_main
from dume.coordinator.errors import Refused
from dume.shared.lab.harness import Federation, wait_until
from dume.shared.lab.tiny import synthetic_documents

from conftest import DOMAINS
from in_process import enrolled, make_coordinator
from test_state_changes import staged_model, statistics_committed

pytestmark = pytest.mark.scenario("router capture")


def probe_text(path, documents: int = 20):
    """Held-out documents of every domain in equal numbers (offset past the members' data)."""
    path.write_text("\n".join(document for name in sorted(DOMAINS)
                              for document in synthetic_documents(name, documents, offset=500)) + "\n")
    return path


def status_text(state, capsys) -> str:
    """`dume-coordinator status` as the operator reads it (run in this process: no torch import per call)."""
    capsys.readouterr()
    assert coordinator_main(["status", "--state", str(state)]) == 0
    return capsys.readouterr().out


def test_status_shows_each_experts_routing_share_and_flags_a_member_that_repeats_its_data(
        expert_factory, tmp_path, capsys):
    experts = expert_factory("llama")
    repeated = tmp_path / "code-x10.txt"  # consistent statistics: the same documents declared ten times
    repeated.write_text(experts["code"].data_path.read_text() * 10)
    probe = probe_text(tmp_path / "probe.txt")
    fed = Federation(tmp_path / "federation")
    fed.init("--sequence-length", "64", "--expert-weighting", "tokens")  # the weighting repetition buys routing in
    fed.serve("--probe-data", str(probe), "--probe-tokens", "2048")
    try:
        for name, spec in sorted(experts.items()):
            fed.join(name, spec.model_dir, repeated if name == "code" else spec.data_path, fed.token(name))
        version = fed.wait_exact(sorted(experts))["version"]
        status = wait_until(lambda: (s := fed.status())["routing"] and s["routing"]["version"] == version and s,
                            60, "the routing probe of the exact version")
        routing = status["routing"]
        assert routing["error"] is None and 1800 < routing["tokens"] <= 2048
        assert sorted(routing["shares"]) == sorted(experts)
        assert abs(sum(share["share"] for share in routing["shares"].values()) - 1) < 1e-9
        layers = len(routing["shares"]["code"]["per_layer"])
        for index in range(layers):
            assert abs(sum(share["per_layer"][index] for share in routing["shares"].values()) - 1) < 1e-9
        flagged = {name for name, share in routing["shares"].items() if share["flagged"]}
        assert flagged == {"code"}, routing["shares"]
        assert routing["shares"]["code"]["share"] > routing["flag_ratio"] / len(experts)
        text = status_text(fed.state, capsys)
        code_line = next(line for line in text.splitlines() if line.strip().startswith("code") and "routing" in line)
        assert "FLAGGED" in code_line
        assert not any("FLAGGED" in line for line in text.splitlines() if line.strip().startswith(("math", "prose")))

        # A probe text that does not exist stops `serve` in one line, before it touches the state directory.
        code = coordinator_main(["serve", "--state", str(fed.state), "--probe-data", str(tmp_path / "missing.txt")])
        error = capsys.readouterr().err.strip()
        assert code != 0 and len(error.splitlines()) == 1 and "missing.txt" in error, error

        # A probe that fails (its text gone) is shown in status and takes nothing from publication.
        probe.unlink()
        revoked = fed.admin("revoke", "math", "--json")
        after = json.loads(revoked.stdout)["version"]
        assert after == version + 1
        status = wait_until(lambda: (s := fed.status())["routing"]["version"] == after and s, 60, "the failed probe")
        assert status["version"] == after and status["publication_error"] is None
        assert "probe.txt" in status["routing"]["error"] and status["routing"]["shares"] == {}
        assert f"routing probe of version {after} failed" in status_text(fed.state, capsys)
    finally:
        fed.close()



def honest_math_and_prose(coordinator, experts, tmp_path):
    """Every expert's model in, then math's and prose's own statistics (recorded, not held); returns the identities
    and a file of code's data repeated ten times, the outlier the tests send."""
    identities = {name: enrolled(coordinator, name) for name in sorted(experts)}
    for name, spec in sorted(experts.items()):
        coordinator.commit_upload(identities[name], staged_model(coordinator, name, spec.model_dir))
    coordinator.publisher.wait(coordinator.publisher.request())
    repeated = tmp_path / "code-x10.txt"
    repeated.write_text(experts["code"].data_path.read_text() * 10)
    for name in ("math", "prose"):
        assert statistics_committed(coordinator, experts[name], identities[name], tmp_path) == ""
    return identities, repeated


def test_statistics_far_above_the_other_experts_wait_for_the_operators_approval(expert_factory, tmp_path):
    """With limits.approve_tokens_above_ratio, a contribution that would give its expert more than that multiple of
    the median of the other experts' tokens is held: in no version, shown in status, until approved or refused."""
    experts = expert_factory("llama")
    coordinator = make_coordinator(tmp_path / "coordinator", approve_tokens_above_ratio=3)
    try:
        identities, repeated = honest_math_and_prose(coordinator, experts, tmp_path)
        statistics_committed(coordinator, experts["code"], identities["code"], tmp_path, data=repeated)

        assert [c.label for c in coordinator.ledger.contributions()] == ["math/default", "prose/default"]
        code = next(expert for expert in coordinator.status().experts if expert.name == "code")
        assert [(c.node, c.dataset) for c in code.pending] == [("code", "default")] and not code.contributions
        assert "code/default" not in coordinator.ledger.version().contributions
        hold = coordinator.ledger.audit_entries()[-1]
        assert hold.kind == "hold" and "above limits.approve_tokens_above_ratio = 3" in json.loads(
            hold.detail_json)["reason"]
        with pytest.raises(Refused, match="code/other is not held for approval"):
            coordinator.approve("code", "other")

        approved = coordinator.approve("code", "default")
        assert approved.publication_error == "" and approved.version == coordinator.ledger.version().number
        assert "code/default" in coordinator.ledger.version().contributions
        assert coordinator.ledger.pending_contributions() == []

        # More of the same from code: held again, refused this time; the dataset is out and its node told so.
        statistics_committed(coordinator, experts["code"], identities["code"], tmp_path, "more", data=repeated)
        assert [c.label for c, _ in coordinator.ledger.pending_contributions()] == ["code/more"]
        coordinator.approve("code", "more", refuse=True)
        assert coordinator.ledger.removed_datasets("code") == ["more"]
        assert [c.label for c in coordinator.ledger.contributions()] == ["code/default", "math/default",
                                                                         "prose/default"]
        assert [entry.kind for entry in coordinator.ledger.audit_entries()[-4:]] == ["approve", "publish", "hold",
                                                                                   "refuse"]
    finally:
        coordinator.close()


def test_held_statistics_are_bounded_reported_and_leave_with_their_node(expert_factory, tmp_path):
    """A held contribution counts toward the node's dataset limit (approving cannot pass it either), its node is
    told and `status` does not call it current; the node can forget it, and leaving (or re-enrolling) takes it
    away, so it never comes back from an earlier membership."""
    experts = expert_factory("llama")
    coordinator = make_coordinator(tmp_path / "coordinator", approve_tokens_above_ratio=3, datasets_per_node=2)
    try:
        identities, repeated = honest_math_and_prose(coordinator, experts, tmp_path)
        code, spec = identities["code"], experts["code"]
        for dataset in ("first", "second"):
            held = statistics_committed(coordinator, spec, code, tmp_path, dataset, data=repeated)
            assert "above limits.approve_tokens_above_ratio = 3" in held
        assert not next(m for m in coordinator.status().members if m.name == "code").stats_current
        with pytest.raises(Refused, match="already contributes 2 datasets"):  # held ones count
            statistics_committed(coordinator, spec, code, tmp_path, "third", data=repeated)

        # The same statistics again (their answer lost) are not held twice.
        statistics_committed(coordinator, spec, code, tmp_path, "first", data=repeated)
        assert [e.kind for e in coordinator.ledger.audit_entries()].count("hold") == 2

        # Forgetting a dataset that is only held works, and its name is not taken back.
        assert coordinator.forget(code, "second").publication_error == ""
        assert [c.label for c, _ in coordinator.ledger.pending_contributions()] == ["code/first"]

        # Leaving takes the held contribution away; re-enrolling under the name does not bring it back.
        coordinator.leave(code)
        assert coordinator.ledger.pending_contributions() == []
        enrolled(coordinator, "code")
        with pytest.raises(Refused, match="code/first is not held for approval"):
            coordinator.approve("code", "first")
        assert [c.label for c in coordinator.ledger.contributions()] == ["math/default", "prose/default"]
    finally:
        coordinator.close()

