"""A whole publication at 8B scale: the coordinator's peak RSS and time per layer while it publishes a version of
an ``--experts``-member federation of hidden size 4096 (Llama-3-8B's), as the publisher does it.

Each member is an 8B-shaped Llama (hidden 4096, 32 query and 8 key-value heads of 128, bfloat16) with random
weights made here, distinct per member, and one contribution of synthetic statistics (a diagonally dominant G per
layer, 64 MiB packed), all stored in a blob store as the coordinator stores uploads. What is scaled down to fit
this VM's disk: the layer count (``--layers``, 32 in Llama-3-8B), the MLP (``--intermediate``, 14336 in
Llama-3-8B) and the vocabulary (the byte tokenizer's, 128256 in Llama-3-8B: the embeddings and LM head are
averaged a block of rows at a time; ``--vocab 128256`` measures them); hidden size, heads and members are the real ones.

A child process (torch's default threads, as the daemon runs) then does what ``publish_if_due`` does once the
ledger is read: the basis over the members averaged, stored and hashed (``refresh_basis``, when membership
changed), the routers solved from every contribution's blobs (``contribution_statistics``,
``sum_contributions``, ``solve_for_checkpoint``), the checkpoint written into the blob store
(``BlobSink``, ``write_moe_checkpoint``: the basis averaged, every expert's MLP copied), the memory handed back.
It reports its resident memory before, the peak during (``VmHWM``, reset just before) and after, and the time of
the basis, the solve and the write. Everything is written under a temporary directory and deleted.

    python benchmarks/publication_scale.py [--experts 8] [--layers 2 4] [--intermediate 1024]

Prints a table and writes ``benchmarks/results/publication_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from solve_memory import store_statistics

from dume.shared.lab.memory import memory
from dume.shared.lab.tiny import build_tiny_model
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import tensor_view

MIB = 1 << 20
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128


def shape_of(name: str, vocab: int, intermediate: int) -> list[int]:
    """The 8B shape of a Llama tensor, from its name."""
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return [vocab, HIDDEN]
    if name.endswith("norm.weight"):
        return [HIDDEN]
    projection = name.split(".")[-2]
    return {"q_proj": [HEADS * HEAD_DIM, HIDDEN], "k_proj": [KV_HEADS * HEAD_DIM, HIDDEN],
            "v_proj": [KV_HEADS * HEAD_DIM, HIDDEN], "o_proj": [HIDDEN, HEADS * HEAD_DIM],
            "gate_proj": [intermediate, HIDDEN], "up_proj": [intermediate, HIDDEN],
            "down_proj": [HIDDEN, intermediate]}[projection]


def store_members(blobs: BlobStore, root: Path, experts: int, layers: int, intermediate: int,
                  vocab: int | None) -> list[dict]:
    """``experts`` distinct 8B-shaped members (scaled as said above) in the store; their ledger-like records."""
    from safetensors import safe_open

    tiny = build_tiny_model("llama", root / "tiny", num_hidden_layers=layers)
    config = json.loads((tiny / "config.json").read_text())
    vocab = vocab or int(config["vocab_size"])
    config.update(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=intermediate, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, torch_dtype="bfloat16", dtype="bfloat16")
    files = {path.name: blobs.put_bytes(path.read_bytes()) for path in tiny.iterdir()
             if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json"}
    files["config.json"] = blobs.put_bytes(json.dumps(config).encode())
    with safe_open(str(tiny / "model.safetensors"), "pt") as handle:
        names = sorted(handle.keys())
    shutil.rmtree(tiny)
    records = []
    for expert in range(experts):
        generator = torch.Generator().manual_seed(expert)
        tensors = []
        for name in names:
            shape = shape_of(name, vocab, intermediate)
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            tensors.append({"name": name, "dtype": "BF16", "shape": shape,
                            "sha256": blobs.put_bytes(tensor_view(tensor)), "size_bytes": tensor.nbytes})
        records.append({"name": f"e{expert}", "tensors": tensors, "files": files})
    return records


def publish(store: Path, stored: dict) -> dict:
    """In the child: one publication as the publisher makes it; its memory in MiB and its times."""
    from dume.coordinator import publication
    from dume.coordinator.records import Contribution, Member
    from dume.shared.method.averaging import lazy_basis, tensors_hash
    from dume.shared.method.routers import MergeSettings, solve_for_checkpoint, sum_contributions
    from dume.shared.method.writer import write_moe_checkpoint
    from dume.shared.transport.wire import stored_tensors
    from dume.v1 import tensors_pb2

    def manifest(entries: list[dict]) -> tensors_pb2.TensorManifest:
        return tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorEntry(**entry) for entry in entries])

    blobs = BlobStore(store)
    torch.zeros(1) @ torch.zeros(1)  # torch's own start-up allocations belong to "before"
    before = memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    members = {record["name"]: publication.StoredMember(
        Member(record["name"], "active", None, "", manifest(record["tensors"]), record["files"]), blobs)
        for record in stored["members"]}
    # The basis over the members, as refresh_basis makes it when membership changed: averaged, stored, hashed.
    basis = publication.manifest_into(blobs, lazy_basis(members))
    tensors_hash(stored_tensors(basis.tensors, blobs))
    basis_seconds = time.perf_counter() - started
    contributions = [Contribution(record["node"], record["dataset"], record["expert"], "", "", 1,
                                  manifest(record["tensors"])) for record in stored["statistics"]]
    statistics = {name: sum_contributions(publication.contribution_statistics(c, blobs)
                                          for c in contributions if c.expert == name) for name in sorted(members)}
    solved = solve_for_checkpoint(statistics, MergeSettings(), "basis")
    del statistics
    solve_seconds = time.perf_counter() - started - basis_seconds
    sink = publication.BlobSink(blobs)
    write_moe_checkpoint(sink, members, solved.routers, solved.top_k, solved.dume_block)
    seconds = time.perf_counter() - started
    peak = memory()["VmHWM"]
    written = sum(file.size_bytes or sum(entry.size_bytes for entry in file.shard.tensors) for file in sink.files)
    del sink, members, solved
    publication.give_memory_back()
    return {"before_mib": round(before["VmRSS"]), "peak_mib": round(peak), "after_mib": round(memory()["VmRSS"]),
            "basis_seconds": round(basis_seconds, 2), "solve_seconds": round(solve_seconds, 2),
            "write_seconds": round(seconds - basis_seconds - solve_seconds, 2),
            "seconds": round(seconds, 2), "written_mib": round(written / MIB), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=None, help="the embeddings' rows (the byte tokenizer's)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the stores go (a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/publication_scale.json"))
    parser.add_argument("--child", nargs=2, metavar=("STORE", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(publish(Path(args.child[0]), json.loads(Path(args.child[1]).read_text()))))
        return
    rows = []
    print(f"hidden {HIDDEN}, intermediate {args.intermediate}, bfloat16 members, 64 MiB of statistics per layer "
          "and member")
    print("experts layers  stored MiB  before MiB  peak MiB  growth  basis s  solve s  write s  s/layer  written MiB")
    for experts in args.experts:
        for layers in args.layers:
            with tempfile.TemporaryDirectory(prefix="dume-publication-scale-", dir=args.scratch) as scratch:
                root = Path(scratch)
                blobs = BlobStore(root / "blobs")
                members = store_members(blobs, root, experts, layers, args.intermediate, args.vocab)
                statistics = store_statistics(blobs, HIDDEN, experts, layers)
                stored_bytes = sum(path.stat().st_size for path in blobs.root.rglob("*") if path.is_file())
                (root / "records.json").write_text(json.dumps({"members": members, "statistics": statistics}))
                child = subprocess.run([sys.executable, __file__, "--child", str(blobs.root),
                                        str(root / "records.json")], capture_output=True, text=True)
                if child.returncode:
                    raise SystemExit(child.stderr)
                measured = json.loads(child.stdout.splitlines()[-1])
            row = {"experts": experts, "layers": layers, "intermediate": args.intermediate, "vocab": args.vocab,
                   "stored_mib": round(stored_bytes / MIB), **measured,
                   "peak_growth_mib": measured["peak_mib"] - measured["before_mib"],
                   "seconds_per_layer": round(measured["seconds"] / layers, 2)}
            rows.append(row)
            print(f"{experts:7} {layers:6} {row['stored_mib']:11} {row['before_mib']:11} {row['peak_mib']:9} "
                  f"{row['peak_growth_mib']:7} {row['basis_seconds']:8} {row['solve_seconds']:8} "
                  f"{row['write_seconds']:8} {row['seconds_per_layer']:8} {row['written_mib']:12}")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "hidden": HIDDEN, "heads": [HEADS, KV_HEADS, HEAD_DIM], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
