"""deploy/ refers to real commands and flags: every dume-coordinator and dume-node invocation in the compose file,
the Dockerfile and the systemd units goes through the real argument parsers; the units pass `systemd-analyze
verify` where it is installed, and the Grafana dashboard only plots metrics the daemon exports."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dume.coordinator.cli import build_parser as coordinator_parser
from dume.coordinator.metrics import Metrics
from dume.node.cli import build_parser as node_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PARSERS = {"dume-coordinator": coordinator_parser, "dume-node": node_parser}
SHELL_WORDS = {";", "&&", "||", "|", ">", "if", "then", "else", "fi", "exec", "test", "-f"}


def invocations(words: list[str], bare: bool = True) -> list[list[str]]:
    """Each dume command in a word list (a shell line split with its operators): the program and its args. The
    program is named by a path ending in bin/ (or, with ``bare``, by its name alone)."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for word in words:
        if word in SHELL_WORDS:
            current = None
        elif (bare and word in PARSERS) or (Path(word).name in PARSERS and Path(word).parent.name == "bin"):
            current = [Path(word).name]
            found.append(current)
        elif current is not None:
            current.append(word)
    return found


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|>")
    lexer.whitespace_split = True
    return list(lexer)


def check(invocation: list[str]) -> None:
    program, *args = invocation
    try:
        PARSERS[program]().parse_args(args)
    except SystemExit:
        pytest.fail(f"{' '.join(invocation)}: rejected by the real parser")


def compose_invocations() -> list[list[str]]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed; the compose file cannot be parsed here")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"coordinator", "tokens", "alpha", "beta"}
    found = []
    for service in compose["services"].values():
        command = service["command"]
        line = command[-1] if command[:2] == ["sh", "-c"] else shlex.join(command)
        found += invocations(shell_words(line.replace("$$", "$")))
    return found


def test_compose_dockerfile_and_units_run_real_commands_with_real_flags():
    found = compose_invocations()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for form in re.findall(r"^\s*(?:HEALTHCHECK .*?)?CMD (\[.*\])$", dockerfile.replace("\\\n", " "), re.M):
        found += invocations(json.loads(form))
    for unit in DEPLOY.glob("*.service"):
        text = unit.read_text()
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                found += invocations(shlex.split(line.removeprefix("ExecStart=")))
        # The set-up commands the comments tell an operator to run, continuation lines joined.
        comments = "\n".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        for line in comments.replace("\\\n", " ").splitlines():
            if line.startswith("sudo "):
                found += invocations(shell_words(line), bare=False)  # "dume-node" may be a user name
    commands = [" ".join(invocation[:2]) for invocation in found]
    for needed in ("dume-coordinator init", "dume-coordinator serve", "dume-coordinator token",
                   "dume-coordinator health", "dume-node join"):
        assert needed in commands
    for invocation in found:
        check(invocation)
    with pytest.raises(pytest.fail.Exception):  # the check itself refuses a flag that does not exist
        check(["dume-node", "join", "--model", "m", "--data", "d", "--workdir", "w", "--no-such-flag"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_units_verify(tmp_path):
    venv_bin = Path(shutil.which("dume-node") or "/usr/local/bin/dume-node").parent
    for unit in DEPLOY.glob("*.service"):
        copy = tmp_path / unit.name  # the binaries where this machine has them, so verify finds them
        copy.write_text(unit.read_text().replace("/usr/local/bin/", f"{venv_bin}/"))
        result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
        complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
        assert result.returncode == 0 and not complaints, complaints


def test_the_grafana_dashboard_plots_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exported = {metric.name for metric in Metrics().registry.collect()} | {"dume_members"}
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert queries
    for query in queries:
        for name in re.findall(r"\bdume_[a-z_]+", query):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported, f"{name} in the dashboard is not a metric the daemon exports"
