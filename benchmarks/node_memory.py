"""Node memory for statistics: the peak RSS of a node's statistics step, old path against new, next to the target.

A Llama of the 8B shape (hidden 4096, intermediate 14336, vocabulary 128256, untied head) with a few layers is
built here with random bfloat16 weights, with a basis of its shared tensors stored as the node's blob cache
stores it. Each path then runs in a child
process, as ``Agent.contribute_statistics`` runs it: hash the basis, compute the statistics of one small batch
under it, write the statistics file. The child reports its resident memory before (after imports) and its peak
(the kernel's high-water mark, ``VmHWM``).

* ``old``: the code before this change, kept here: the whole causal LM loaded (LM head included), the whole basis
  held in memory beside it and copied in, a full (d+1)^2 float64 accumulator per layer, then stacked, packed and
  mirrored.
* ``new``: ``packed_statistics_under_basis`` as the node calls it: the decoder without its head, the basis read a
  tensor at a time into the parameters (``LazyTensors``), G accumulated and kept as the packed float64 triangle.

The target (issue 10) is a peak of at most the model's size on disk plus the packed statistics plus 1 GiB.

    python benchmarks/node_memory.py [--layers 1 2]

Prints the numbers and writes ``benchmarks/results/node_memory.json``. Peak memory stays under ~7 GiB at 2 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dume.shared.lab.memory import memory

MIB = 1 << 20
GIB = 1 << 30
SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
TOKENS = 64  # one batch of 2 rows of 32 tokens: enough to exercise every step, cheap on a CPU in bfloat16


# -- the model, built a shard at a time ---------------------------------------------------------------------------
def build_model(root: Path, max_layers: int) -> Path:
    """Random bfloat16 weights of the 8B shape, one safetensors file per layer (and one each for the embeddings
    and the head), so that models of fewer layers are directories of links to the same files."""
    from safetensors.torch import save_file

    shards = root / "shards"
    shards.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    hidden, inter, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * 128
    save_file({"model.embed_tokens.weight": random(SHAPE["vocab_size"], hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}, str(shards / "embed.safetensors"))
    save_file({"lm_head.weight": random(SHAPE["vocab_size"], hidden)}, str(shards / "head.safetensors"))
    for layer in range(max_layers):
        prefix = f"model.layers.{layer}"
        save_file({f"{prefix}.self_attn.q_proj.weight": random(hidden, hidden),
                   f"{prefix}.self_attn.k_proj.weight": random(kv, hidden),
                   f"{prefix}.self_attn.v_proj.weight": random(kv, hidden),
                   f"{prefix}.self_attn.o_proj.weight": random(hidden, hidden),
                   f"{prefix}.mlp.gate_proj.weight": random(inter, hidden),
                   f"{prefix}.mlp.up_proj.weight": random(inter, hidden),
                   f"{prefix}.mlp.down_proj.weight": random(hidden, inter),
                   f"{prefix}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)},
                  str(shards / f"layer{layer}.safetensors"))
    return shards


def model_with_layers(root: Path, shards: Path, layers: int) -> Path:
    """A Hugging Face directory of the first ``layers`` layers (links to the shards) and its basis as the node's
    blob cache holds it (a copy of the shared tensors, slightly moved, as a federation's average would be): one
    blob per tensor, and the manifest ``basis-<layers>.json`` of their entries."""
    from google.protobuf import json_format
    from safetensors import safe_open
    from transformers import LlamaConfig

    from dume.shared.transport.blobs import BlobStore
    from dume.shared.transport.wire import tensor_entry, tensor_view

    out = root / f"model-{layers}"
    out.mkdir()
    files = ["embed.safetensors", "head.safetensors", *(f"layer{layer}.safetensors" for layer in range(layers))]
    weight_map = {}
    for file in files:
        (out / file).symlink_to(shards / file)
        with safe_open(shards / file, framework="pt") as handle:
            weight_map.update({name: file for name in handle.keys()})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE).save_pretrained(out)
    blobs, entries = BlobStore(root / "blobs"), []
    for file in files:
        with safe_open(shards / file, framework="pt") as handle:
            for name in handle.keys():
                if ".mlp." not in name:
                    tensor = handle.get_tensor(name) * 1.01
                    entries.append(json_format.MessageToDict(tensor_entry(name, tensor, blobs.put_bytes(
                        tensor_view(tensor)))))
    (root / f"basis-{layers}.json").write_text(json.dumps(entries))
    return out


def basis_entries(manifest: Path) -> list:
    from google.protobuf import json_format

    from dume.v1 import tensors_pb2

    return [json_format.ParseDict(entry, tensors_pb2.TensorEntry()) for entry in json.loads(manifest.read_text())]


# -- the paths ------------------------------------------------------------------------------------------------------
def old_statistics(model_dir: Path, manifest: Path, out: Path) -> None:
    """The node's statistics step before this change (copied from commit 87f5d37: agent, statistics, expert)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from dume.shared.method.averaging import tensors_hash
    from dume.shared.method.expert import overwrite_parameters
    from dume.shared.method.statistics import from_upper_triangle, statistics_tensors, upper_triangle
    from dume.shared.transport.blobs import BlobStore
    from dume.shared.transport.wire import tensor_from_bytes

    cache = BlobStore(manifest.parent / "blobs")  # the agent built every basis tensor from its blob, and kept them
    basis = {e.name: tensor_from_bytes(e, cache.read_bytes(e.sha256)) for e in basis_entries(manifest)}
    tensors_hash(basis)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype="auto").eval()
    overwrite_parameters(model, basis)
    layers, hidden = model.model.layers, model.config.hidden_size
    grams = [torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64) for _ in layers]

    def hook(index: int):
        def add(_module, _inputs, output):
            x = output.reshape(-1, hidden)
            features, block = x.to(torch.float32), -(-hidden // 4)
            for start in range(0, hidden, block):
                stop = min(start + block, hidden)
                grams[index][start:stop, start:hidden] += (features[:, start:stop].T @ features[:, start:]).to(
                    torch.float64)
            grams[index][:hidden, hidden] += x.sum(dim=0, dtype=torch.float64)
            grams[index][hidden, hidden] += len(x)

        return add

    for index, layer in enumerate(layers):
        layer.post_attention_layernorm.register_forward_hook(hook(index))
    with torch.inference_mode():
        model.model(input_ids=batch(), use_cache=False)
    gram = torch.stack(grams)
    gram = from_upper_triangle(upper_triangle(gram), hidden + 1)
    del model
    save_file(statistics_tensors(gram), str(out))


def new_statistics(model_dir: Path, manifest: Path, out: Path) -> None:
    """The node's statistics step now: a lazy basis, the decoder alone, the packed accumulator."""
    from safetensors.torch import save_file

    from dume.shared.method.averaging import tensors_hash
    from dume.shared.method.data import PackedData
    from dume.shared.method.expert import ExpertDirectory
    from dume.shared.method.statistics import packed_statistics_under_basis, statistics_tensors
    from dume.shared.transport.blobs import BlobStore
    from dume.shared.transport.wire import stored_tensors

    ids = batch()
    basis = stored_tensors(basis_entries(manifest), BlobStore(manifest.parent / "blobs"))
    tensors_hash(basis)
    packed = packed_statistics_under_basis(ExpertDirectory(model_dir), basis, PackedData(ids, torch.ones_like(ids)),
                                           len(ids))
    save_file(statistics_tensors(packed), str(out))


def batch() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, TOKENS // 2), generator=torch.Generator().manual_seed(1))


def child(path: str, model_dir: Path, manifest: Path, out: Path) -> dict:
    import transformers  # noqa: F401

    import dume.shared.method.statistics  # noqa: F401  (imports, torch and transformers, before "before")

    before = memory()
    started = time.perf_counter()
    (old_statistics if path == "old" else new_statistics)(model_dir, manifest, out)
    return {"before_mib": round(before["VmRSS"]), "peak_mib": round(memory()["VmHWM"]),
            "seconds": round(time.perf_counter() - started, 1)}


def run_child(path: str, model_dir: Path, manifest: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", path, str(model_dir), str(manifest), str(out)],
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="layer counts to measure")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/node_memory.json"))
    parser.add_argument("--child", nargs=4, metavar=("PATH", "MODEL", "BASIS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, model_dir, manifest, out = args.child
        print(json.dumps(child(path, Path(model_dir), Path(manifest), Path(out))))
        return
    from dume.shared.method.statistics import triangle_size

    rows = []
    with tempfile.TemporaryDirectory(prefix="dume-node-memory-") as scratch:
        root = Path(scratch)
        shards = build_model(root, max(args.layers))
        for layers in sorted(args.layers):
            model_dir = model_with_layers(root, shards, layers)
            model_bytes = sum((model_dir / file).stat().st_size for file in os.listdir(model_dir)
                              if file.endswith(".safetensors"))
            packed_bytes = layers * triangle_size(SHAPE["hidden_size"]) * 8
            target_mib = (model_bytes + packed_bytes + GIB) / MIB
            row = {"layers": layers, "model_mib": round(model_bytes / MIB), "packed_statistics_mib":
                   round(packed_bytes / MIB), "target_mib": round(target_mib)}
            outputs = {}
            for path in ("old", "new"):
                outputs[path] = root / f"{path}-{layers}.safetensors"
                measured = run_child(path, model_dir, root / f"basis-{layers}.json", outputs[path])
                row[path] = {**measured, "peak_over_target": round(measured["peak_mib"] / target_mib, 3)}
                print(f"{layers} layer(s), {path}: peak {measured['peak_mib']} MiB (before {measured['before_mib']}),"
                      f" {row[path]['peak_over_target']:.2f} of the target {target_mib:.0f} MiB "
                      f"(model {model_bytes / MIB:.0f} + statistics {packed_bytes / MIB:.0f} + 1024); "
                      f"{measured['seconds']} s")
            row["same_statistics_bytes"] = outputs["old"].read_bytes() == outputs["new"].read_bytes()
            rows.append(row)
            for file in outputs.values():
                file.unlink()
    if len(rows) > 1:
        span = rows[-1]["layers"] - rows[0]["layers"]
        for path in ("old", "new"):
            growth = (rows[-1][path]["peak_mib"] - rows[0][path]["peak_mib"]) / span
            print(f"{path}: peak grows {growth:.0f} MiB per layer (a layer's weights: "
                  f"{(rows[-1]['model_mib'] - rows[0]['model_mib']) / span:.0f} MiB)")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "shape": SHAPE, "tokens": TOKENS, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
