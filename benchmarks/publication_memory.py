"""Publication memory: the coordinator's peak RSS while it writes a version, next to the model's size.

Two members with the same model (a Llama with few layers and a large hidden size, built here, of about
``--size-mib``) are stored in a blob store as the coordinator stores uploads; a child process then publishes a
version from them exactly as the publisher does (``write_moe_checkpoint`` into the blob store, tensors read from
the members' blobs) and reports, from ``/proc/self/status``, its resident memory before, its peak during the
publication (the kernel's high-water mark, reset just before) and what it still holds after. Statistics are left
out (random routers): they are the router solve's memory, not the writer's.

    python benchmarks/publication_memory.py [--size-mib 512]

Prints the numbers and writes ``benchmarks/results/publication_memory.json``.
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
from dume.shared.transport.blobs import BlobStore, read_range
from dume.shared.transport.wire import safetensors_ranges

from transfer_throughput import build_model

MIB = 1 << 20
MEMBERS = ("alpha", "beta")


def store_model(model_dir: Path, blobs: BlobStore) -> dict:
    """The model's tensors and files put into the store as an upload's are; returns its ledger-like record."""
    tensors = []
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, where in safetensors_ranges(path).items():
            sha256 = blobs.put_bytes(b"".join(read_range(path, where.start, where.size)))
            tensors.append({"name": name, "dtype": where.dtype, "shape": list(where.shape), "sha256": sha256,
                            "size_bytes": where.size})
    files = {path.name: blobs.put_bytes(path.read_bytes()) for path in model_dir.iterdir()
             if path.is_file() and path.suffix != ".safetensors"}
    return {"tensors": tensors, "files": files}


def publish(store: Path, record: dict) -> dict:
    """In the child: one publication from the stored members; its memory, in MiB."""
    from dume.coordinator import publication
    from dume.coordinator.records import Member
    from dume.shared.method.ridge import LayerRouter
    from dume.shared.method.writer import write_moe_checkpoint
    from dume.v1 import tensors_pb2

    blobs = BlobStore(store)
    manifest = tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorEntry(**entry) for entry in record["tensors"]])
    members = {name: publication.StoredMember(Member(name, "active", None, "", manifest, record["files"]), blobs)
               for name in MEMBERS}
    first = members[MEMBERS[0]]
    hidden = int(first.config["hidden_size"])
    routers = [LayerRouter(MEMBERS, torch.randn(len(MEMBERS), hidden, dtype=torch.float64), None, 1.0)
               for _ in range(first.num_layers)]
    before = memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    sink = publication.BlobSink(blobs)
    write_moe_checkpoint(sink, members, routers, 1, {"members": list(MEMBERS)})
    seconds = time.perf_counter() - started
    during = memory()
    del sink, members
    if hasattr(publication, "give_memory_back"):
        publication.give_memory_back()
    return {"before_mib": round(before["VmRSS"]), "peak_mib": round(during["VmHWM"]),
            "after_mib": round(memory()["VmRSS"]), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="about how large the model is")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/publication_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("STORE", "RECORD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(publish(Path(args.child[0]), json.loads(Path(args.child[1]).read_text()))))
        return
    with tempfile.TemporaryDirectory(prefix="dume-publication-") as scratch:
        root = Path(scratch)
        model_dir = build_model(root / "model", args.size_mib)
        blobs = BlobStore(root / "blobs")
        record = store_model(model_dir, blobs)
        (root / "record.json").write_text(json.dumps(record))
        model_bytes = sum(entry["size_bytes"] for entry in record["tensors"])
        largest = max(entry["size_bytes"] for entry in record["tensors"])
        child = subprocess.run([sys.executable, __file__, "--child", str(blobs.root), str(root / "record.json")],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if child.returncode:
            raise SystemExit(child.stderr)
        measured = json.loads(child.stdout.splitlines()[-1])
    grown = measured["peak_mib"] - measured["before_mib"]
    print(f"model {model_bytes / MIB:.0f} MiB (largest tensor {largest / MIB:.0f} MiB), {len(MEMBERS)} members")
    print(f"publication: RSS {measured['before_mib']} MiB before, peak {measured['peak_mib']} MiB "
          f"(+{grown} MiB, {grown * MIB / model_bytes:.2f} of the model, {grown * MIB / largest:.1f} largest "
          f"tensors), {measured['after_mib']} MiB after; {measured['seconds']} s")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "members": len(MEMBERS), "model_mib": round(model_bytes / MIB),
              "largest_tensor_mib": round(largest / MIB),
              **measured, "peak_growth_mib": grown}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
