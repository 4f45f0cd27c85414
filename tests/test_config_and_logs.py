"""Configuration (TOML file < DUME_* variables < flags), its validation and `config show`, join tokens from a file or
the environment, and the logs: JSON on request, and never a token or a private key in them."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

from dume.coordinator.cli import build_parser as build_coordinator_parser
from dume.coordinator.cli import main as coordinator_main
from dume.coordinator.state_dir import StateDir
from dume.node.cli import build_parser as build_node_parser
from dume.node.cli import main as node_main
from dume.shared.config import file_settings, options, subcommands
from dume.shared.lab.harness import Federation, command, wait_until
from dume.shared.logs import REDACTED, HumanFormatter, JsonFormatter
from dume.shared.trust.join_token import JoinToken

CONFIG = """
[coordinator]
state = "{state}"
top-k = 2
rho = 0.01
sequence-length = 32

[coordinator.init]
listen = "127.0.0.1:0"
enrolment-listen = "127.0.0.1:0"

[node]
token = "dume1.this-token-must-never-be-shown"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The developer's own DUME_* settings must not leak into these tests."""
    for variable in ("DUME_CONFIG", "DUME_STATE", "DUME_TOP_K", "DUME_RHO", "DUME_TOKEN", "DUME_LOG_FORMAT"):
        monkeypatch.delenv(variable, raising=False)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dume.toml"
    path.write_text(text)
    return path


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    config = write_config(tmp_path, CONFIG.format(state=state))
    monkeypatch.setenv("DUME_CONFIG", str(config))
    monkeypatch.setenv("DUME_TOP_K", "3")
    monkeypatch.setenv("DUME_RHO", "0.02")
    assert coordinator_main(["init", "--rho", "0.5"]) == 0  # no --state: the file gives it
    settings = StateDir(state).settings()
    assert (settings.top_k, settings.rho, settings.sequence_length) == (3, 0.5, 32)  # env, flag, file
    assert StateDir(state).config()["listen"] == "127.0.0.1:0"  # the [coordinator.init] table

    capsys.readouterr()
    assert coordinator_main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert f'state = "{state}"  # {config}' in shown
    assert "top-k = 3  # $DUME_TOP_K" in shown
    assert "rho = 0.02  # $DUME_RHO" in shown  # show reports what the flags would default to
    assert "batch-size = 8  # default" in shown


@pytest.mark.parametrize("text, expected", [
    ("[coordinator]\nstaet = '/x'\n", "unknown key 'staet' in [coordinator]"),
    ("[coordinator.serve]\ntop-k = 2\n", "unknown key 'top-k' in [coordinator.serve]"),
    ("listen = '0.0.0.0:1'\n", "unknown key 'listen' at the top level"),
    ("[coordinator]\ntop-k = 0\n", "[coordinator] top-k: '0' is not a positive integer"),
    ("[coordinator]\nrouter-bias = 'maybe'\n", "[coordinator] router-bias: 'maybe' is not true or false"),
    ("[coordinator\n", "is not valid TOML"),
])
def test_a_bad_configuration_file_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, text, expected):
    config = write_config(tmp_path, text)
    with pytest.raises(SystemExit) as exited:
        coordinator_main(["init", "--config", str(config), "--state", str(tmp_path / "state")])
    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert error.count("\n") == 1 and expected in error and str(config) in error, error
    assert not (tmp_path / "state").exists()  # refused before touching anything


def test_a_bad_environment_value_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUME_TOP_K", "many")
    with pytest.raises(SystemExit) as exited:
        coordinator_main(["init", "--state", str(tmp_path / "state")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "dume-coordinator: error: $DUME_TOP_K: 'many' is not a positive integer\n"


def test_config_show_masks_the_join_token(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, CONFIG.format(state=tmp_path / "state"))
    assert node_main(["config", "show", "--config", str(config)]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setenv("DUME_TOKEN", "dume1.another-secret-from-the-environment")
    assert node_main(["config", "show", "--config", str(config)]) == 0
    from_environment = capsys.readouterr().out
    assert 'token = "<set, not shown>"  # ' + str(config) in from_file
    assert 'token = "<set, not shown>"  # $DUME_TOKEN' in from_environment
    for shown in (from_file, from_environment):
        assert "this-token-must-never-be-shown" not in shown and "another-secret" not in shown


def test_join_with_a_token_file_and_json_logs_leaks_no_secret(expert_factory, tmp_path):
    """Real daemon and node processes, configured through DUME_* variables (json logs), one node reading its token
    from a file and one from $DUME_TOKEN; neither log may contain a token, its secret, or a private key."""
    experts = expert_factory("llama")
    fed = Federation(tmp_path / "federation")
    try:
        fed.init("--sequence-length", "64")
        fed.env["DUME_LOG_FORMAT"] = "json"
        fed.serve()
        tokens = {name: fed.token(name) for name in ("code", "math")}
        token_file = tmp_path / "code.token"
        token_file.write_text(tokens["code"] + "\n")
        nodes = {}
        for name, how in (("code", ["--token-file", str(token_file)]), ("math", [])):
            env = {**fed.env, **({"DUME_TOKEN": tokens[name]} if name == "math" else {})}
            nodes[name] = subprocess.Popen(
                command("node", "join", *how, "--model", str(experts[name].model_dir), "--data",
                        str(experts[name].data_path), "--workdir", str(fed.workdir(name)), "--once"),
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs = {name: node.communicate(timeout=300) for name, node in nodes.items()}
        for name, node in nodes.items():
            assert node.returncode == 0, outputs[name][1][-2000:]
        wait_until(lambda: "published version" in fed.log("coordinator").read_text(), 60, "a published version")
    finally:
        fed.close()

    coordinator_lines = fed.log("coordinator").read_text().splitlines()
    node_lines = [line for _, stderr in outputs.values() for line in stderr.splitlines()]
    records = [json.loads(line) for line in coordinator_lines + node_lines]  # every line is one JSON object
    assert all(set(record) >= {"time", "level", "logger", "message"} for record in records)
    messages = {(record["logger"], record["message"]) for record in records}
    assert {("dume.coordinator", f"enrolled {name} for expert {name}") for name in ("code", "math")} <= messages
    assert any(logger == "dume.node" and message.startswith("enrolled as code") for logger, message in messages)

    everything = "\n".join(coordinator_lines + node_lines)
    secrets = [*tokens.values(), *(JoinToken.decode(token).secret for token in tokens.values())]
    keys = [path for path in [*fed.state.rglob("*"), *(tmp_path / "federation" / "nodes").rglob("*")]
            if path.is_file() and b"PRIVATE KEY-----" in path.read_bytes()]
    assert len(keys) >= 3  # the CA's, the admin's, each node's
    for key in keys:
        secrets += [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    leaked = [secret for secret in secrets if secret in everything]
    assert not leaked, f"{len(leaked)} secrets in the logs"


def test_the_example_configuration_names_every_setting_and_each_is_valid(tmp_path):
    """deploy/dume.toml with every setting uncommented is accepted by both programs and covers all their flags."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "dume.toml"
    setting = re.compile(r"^# ([a-z-]+ = \S+)")
    uncommented = [setting.sub(r"\1", line) for line in example.read_text().splitlines()]
    (tmp_path / "all.toml").write_text("\n".join(uncommented) + "\n")
    for build_parser in (build_coordinator_parser, build_node_parser):
        parser = build_parser()
        found = file_settings(parser, tmp_path / "all.toml")
        for name, sub in subcommands(parser).items():
            missing = set(options(sub)) - set(found[name]) - {"config"}
            assert not missing, f"{parser.prog} {name}: {sorted(missing)} not in deploy/dume.toml"


def test_a_token_or_private_key_reaching_a_log_call_is_redacted_in_both_formats():
    token = JoinToken(coordinator="127.0.0.1:1", enrolment="127.0.0.1:2", ca_fingerprint="ab" * 32, node="code",
                      secret="s3cr3t-s3cr3t-s3cr3t", expires_at=1e12).encode()
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    record = logging.LogRecord("dume.node", logging.INFO, __file__, 1, "token %s key %s", (token, key), None)
    for formatter in (JsonFormatter(), HumanFormatter("%(name)s %(message)s")):
        line = formatter.format(record)
        assert "s3cr3t" not in line and token not in line and "MIIEvQ" not in line, line
        assert line.count(REDACTED) == 2
