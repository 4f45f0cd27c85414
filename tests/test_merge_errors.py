"""``dume merge`` refuses bad input with one clear line on stderr, exit code 2, no traceback and no output.

Every case runs the real command line in a subprocess (as a user would) against the session's tiny llama
experts, with one input broken in a copy under ``tmp_path``; the fixture's own directories are never modified.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dume.shared.lab.tiny import build_tiny_model
from dume.shared.method.averaging import lazy_basis
from dume.shared.method.merge import ExpertSpec, open_experts
from dume.shared.method.tensor_file import write_tensors

DUME = [sys.executable, "-c", "import sys; from dume.shared.cli import main; sys.exit(main())"]


def expert_arg(name: str, model_dir: Path, data_path: Path) -> list[str]:
    return ["--expert", f"{name}={model_dir}:{data_path}"]


def spec_args(*specs: ExpertSpec) -> list[str]:
    return [arg for spec in specs for arg in expert_arg(spec.name, spec.model_dir, spec.data_path)]


def run_merge(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [*DUME, "merge", *args, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code 2, nothing written to stdout, and stderr is one ``dume: error:`` line naming every fragment."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert "wrote" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("dume: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    staging = sorted(out.parent.glob(f".{out.name}.partial-*"))
    assert not staging, f"staging directories left behind: {staging}"


@pytest.fixture
def experts(expert_factory) -> dict[str, ExpertSpec]:
    return expert_factory("llama")


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "merged"


def copy_model(spec: ExpertSpec, destination: Path) -> Path:
    return Path(shutil.copytree(spec.model_dir, destination))


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- model directories -----------------------------------------------------------------------------------


def missing_model(spec: ExpertSpec, folder: Path) -> tuple[Path, list[str]]:
    path = folder / "no-such-model"
    return path, [str(path), "does not exist"]


def model_without_config(spec: ExpertSpec, folder: Path) -> tuple[Path, list[str]]:
    path = copy_model(spec, folder / "no-config")
    (path / "config.json").unlink()
    return path, [str(path), "config.json"]


def unsupported_model_type(spec: ExpertSpec, folder: Path) -> tuple[Path, list[str]]:
    path = copy_model(spec, folder / "gpt2")
    edit_config(path, model_type="gpt2")
    return path, ["'code'", "model_type", "'gpt2'"]


def llama_with_attention_bias(spec: ExpertSpec, folder: Path) -> tuple[Path, list[str]]:
    path = build_tiny_model("llama", folder / "biased", attention_bias=True)
    return path, ["'code'", "attention_bias=True"]


@pytest.mark.parametrize(
    "break_model", [missing_model, model_without_config, unsupported_model_type, llama_with_attention_bias]
)
def test_bad_model_directory(experts, tmp_path, out, break_model: Callable):
    model_dir, fragments = break_model(experts["code"], tmp_path)
    result = run_merge(
        out, *expert_arg("code", model_dir, experts["code"].data_path), *spec_args(experts["math"])
    )
    assert_one_error_line(result, *fragments)
    assert_nothing_written(out)


# --- data ------------------------------------------------------------------------------------------------


def data_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path

    return make


def directory_without_data(folder: Path) -> Path:
    path = folder / "corpus"
    path.mkdir()
    (path / "notes.csv").write_text("text\nhello\n")
    return path


@pytest.mark.parametrize(
    ("make_data", "fragments"),
    [
        pytest.param(lambda folder: folder / "missing.jsonl", ["does not exist"], id="missing"),
        pytest.param(data_file("data.csv", b"text\nhello world\n"), [".jsonl"], id="csv-suffix"),
        pytest.param(data_file("data.jsonl", b'{"text": "fine"}\n{not json\n'), ["line 2", "JSON"], id="bad-json"),
        pytest.param(data_file("data.jsonl", b'{"body": "no text here"}\n'), ["line 1", '"text"'], id="no-text"),
        pytest.param(data_file("data.txt", b"caf\xe9 au lait\n"), ["UTF-8"], id="not-utf8"),
        pytest.param(data_file("data.txt", b"PK\x03\x04\x00\x00\x08\x00\n"), ["line 1 holds a NUL byte", "binary"],
                     id="binary"),
        pytest.param(data_file("data.txt", b"\n   \n\t\n"), ["non-empty documents"], id="blank-lines"),
        pytest.param(directory_without_data, [".jsonl", ".txt"], id="directory-without-data"),
    ],
)
def test_bad_data(experts, tmp_path, out, make_data: Callable[[Path], Path], fragments: list[str]):
    data_path = make_data(tmp_path)
    result = run_merge(
        out, *expert_arg("code", experts["code"].model_dir, data_path), *spec_args(experts["math"])
    )
    assert_one_error_line(result, str(data_path), *fragments)
    assert_nothing_written(out)


def test_unreadable_data(experts, tmp_path, out):
    if os.geteuid() == 0:
        pytest.skip("root can read a file whatever its permissions")
    data_path = data_file("data.txt", b"some text\n")(tmp_path)
    data_path.chmod(0)
    try:
        result = run_merge(
            out, *expert_arg("code", experts["code"].model_dir, data_path), *spec_args(experts["math"])
        )
    finally:
        data_path.chmod(0o644)
    assert_one_error_line(result, str(data_path), "cannot read")
    assert_nothing_written(out)


# --- experts that do not belong together ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "overrides", "fragments"),
    [
        pytest.param("qwen3", {}, ["model_type", "'qwen3'", "'llama'"], id="llama-vs-qwen3"),
        pytest.param("llama", {"hidden_size": 48}, ["hidden_size", "48", "32"], id="hidden-size"),
    ],
)
def test_mismatched_experts(experts, tmp_path, out, family: str, overrides: dict, fragments: list[str]):
    other = build_tiny_model(family, tmp_path / "other", **overrides)
    result = run_merge(out, *spec_args(experts["code"]), *expert_arg("other", other, experts["math"].data_path))
    assert_one_error_line(result, "'code'", "'other'", *fragments)
    assert_nothing_written(out)


# --- members and settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_args", "fragments"),
    [
        pytest.param(
            lambda e: spec_args(e["code"]) + expert_arg("code", e["math"].model_dir, e["math"].data_path),
            ["'code'", "twice"],
            id="duplicate-name",
        ),
        pytest.param(
            lambda e: expert_arg("bad/name", e["code"].model_dir, e["code"].data_path) + spec_args(e["math"]),
            ["'bad/name'", "not allowed"],
            id="invalid-name",
        ),
        pytest.param(
            lambda e: spec_args(e["code"], e["math"]) + ["--top-k", "3"],
            ["top-k 3", "1 to 2"],
            id="top-k-above-experts",
        ),
        pytest.param(
            lambda e: spec_args(e["code"], e["math"]) + ["--device", "tpu"],
            ["--device 'tpu'", "cpu, cuda, cuda:N or auto"],
            id="unknown-device",
        ),
        pytest.param(
            lambda e: spec_args(e["code"], e["math"]) + ["--device", "cuda:7"],
            ["--device cuda:7", "GPU"],
            id="missing-gpu",
        ),
    ],
)
def test_bad_members_and_settings(experts, out, make_args: Callable, fragments: list[str]):
    result = run_merge(out, *make_args(experts))
    assert_one_error_line(result, *fragments)
    assert_nothing_written(out)


def test_existing_output_is_refused_and_left_untouched(experts, out):
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("precious")
    result = run_merge(out, *spec_args(experts["code"], experts["math"]))
    assert_one_error_line(result, str(out), "already exists")
    assert sorted(out.iterdir()) == [keep]
    assert keep.read_text() == "precious"
    assert not sorted(out.parent.glob(f".{out.name}.partial-*"))


def test_malformed_expert_argument_is_a_usage_error(experts, out):
    """argparse reports it: usage lines, then one error line naming the argument; still exit 2."""
    result = run_merge(out, "--expert", f"code={experts['code'].model_dir}", *spec_args(experts["math"]))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("dume merge: error: argument --expert"), last
    assert "NAME=MODEL_DIR:DATA[,DATA...]" in last, last
    assert_nothing_written(out)


# --- model files that exist but cannot be read, and an --out that cannot be created -----------------------


def config_not_an_object(spec: ExpertSpec, folder: Path) -> tuple[list[str], list[str]]:
    path = copy_model(spec, folder / "list-config")
    (path / "config.json").write_text("[]")
    return expert_arg("code", path, spec.data_path), [str(path), "config.json"]


def corrupt_weights(spec: ExpertSpec, folder: Path) -> tuple[list[str], list[str]]:
    path = copy_model(spec, folder / "corrupt")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return expert_arg("code", path, spec.data_path), [str(path)]


@pytest.mark.parametrize("break_input", [config_not_an_object, corrupt_weights])
def test_unreadable_model_files_are_refused(experts, tmp_path, out, break_input: Callable):
    args, fragments = break_input(experts["code"], tmp_path)
    result = run_merge(out, *args, *spec_args(experts["math"]))
    assert_one_error_line(result, *fragments)
    assert_nothing_written(out)


def test_output_below_a_file_is_refused(experts, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_merge(blocker / "merged", *spec_args(experts["code"], experts["math"]))
    assert_one_error_line(result, str(blocker))


# --- a disk that fills up during the merge ---------------------------------------------------------------------


@contextmanager
def small_disk(mount: Path, pages: int) -> Iterator[Path]:
    """A real filesystem (tmpfs) of ``pages`` memory pages at ``mount``, where this test may mount one."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * mmap.PAGESIZE}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("fills_at", ["basis", "statistics", "checkpoint", "workers"])
def test_a_full_disk_beside_the_output_is_one_line_and_leaves_nothing(experts, tmp_path, fills_at: str):
    """The disk beside --out fills while the merge spills the basis there, spills the statistics after it (two
    pages each per dataset at this size), writes the checkpoint (larger than both), or, with --nproc 2, while
    rank 0 writes its first result beside the workers' job: one line naming the folder and what to do, no
    traceback, and nothing left on the disk."""
    specs = [experts[name] for name in sorted(experts)]
    write_tensors(lazy_basis(open_experts(specs)), tmp_path / "basis.safetensors")
    basis = -(-(tmp_path / "basis.safetensors").stat().st_size // mmap.PAGESIZE)
    pages = {"basis": basis - 4, "statistics": basis + 2, "checkpoint": 2 * basis, "workers": basis + 1}[fills_at]
    workers = ["--nproc", "2"] if fills_at == "workers" else []
    with small_disk(tmp_path / "small-disk", pages) as disk:
        result = run_merge(disk / "merged", *spec_args(*specs), *workers)
        assert_one_error_line(result, f"the disk is full (writing {disk}", "choose an --out on a disk with room")
        assert ("dume-statistics-" in result.stderr) == (fills_at == "workers")  # the workers' folder, if theirs
        assert not list(disk.iterdir())
