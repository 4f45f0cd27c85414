"""The routing probe: a real daemon runs each published version over the operator's probe text and `status` shows
each expert's share of routing, flagging one that takes far more than the fair share."""

from __future__ import annotations

import json

from dume.coordinator.cli import main as coordinator_main
from dume.shared.lab.harness import Federation, wait_until
from dume.shared.lab.tiny import synthetic_documents

from conftest import DOMAINS


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
    fed.init("--sequence-length", "64")
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

