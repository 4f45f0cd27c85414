"""Regenerate the Python stubs of the wire contract: ``python proto/generate.py [--out DIR]``.

The stubs are committed next to the .proto files (proto/dume/v1), where they import as ``dume.v1``; the test
suite regenerates them into a temporary folder and fails when the committed ones are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every .proto under dume/v1 into ``out_dir``."""
    sources = sorted(str(path.relative_to(PROTO_ROOT)) for path in (PROTO_ROOT / "dume" / "v1").glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
         f"--grpc_python_out={out_dir}", *sources]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    return sorted((out_dir / "dume" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/, in place)")
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)
