"""The transfer path's promises: a fetched shard is byte for byte the file ``dume merge`` writes although it is
assembled from blobs without rebuilding a tensor; a blob is hashed and checked as it arrives, so bytes a crash
spoiled in a partial blob are caught on completion and never adopted, and a model holding NaN is still refused.

The coordinator runs in process on a real state directory (real ledger, staging files and blob store).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.coordinator.errors import Refused
from dume.node.agent import model_upload
from dume.shared.method.shard_layout import SHARD_METADATA
from dume.shared.method.writer import save_shard
from dume.shared.transport.blobs import BlobStore, read_range
from dume.shared.transport.download import write_shard_from_blobs
from dume.shared.transport.wire import tensor_bytes, tensor_entry
from dume.v1 import tensors_pb2

from in_process import enrolled


def test_a_shard_assembled_from_blobs_is_the_file_safetensors_writes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.experts.1.w2.weight": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.w2.weight": torch.randn(3, 5, generator=generator).to(torch.float16),
        "model.layers.0.mlp.gate.weight": torch.randn(2, 7, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.randn(7, generator=generator).to(torch.float64),
        "model.layers.0.empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(3, generator=generator).to(torch.bfloat16),
    }
    blobs = BlobStore(tmp_path / "blobs")
    entries = []
    for name, tensor in tensors.items():
        blobs.put_bytes(tensor_bytes(tensor))
        entries.append(tensor_entry(name, tensor))
    save_file(tensors, str(tmp_path / "saved.safetensors"), metadata=SHARD_METADATA)  # the library's own bytes
    save_shard(tmp_path / "shard.safetensors", tensors)  # a merge's shards, written a tensor at a time
    write_shard_from_blobs(tmp_path / "assembled.safetensors", tensors_pb2.TensorManifest(tensors=entries), blobs)
    assert (tmp_path / "assembled.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()
    assert (tmp_path / "shard.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()


def test_a_partial_blob_spoiled_on_disk_is_discarded_on_completion_and_sent_again(coordinator, expert_factory):
    spec = expert_factory("llama")["code"]
    identity = enrolled(coordinator, "code")
    upload = model_upload(spec.model_dir, "code")
    planned = coordinator.begin_upload("code", upload.plan)
    sha256 = max(upload.sources, key=lambda sha: upload.sources[sha].size)
    where = upload.sources[sha256]
    half = where.size // 2
    with coordinator.uploads.receiving() as receiver:  # a stream that ends halfway through the blob
        receiver.write(planned, sha256, 0, next(read_range(where.path, where.start, half)))
    assert coordinator.uploads.held(planned)[sha256] == half
    part = coordinator.uploads.part_path(planned, sha256)
    spoiled = bytearray(part.read_bytes())
    spoiled[half // 2] ^= 0xFF  # what a power cut can leave: the size kept, a byte not
    part.write_bytes(bytes(spoiled))

    rest = next(read_range(where.path, where.start + half, where.size - half))
    with pytest.raises(Refused, match="does not match its SHA-256"):
        coordinator.uploads.write(planned, sha256, half, rest)
    assert coordinator.uploads.held(planned)[sha256] == 0 and not part.exists()

    for sha, offset in coordinator.uploads.held(planned).items():  # the node resumes: everything missing, whole
        source = upload.sources[sha]
        with coordinator.uploads.receiving() as receiver:
            for data in read_range(source.path, source.start + offset, source.size - offset):
                receiver.write(planned, sha, offset, data)
                offset += len(data)
    coordinator.commit_upload(identity, planned.upload_id)
    assert coordinator.blobs.read_bytes(sha256) == next(read_range(where.path, where.start, where.size))


def test_a_model_holding_nan_is_refused_although_nothing_reads_it_again(coordinator, expert_factory, tmp_path):
    spec = expert_factory("llama")["math"]
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for file in spec.model_dir.iterdir():
        (poisoned / file.name).write_bytes(file.read_bytes())
    weights = load_file(poisoned / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][3, 2] = float("inf")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    identity = enrolled(coordinator, "math")
    upload = model_upload(poisoned, "math")
    planned = coordinator.begin_upload("math", upload.plan)
    with coordinator.uploads.receiving() as receiver:
        for sha, offset in coordinator.uploads.held(planned).items():
            source = upload.sources[sha]
            for data in read_range(source.path, source.start + offset, source.size - offset, chunk_bytes=1000):
                receiver.write(planned, sha, offset, data)  # chunks that split values: the check must carry over
                offset += len(data)
    with pytest.raises(Refused, match=f"tensor {name} holds NaN or infinite values"):
        coordinator.commit_upload(identity, planned.upload_id)
    assert coordinator.ledger.member("math").model is None
