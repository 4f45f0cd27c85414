"""Statistics in 1 process against ``--nproc N`` worker processes: wall time and tokens/s of one member's whole
statistics run, as ``dume merge`` and ``dume-node join`` run it (the workers' start-up, the basis file, the
reduction and the result file included), and how far the reduced G lies from one process's.

A random-initialised Llama expert (hidden 512, MLP 1536, 4 layers, byte tokenizer) over synthetic documents, on
the CPU with torch's threads split between the workers (gloo), as on a CPU host:

    python benchmarks/distributed_statistics.py [--nproc 2] [--documents 1500] [--hidden 512]

Prints a table and writes ``benchmarks/results/distributed_statistics.json``. On a host whose cores are shared
with other work the numbers say little about scaling: the JSON records the core count and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dume.shared.lab.harness import quiet_loading
from dume.shared.lab.tiny import build_tiny_model, synthetic_documents
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.distributed_statistics import packed_statistics
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.statistics import from_upper_triangle, token_count

SEQUENCE, ROWS = 256, 8  # tokens per row, rows per batch: the federation's defaults


def relative_error(packed: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest entry error of G relative to its bound sqrt(G_ii G_jj)."""
    size = int(round(((8 * packed.shape[-1] + 1) ** 0.5 - 1) / 2))
    mine, theirs = from_upper_triangle(packed, size), from_upper_triangle(reference, size)
    diagonal = theirs.diagonal(dim1=1, dim2=2)
    return float(((mine - theirs).abs() / torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="worker counts to compare with 1")
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed_statistics.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, quiet_loading():
        root = Path(folder)
        build_tiny_model("llama", root / "expert", hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=4, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
                         head_dim=64)
        (root / "data.txt").write_text("\n".join(synthetic_documents("code", args.documents)) + "\n")
        expert = ExpertDirectory(root / "expert", "code")
        basis = compute_basis({"code": expert})
        data = DocumentStream(root / "data.txt", load_tokenizer(expert.path), SEQUENCE)
        rows, reference = [], None
        for nproc in [1, *args.nproc]:
            started = time.perf_counter()
            packed = packed_statistics(expert, basis, data, ROWS, nproc=nproc, scratch=root)
            seconds = time.perf_counter() - started
            reference = packed if reference is None else reference
            rows.append({"nproc": nproc, "seconds": round(seconds, 2), "tokens": token_count(packed),
                         "tokens_per_second": round(token_count(packed) / seconds),
                         "max_entry_error_relative_to_bound": relative_error(packed, reference),
                         "bytes_equal_to_one_process": bool(torch.equal(packed, reference))})
    print(f"{'nproc':>5} {'seconds':>8} {'tokens':>8} {'tok/s':>8} {'G error':>9} {'same bytes':>10}")
    for row in rows:
        print(f"{row['nproc']:>5} {row['seconds']:>8.2f} {row['tokens']:>8} {row['tokens_per_second']:>8} "
              f"{row['max_entry_error_relative_to_bound']:>9.1e} {str(row['bytes_equal_to_one_process']):>10}")
    machine = {"cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
               "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "model": {"hidden_size": args.hidden, "intermediate_size": 3 * args.hidden, "layers": 4}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
