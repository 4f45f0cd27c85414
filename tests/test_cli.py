"""The command lines and the library as users and scripts meet them: ``--version``, ``--help`` and ``import dume``
without torch, the Python API with ``str`` paths, ``dume merge --json``, no progress bars off a terminal, and bad
input refused with one line and exit code 2. Every case runs the real command in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from importlib.metadata import version

import pytest
import torch

import dume
from dume.shared.transport.protocol import PROTOCOL_VERSION

from conftest import write_domain_text

MODULES = {"dume": "dume.shared.cli", "dume-node": "dume.node.cli", "dume-coordinator": "dume.coordinator.cli"}
HEAVY = ("torch", "transformers", "safetensors")
# Reports on exit (even after argparse's SystemExit) which heavy libraries the command imported.
REPORT_HEAVY = (f"import atexit, sys; atexit.register(lambda: print('heavy:', [m for m in {HEAVY!r} "
                "if m in sys.modules], file=sys.stderr)); ")


def environment() -> dict[str, str]:
    """Offline, and without the harness's switch for the libraries' bars: the commands must turn them off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return env


def run(app: str, *args: str, prefix: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prefix}import sys; from {MODULES[app]} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment(),
                          stdin=subprocess.DEVNULL, timeout=300)


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment(),
                          timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess[str], app: str, *fragments: str) -> None:
    """Exit code 2 and stderr is one ``<app>: error:`` line naming every fragment; no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{app}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("app", sorted(MODULES))
def test_version_and_help_answer_without_importing_torch(app):
    assert run(app, "--version").stdout == f"{app} {version('dume')} (protocol {PROTOCOL_VERSION})\n"
    helped = run(app, "--help", prefix=REPORT_HEAVY)
    assert helped.returncode == 0 and "usage:" in helped.stdout
    assert "heavy: []" in helped.stderr, helped.stderr


def test_import_dume_imports_no_torch_and_registers_nothing():
    checks = (
        "import sys, dume\n"
        f"heavy = {HEAVY!r}\n"
        "assert dume.__version__ and dume.MergeSettings(top_k=2).top_k == 2 and dume.ExpertSpec\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "from transformers import CONFIG_MAPPING\n"
        "assert 'dume_mixtral' not in CONFIG_MAPPING, 'registered on import'\n"
        "dume.register()\n"
        "assert 'dume_mixtral' in CONFIG_MAPPING and 'dume_qwen3_moe' in CONFIG_MAPPING\n"
    )
    result = python(checks)
    assert result.returncode == 0, result.stderr


def test_python_api_takes_str_paths_and_load_merged_loads_a_router_bias_checkpoint(expert_factory, tmp_path):
    specs = expert_factory("llama")
    members = [dume.ExpertSpec(name, str(spec.model_dir), str(spec.data_path)) for name, spec in specs.items()]
    out = dume.merge(members, str(tmp_path / "merged"), dume.MergeSettings(sequence_length=64, router_bias=True))
    assert out == tmp_path / "merged" and (out / "config.json").is_file()
    # A fresh process that registered nothing: load_merged must register the router-bias classes itself.
    loaded = python("import sys, dume; print(type(dume.load_merged(sys.argv[1])).__name__)", str(out))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "DumeMixtralForCausalLM"


def test_merge_prints_json_and_no_progress_bars_off_a_terminal(expert_factory, tmp_path):
    specs = expert_factory("llama")
    out = tmp_path / "merged"
    experts = [f"--expert={name}={spec.model_dir}:{spec.data_path}" for name, spec in sorted(specs.items())[:2]]
    result = run("dume", "merge", *experts, "--out", str(out), "--sequence-length", "64", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"out": str(out), "members": ["code", "math"]}
    # stderr is a pipe: neither our bars nor transformers' "Loading weights" bars may be drawn into it.
    for bar in ("Loading weights", "%|", "it/s", "\r"):
        assert bar not in result.stderr, result.stderr


def test_merge_draws_its_bars_on_a_terminal(expert_factory, tmp_path):
    """The other side of the rule: with stderr on a terminal the statistics bar (tokens/s) is drawn."""
    specs = expert_factory("llama")
    experts = [f"--expert={name}={spec.model_dir}:{spec.data_path}" for name, spec in sorted(specs.items())[:2]]
    code = f"import sys; from {MODULES['dume']} import main; sys.exit(main())"
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen([sys.executable, "-c", code, "merge", *experts, "--out", str(tmp_path / "merged"),
                                "--sequence-length", "64"], stdout=subprocess.DEVNULL, stderr=terminal,
                               stdin=subprocess.DEVNULL, env=environment())
    os.close(terminal)
    drawn = bytearray()
    while True:  # read until the command closes the terminal (EIO), so that it never blocks on a full buffer
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    assert process.wait(timeout=300) == 0, drawn.decode(errors="replace")
    assert b"statistics code" in drawn and b"tok/s" in drawn


def test_merge_of_one_expert_is_refused(expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    result = run("dume", "merge", f"--expert=code={spec.model_dir}:{spec.data_path}", "--out", str(tmp_path / "o"))
    assert_one_error_line(result, "dume", "at least two experts")
    assert not (tmp_path / "o").exists()


def test_data_too_small_for_a_router_is_refused_with_the_tokens_needed(expert_factory, tmp_path):
    specs = expert_factory("llama")
    hidden = json.loads((specs["code"].model_dir / "config.json").read_text())["hidden_size"]
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n")
    result = run("dume", "merge", f"--expert=code={specs['code'].model_dir}:{specs['code'].data_path}",
                 f"--expert=math={specs['math'].model_dir}:{small}", "--out", str(tmp_path / "o"))
    assert_one_error_line(result, "dume", "'math/default'", f"needs at least {hidden + 1}", "give it more data")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))  # neither the staging folder nor code's statistics, spilled before


def test_init_on_an_existing_file_is_refused(tmp_path):
    taken = tmp_path / "state"
    taken.write_text("not a directory")
    assert_one_error_line(run("dume-coordinator", "init", "--state", str(taken)), "dume-coordinator",
                          str(taken), "is a file")
    assert taken.read_text() == "not a directory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_train_on_cuda_without_a_gpu_is_refused(expert_factory, tmp_path):
    spec = expert_factory("llama")["code"]
    result = run("dume-node", "train", "--base", str(spec.model_dir), "--data", str(spec.data_path), "--out",
                 str(tmp_path / "expert"), "--device", "cuda")
    assert_one_error_line(result, "dume-node", "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "expert").exists()


def test_train_from_a_missing_base_names_the_directory(tmp_path):
    data = write_domain_text(tmp_path / "math.txt", "math")
    missing = tmp_path / "no-base"
    result = run("dume-node", "train", "--base", str(missing), "--data", str(data), "--out", str(tmp_path / "e"))
    assert_one_error_line(result, "dume-node", f"model directory {missing} does not exist")
