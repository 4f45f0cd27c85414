"""Statistics validation: the time per layer and the peak memory of the coordinator's checks on one uploaded set of
statistics (count, non-negative diagonal, Cauchy-Schwarz, the norm bound, positive definiteness with the ridge),
before this change (``old``: each layer's blob read whole as bytes, copied, mirrored into a full (d+1)^2 matrix,
checked against a full bound matrix, factorised from ``G + lambda I`` built beside it) and now (``new``: each
layer's packed triangle read straight into a tensor and checked in place, a block of rows at a time, the one full
matrix being the Cholesky factor's), side by side.

Synthetic statistics (a symmetric, diagonally dominant G per layer that passes every check) of hidden size
``--hidden`` are stored as the coordinator stages a statistics upload (one F64 blob per layer's upper triangle).
For each path a child process runs the checks over ``--layers`` layers and reports, from ``/proc/self/status``, its
resident memory before and its peak during them (the kernel's high-water mark, reset just before). ``new`` is the
daemon's way (its blobs were found finite as they arrived, so that is not checked again); ``new-unmarked`` also
checks finiteness, in memory, as for a blob the store already held.

    python benchmarks/statistics_validation.py [--hidden 4096] [--layers 1 4] [--threads 1]

Prints a table and writes ``benchmarks/results/statistics_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from solve_memory import TOKENS, synthetic_triangle

from dume.coordinator import validation
from dume.shared.errors import DumeError
from dume.shared.lab.memory import memory
from dume.shared.method.routers import MergeSettings
from dume.shared.method.statistics import exceeds_norm_bound, from_upper_triangle, layer_index, layer_name
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import tensor_from_bytes, tensor_view
from dume.v1 import tensors_pb2

MIB = 1 << 20
PATHS = ("old", "new", "new-unmarked")


def old_check_statistics(header, manifest, config, norm_weight, settings, blob_path) -> None:
    """The checks before this change, kept here as they were (the layout and basis checks left out: unchanged)."""
    hidden = int(config["hidden_size"])
    for entry in manifest.tensors:
        validation.check_finite(entry, blob_path(entry.sha256))
        gram = from_upper_triangle(tensor_from_bytes(entry, blob_path(entry.sha256).read_bytes())[None], hidden + 1)[0]
        diagonal = gram.diagonal()
        if bool((diagonal < 0).any()):
            raise DumeError("negative diagonal")
        if float(gram[-1, -1]) != float(header.token_count):
            raise DumeError("count")
        bound = torch.sqrt(torch.outer(diagonal, diagonal))
        if bool((gram.abs() > bound * (1 + validation.CAUCHY_SCHWARZ_TOLERANCE) + 1e-9).any()):
            raise DumeError("Cauchy-Schwarz")
        if exceeds_norm_bound(gram, norm_weight(layer_index(entry.name))):
            raise DumeError("norm bound")
        size = gram.shape[-1] if settings.router_bias else gram.shape[-1] - 1
        system = gram[:size, :size]
        ridge_lambda = settings.rho * float(torch.trace(system)) / size
        regularized = system + ridge_lambda * torch.eye(size, dtype=torch.float64)
        _, info = torch.linalg.cholesky_ex(regularized)
        if int(info) != 0 or not math.isfinite(ridge_lambda):
            raise DumeError("not positive definite")


def store_statistics(blobs: BlobStore, hidden: int, layers: int) -> list[dict]:
    entries = []
    for layer in range(layers):
        triangle = synthetic_triangle(hidden, layer)
        entries.append({"name": layer_name(layer), "dtype": "F64", "shape": list(triangle.shape),
                        "sha256": blobs.put_bytes(tensor_view(triangle)), "size_bytes": triangle.nbytes})
    return entries


def validate(path: str, store: Path, entries_file: Path) -> dict:
    """In the child: the checks over every layer stored; their memory in MiB and time."""
    stored, blobs = json.loads(entries_file.read_text()), BlobStore(store)
    hidden, entries = stored["hidden"], [tensors_pb2.TensorEntry(**entry) for entry in stored["entries"]]
    manifest = tensors_pb2.TensorManifest(tensors=entries)
    header = tensors_pb2.StatisticsHeader(basis_hash="0" * 64, hidden_size=hidden, num_layers=len(entries),
                                          token_count=TOKENS, sequence_length=256, dataset="data")
    config = {"hidden_size": hidden, "num_hidden_layers": len(entries)}
    weight = torch.ones(hidden)
    torch.zeros(1) @ torch.zeros(1)  # torch's own start-up allocations belong to "before"
    before = memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    if path == "old":
        old_check_statistics(header, manifest, config, lambda layer: weight, MergeSettings(), blobs.path)
    else:
        validation.check_statistics(header, manifest, config, lambda layer: weight, MergeSettings(), blobs.path,
                                    lambda sha256: path == "new")
    seconds = time.perf_counter() - started
    return {"before_mib": round(before["VmRSS"]), "peak_mib": round(memory()["VmHWM"]), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/statistics_validation.json"))
    parser.add_argument("--child", nargs=3, metavar=("PATH", "STORE", "ENTRIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(validate(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    print(f"hidden {args.hidden}, {args.threads} thread(s)")
    print("path          layers  before MiB  peak MiB  growth MiB  s/layer")
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="dume-validation-") as scratch:
            root = Path(scratch)
            blobs = BlobStore(root / "blobs")
            (root / "entries.json").write_text(json.dumps({"hidden": args.hidden,
                                                           "entries": store_statistics(blobs, args.hidden, layers)}))
            for path in args.paths:
                child = subprocess.run([sys.executable, __file__, "--child", path, str(blobs.root),
                                        str(root / "entries.json")], capture_output=True, text=True, env=environment)
                if child.returncode:
                    raise SystemExit(child.stderr)
                measured = json.loads(child.stdout.splitlines()[-1])
                row = {"path": path, "layers": layers, "before_mib": measured["before_mib"],
                       "peak_mib": measured["peak_mib"],
                       "peak_growth_mib": measured["peak_mib"] - measured["before_mib"],
                       "seconds_per_layer": round(measured["seconds"] / layers, 3)}
                rows.append(row)
                print(f"{path:13} {layers:6} {row['before_mib']:11} {row['peak_mib']:9} {row['peak_growth_mib']:11} "
                      f"{row['seconds_per_layer']:8}")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": args.threads},
              "hidden": args.hidden, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
