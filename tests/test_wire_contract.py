"""The committed stubs are what the .proto files generate, and they import as dume.v1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[1] / "proto"


def test_committed_stubs_are_not_stale(tmp_path):
    subprocess.run([sys.executable, str(PROTO / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = {path.name: path.read_bytes() for path in (tmp_path / "dume" / "v1").glob("*_pb2*.py*")}
    committed = {path.name: path.read_bytes() for path in (PROTO / "dume" / "v1").glob("*_pb2*.py*")}
    assert generated, "protoc generated nothing"
    stale = sorted(name for name in generated.keys() | committed.keys() if generated.get(name) != committed.get(name))
    assert not stale, f"stale stubs {stale}: run `python proto/generate.py` and commit the result"


def test_stubs_import_as_dume_v1():
    from dume.v1 import tensors_pb2

    entry = tensors_pb2.TensorEntry(name="model.norm.weight", dtype="F32", shape=[4], size_bytes=16)
    assert tensors_pb2.TensorEntry.FromString(entry.SerializeToString()) == entry
