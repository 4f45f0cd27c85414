"""Router solve memory: the publisher's peak RSS while it solves the routers, as experts and layers grow, for the
solve before this change (``old``: every contribution's full G in memory, summed per expert, then every layer
solved from the whole tensors) and the one the publisher runs now (``new``: one layer at a time), side by side.

Synthetic statistics (a symmetric, diagonally dominant G per layer: the solve's cost does not depend on the values)
of hidden size ``--hidden`` are stored in a blob store as the coordinator stores a node's upload (one F64 blob per
layer's upper triangle), one contribution per expert. For each (path, experts, layers) a child process solves the
routers from them and reports, from ``/proc/self/status``, its resident memory before and its peak during the solve
(the kernel's high-water mark, reset just before). ``new`` calls the publisher's own functions
(``contribution_statistics``, ``sum_contributions``, ``solve_for_checkpoint``); ``old`` is the previous code, kept
here. ``merge`` is ``dume merge``'s way: each contribution's packed statistics (here generated, standing for
the statistics it computes) spilled to disk before the next, then the same layer-by-layer solve from the files.
Every path gives the same routers (the script checks their bytes).

    python benchmarks/solve_memory.py [--hidden 4096] [--experts 4] [--layers 1 2 4] [--paths old new merge]

Prints a table and the growth per layer, and writes ``benchmarks/results/solve_memory.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dume.coordinator.publication import contribution_statistics
from dume.coordinator.records import Contribution
from dume.shared.lab.memory import memory
from dume.shared.method.ridge import solve_routers
from dume.shared.method.routers import MergeSettings, solve_for_checkpoint, sum_contributions
from dume.shared.method.statistics import gram_from_tensors, layer_name, triangle_size
from dume.shared.method.statistics_spill import spill_contribution
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import tensor_from_bytes, tensor_view
from dume.v1 import tensors_pb2

MIB = 1 << 20
TOKENS = 1_000_000  # the count in each contribution's corner


def synthetic_triangle(hidden: int, seed: int) -> torch.Tensor:
    """One layer's packed G: small random off-diagonal entries, a diagonal that dominates them (so the system is
    positive definite), the count in the corner."""
    size = hidden + 1
    triangle = torch.rand(triangle_size(hidden), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    triangle *= 1e-3
    rows = torch.arange(size)
    triangle[rows * size - rows * (rows - 1) // 2] += 10.0  # each row starts at its diagonal entry
    triangle[-1] = TOKENS
    return triangle


def store_statistics(blobs: BlobStore, hidden: int, experts: int, layers: int) -> list[dict]:
    """One contribution per expert, each layer's triangle a blob, as the coordinator keeps an upload."""
    records = []
    for expert in range(experts):
        entries = []
        for layer in range(layers):
            triangle = synthetic_triangle(hidden, expert * 1000 + layer)
            entries.append({"name": layer_name(layer), "dtype": "F64", "shape": list(triangle.shape),
                            "sha256": blobs.put_bytes(tensor_view(triangle)), "size_bytes": triangle.nbytes})
        records.append({"expert": f"e{expert}", "node": f"n{expert}", "dataset": "data", "tensors": entries,
                        "seeds": [expert * 1000 + layer for layer in range(layers)]})
    return records


def old_solve(records: list[dict], blobs: BlobStore, hidden: int, settings) -> list:
    """The solve before this change: each contribution read whole into a full (layers, d+1, d+1) G, summed per
    expert, then every layer solved from the whole tensors (``solve_routers``)."""
    statistics = {}
    for record in sorted(records, key=lambda record: (record["expert"], record["node"], record["dataset"])):
        entries = [tensors_pb2.TensorEntry(**entry) for entry in record["tensors"]]
        gram = gram_from_tensors({entry.name: tensor_from_bytes(entry, blobs.read_bytes(entry.sha256))
                                  for entry in entries}, hidden).to(torch.float64)
        total = statistics.get(record["expert"])
        if total is None:
            statistics[record["expert"]] = gram.clone()
        else:
            total += gram
        del gram
    return solve_routers(statistics, settings.rho, settings.router_bias, settings.normalize, settings.temperature)


def new_solve(records: list[dict], blobs: BlobStore, settings) -> list:
    """The publisher's solve: its own functions, one layer at a time."""
    contributions = [Contribution(record["node"], record["dataset"], record["expert"], "", "", TOKENS,
                                  tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorEntry(**entry)
                                                                      for entry in record["tensors"]]))
                     for record in records]
    statistics = {name: sum_contributions(contribution_statistics(c, blobs) for c in contributions if c.expert == name)
                  for name in sorted({c.expert for c in contributions})}
    return solve_for_checkpoint(statistics, settings, "").routers


def merge_solve(records: list[dict], hidden: int, spill: Path, settings) -> list:
    """``dume merge``'s solve: each contribution's packed statistics computed (here: generated) whole, spilled to
    disk and dropped before the next, then solved one layer at a time from the spilled files."""
    contributions = []
    for record in records:
        packed = torch.empty(len(record["seeds"]), triangle_size(hidden), dtype=torch.float64)  # as collected
        for layer, seed in enumerate(record["seeds"]):
            packed[layer] = synthetic_triangle(hidden, seed)
        contributions.append(spill_contribution(spill, record["node"], record["dataset"], packed))
        del packed
    statistics = {record["expert"]: sum_contributions([contribution])
                  for record, contribution in zip(records, contributions, strict=True)}
    return solve_for_checkpoint(statistics, settings, "").routers


def solve(path: str, store: Path, records_file: Path) -> dict:
    """In the child: one solve; its memory in MiB, its time and a digest of the routers' bytes."""
    stored, blobs, settings = json.loads(records_file.read_text()), BlobStore(store), MergeSettings()
    hidden, records = stored["hidden"], stored["contributions"]
    torch.zeros(1) @ torch.zeros(1)  # torch's own start-up allocations belong to "before"
    before = memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    if path == "old":
        routers = old_solve(records, blobs, hidden, settings)
    elif path == "new":
        routers = new_solve(records, blobs, settings)
    else:
        (store.parent / "spill").mkdir()
        routers = merge_solve(records, hidden, store.parent / "spill", settings)
    seconds = time.perf_counter() - started
    during = memory()
    digest = hashlib.sha256()
    for router in routers:
        digest.update(tensor_view(router.weight))
        digest.update(repr(router.ridge_lambda).encode())
    return {"before_mib": round(before["VmRSS"]), "peak_mib": round(during["VmHWM"]),
            "seconds": round(seconds, 2), "routers_sha256": digest.hexdigest()}


def run_child(path: str, store: Path, records_file: Path) -> dict:
    child = subprocess.run([sys.executable, __file__, "--child", path, str(store), str(records_file)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if child.returncode:
        raise SystemExit(child.stderr)
    return json.loads(child.stdout.splitlines()[-1])


def growth_per_layer(rows: list[dict], path: str) -> float | None:
    """The peak's growth per layer between the fewest and the most layers measured for ``path``."""
    measured = sorted((row["layers"], row["peak_growth_mib"]) for row in rows if row["path"] == path)
    if len(measured) < 2 or measured[-1][0] == measured[0][0]:
        return None
    return round((measured[-1][1] - measured[0][1]) / (measured[-1][0] - measured[0][0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--paths", nargs="+", choices=["old", "new", "merge"], default=["old", "new", "merge"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/solve_memory.json"))
    parser.add_argument("--child", nargs=3, metavar=("PATH", "STORE", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(solve(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    layer_mib = triangle_size(args.hidden) * 8 / MIB
    rows = []
    print(f"hidden {args.hidden}, {args.experts} experts (one contribution each), {layer_mib:.0f} MiB of packed "
          f"statistics per contribution and layer ({2 * layer_mib:.0f} MiB as a full matrix)")
    print("path  layers  before MiB  peak MiB  growth MiB  seconds")
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="dume-solve-") as scratch:
            root = Path(scratch)
            blobs = BlobStore(root / "blobs")
            records = store_statistics(blobs, args.hidden, args.experts, layers)
            (root / "records.json").write_text(json.dumps({"hidden": args.hidden, "contributions": records}))
            digests = set()
            for path in args.paths:
                measured = run_child(path, blobs.root, root / "records.json")
                digests.add(measured.pop("routers_sha256"))
                row = {"path": path, "experts": args.experts, "layers": layers, **measured,
                       "peak_growth_mib": measured["peak_mib"] - measured["before_mib"]}
                rows.append(row)
                print(f"{path:5} {layers:6} {row['before_mib']:11} {row['peak_mib']:9} {row['peak_growth_mib']:11} "
                      f"{row['seconds']:8}")
            if len(digests) != 1:
                raise SystemExit(f"the paths gave different routers at {layers} layers")
    growth = {path: growth_per_layer(rows, path) for path in args.paths}
    for path, per_layer in growth.items():
        if per_layer is not None:
            print(f"{path}: peak grows by {per_layer} MiB per layer")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": 1},
              "hidden": args.hidden, "experts": args.experts, "packed_layer_mib": round(layer_mib),
              "rows": rows, "growth_per_layer_mib": growth}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
