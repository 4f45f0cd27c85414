"""A node's statistics: lean in memory (decoder without its head, basis read lazily, G packed), the same bytes
whichever way the basis is read and within float32 products of an all-float64 computation, and resumable after a
SIGKILL with the same bytes as an uninterrupted run."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dume.shared.errors import DumeError
from dume.shared.lab.tiny import build_tiny_model, perturb_mlps, synthetic_documents
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.expert import ExpertDirectory, load_decoder, load_dense_model, overwrite_parameters
from dume.shared.method.lazy_tensors import LazyTensors
from dume.shared.method.statistics import (
    check_enough_tokens,
    packed_statistics_under_basis,
    statistics_tensors,
    statistics_under_basis,
    token_count,
)
from dume.shared.method.statistics_checkpoint import StatisticsCheckpoint
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import stored_tensors, tensor_bytes, tensor_entry


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """A tiny Llama expert, its data, and the basis it shares with a second expert, saved as a basis file."""
    root = tmp_path_factory.mktemp("member")
    base = build_tiny_model("llama", root / "base", seed=0)
    other = perturb_mlps(base, root / "other", seed=1, scale=0.5)
    (root / "data.txt").write_text("\n".join(synthetic_documents("code", 40)) + "\n")
    experts = {"base": ExpertDirectory(base, "base"), "other": ExpertDirectory(other, "other")}
    basis = compute_basis(experts)
    save_file(basis, str(root / "basis.safetensors"))
    return root, experts["other"], basis


def statistics_sha256(gram: torch.Tensor, path: Path) -> str:
    save_file(statistics_tensors(gram), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def float64_reference(expert: ExpertDirectory, basis: dict[str, torch.Tensor], data: DocumentStream) -> torch.Tensor:
    """G as the code before the lean path computed it, in float64 throughout: the whole causal LM (head included),
    the whole basis in memory, every router input captured."""
    model = load_dense_model(expert)
    overwrite_parameters(model, basis)
    layers = model.model.layers
    grams = torch.zeros(len(layers), *(2 * [int(expert.config["hidden_size"]) + 1]), dtype=torch.float64)
    mask = None

    def capture(index: int):
        def hook(_module, _inputs, output):
            x = output.reshape(-1, output.shape[-1])[mask].double()
            augmented = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
            grams[index] += augmented.T @ augmented
        return hook

    handles = [layer.post_attention_layernorm.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    with torch.inference_mode():
        for input_ids, attention_mask in data.batches(4):
            mask = attention_mask.reshape(-1).bool()
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return grams


def test_packed_statistics_from_a_lazy_basis_are_the_bytes_of_the_whole_basis_and_match_float64(member, tmp_path):
    """The lean path (decoder without its head, basis read from blobs straight into the parameters, G packed) gives
    the same bytes whichever way the basis is read, and the G of an all-float64 computation of the whole model
    within float32 products. (The exact bytes depend on the CPU's float32 kernels, so they are not frozen here.)"""
    root, expert, basis = member
    data = DocumentStream(root / "data.txt", load_tokenizer(expert.path), 32)
    # As the node holds it: one blob per tensor, read into the parameters (and looked up only as they are needed).
    blobs = BlobStore(tmp_path / "blobs")
    entries = [tensor_entry(name, tensor, blobs.put_bytes(tensor_bytes(tensor))) for name, tensor in basis.items()]
    lookups = []
    stored = stored_tensors(entries, blobs)
    lazy = LazyTensors(stored, lambda name: lookups.append(name) or stored[name], stored.read_into)
    packed = packed_statistics_under_basis(expert, lazy, data, 4)
    assert packed.shape == (2, 33 * 34 // 2) and packed.dtype == torch.float64
    assert lookups == []  # every basis tensor of the decoder went straight from its blob into its parameter
    # The same bytes from a basis file read a tensor at a time, and from a basis held in memory.
    expected = statistics_sha256(packed, tmp_path / "packed.safetensors")
    with safe_open(root / "basis.safetensors", framework="pt") as handle:
        from_file = packed_statistics_under_basis(expert, LazyTensors(handle.keys(), handle.get_tensor), data, 4)
    assert statistics_sha256(from_file, tmp_path / "file.safetensors") == expected
    full = statistics_under_basis(expert, basis, data, 4)
    assert statistics_sha256(full, tmp_path / "full.safetensors") == expected
    reference = float64_reference(expert, basis, data)
    diagonal = reference.diagonal(dim1=1, dim2=2)
    bound = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])
    assert float(((full - reference).abs() / bound).max()) < 1e-5
    assert token_count(packed) == token_count(full) == token_count(reference) > 0
    check_enough_tokens(packed, "other")
    assert not [name for name, _ in load_decoder(expert).named_parameters() if "lm_head" in name]


# Run as a separate process: statistics with a checkpoint after every batch, written to argv[2].
CHILD = """
import sys
from pathlib import Path
import logging
from safetensors.torch import load_file, save_file
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.statistics import packed_statistics_under_basis, statistics_tensors
from dume.shared.method.statistics_checkpoint import StatisticsCheckpoint
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import stored_tensors, tensor_bytes, tensor_entry
logging.basicConfig(level=logging.INFO)
root, out = Path(sys.argv[1]), Path(sys.argv[2])
expert = ExpertDirectory(root / "other")
data = DocumentStream(root / "long.txt", load_tokenizer(expert.path), 16)
checkpoint = StatisticsCheckpoint(Path(str(out) + ".partial"), "basis-1", every_batches=1)
gram = packed_statistics_under_basis(expert, load_file(root / "basis.safetensors"), data, 1, checkpoint=checkpoint)
save_file(statistics_tensors(gram), str(out))
"""


def saved_batches(path: Path) -> int:
    try:
        with safe_open(path, framework="pt") as handle:
            return int(handle.metadata()["batches"])
    except Exception:  # not written yet, or being replaced
        return 0


@pytest.fixture(scope="module")
def killed_run(member, tmp_path_factory):
    """A statistics run killed with SIGKILL after a few checkpoints: its output path and a copy of its
    checkpoint; plus the uninterrupted run's statistics."""
    root, expert, basis = member
    (root / "long.txt").write_text("\n".join(synthetic_documents("code", 120)) + "\n")
    out = tmp_path_factory.mktemp("killed") / "statistics.safetensors"
    partial = Path(str(out) + ".partial")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(out)], stderr=subprocess.PIPE,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while saved_batches(partial) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    assert not out.exists() and saved_batches(partial) >= 3
    kept = out.parent / "kept.partial"
    shutil.copyfile(partial, kept)
    data = DocumentStream(root / "long.txt", load_tokenizer(expert.path), 16)
    uninterrupted = packed_statistics_under_basis(expert, basis, data, 1)
    return out, kept, uninterrupted


def test_statistics_killed_mid_run_resume_to_the_uninterrupted_bytes(member, killed_run):
    root, _, _ = member
    out, kept, uninterrupted = killed_run
    partial = Path(str(out) + ".partial")
    done = saved_batches(partial)
    resumed = subprocess.run([sys.executable, "-c", CHILD, str(root), str(out)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at batch {done} " in resumed.stderr
    with safe_open(out, framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(name), tensor)
                   for name, tensor in statistics_tensors(uninterrupted).items())
    assert not partial.exists()  # removed on completion


def test_a_checkpoint_from_other_inputs_is_ignored(member, killed_run, tmp_path, caplog):
    root, expert, basis = member
    _, kept, _ = killed_run
    data = DocumentStream(root / "long.txt", load_tokenizer(expert.path), 16)
    # The checkpoint covers batches of 1 row under "basis-1": neither another basis nor another batch size uses it.
    for inputs, batch_size in (("basis-2", 1), ("basis-1", 2)):
        path = tmp_path / f"{inputs}-{batch_size}.partial"
        shutil.copyfile(kept, path)
        with caplog.at_level(logging.WARNING, logger="dume.statistics"):
            gram = packed_statistics_under_basis(expert, basis, data, batch_size,
                                                 checkpoint=StatisticsCheckpoint(path, inputs, every_seconds=3600))
        assert "made from other inputs" in caplog.text
        assert torch.equal(gram, packed_statistics_under_basis(expert, basis, data, batch_size))
        assert not path.exists()
        caplog.clear()


def test_a_checkpoint_the_data_no_longer_reaches_is_refused_and_removed(member, killed_run, tmp_path):
    root, expert, basis = member
    _, kept, _ = killed_run
    data_file = root / "long.txt"
    text, status = data_file.read_text(), data_file.stat()
    path = tmp_path / "rewritten.partial"
    shutil.copyfile(kept, path)
    try:  # rewritten in place to one short document, with the same size and time: only the replay can tell
        first = text.index("\n") + 1
        data_file.write_text(text[:first] + "\n" * (len(text) - first))
        os.utime(data_file, ns=(status.st_atime_ns, status.st_mtime_ns))
        data = DocumentStream(data_file, load_tokenizer(expert.path), 16)
        with pytest.raises(DumeError, match=f"checkpoint {path} does not match the data .*: it was removed"):
            packed_statistics_under_basis(expert, basis, data, 1, checkpoint=StatisticsCheckpoint(path, "basis-1"))
        assert not path.exists()
    finally:
        data_file.write_text(text)
        os.utime(data_file, ns=(status.st_atime_ns, status.st_mtime_ns))
