"""Transfer throughput: an upload and a download through the real coordinator, next to a plain TLS socket.

Side by side in one run, on loopback, for the same model bytes (a Llama model with few layers and a large hidden
size, built here, of about ``--size-mib``):

* ``socket``: the reference. A plain TLS socket (another process) that receives the model's files and writes them
  to one file, fsynced at the end; timed from connecting to the receiver's acknowledgement.
* ``upload``: what `dume-node join` does to contribute a model, with the real agent code in this process against a
  real `dume-coordinator serve` daemon (mutual TLS): the plan (hashing the files), the chunk stream, and the commit
  (the coordinator verifies and adopts every blob). ``upload`` is its throughput end to end; ``stream`` the part
  from BeginUpload to the commit's answer.
* ``download``: what `dume-node fetch` does for a node that holds nothing yet (fresh blob cache, no local model):
  every blob of the published version streamed and verified (``download``), then the Hugging Face directory
  written (``fetch`` is both).

Each ratio is a throughput over the socket's (target >= 0.7). It also reads the daemon's peak RSS (VmHWM).

    python benchmarks/transfer_throughput.py [--size-mib 512]

Prints a table and writes ``benchmarks/results/transfer_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import ssl
import tempfile
import time
from pathlib import Path

import torch

from dume.node.agent import Agent, enrol, model_upload
from dume.node.workdir import Workdir
from dume.shared.lab.harness import Federation, quiet_loading
from dume.shared.lab.tiny import build_tiny_model, synthetic_documents
from dume.shared.transport.blobs import BlobStore, read_range
from dume.shared.transport.download import fetch_missing, version_blobs, write_version
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 4096
SOCKET_BYTES = 1 << 20  # the reference's reads and writes, as large as a gRPC chunk
MIB = 1 << 20


def build_model(out: Path, size_mib: int) -> Path:
    """A float32 Llama of hidden 2048 with as many layers as make about ``size_mib`` MiB (at least one)."""
    per_layer = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    outside = 4 * 2 * VOCAB * HIDDEN
    layers = max(1, round((size_mib * MIB - outside) / per_layer))
    with quiet_loading():
        return build_tiny_model("llama", out, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                num_hidden_layers=layers, num_attention_heads=HIDDEN // 64, num_key_value_heads=8,
                                head_dim=64)


def model_files(model_dir: Path) -> list[Path]:
    return sorted(path for path in model_dir.iterdir() if path.is_file())


# -- the reference: a plain TLS socket writing to a file -------------------------------------------------------------
def receive_to_file(port: multiprocessing.Queue, cert: str, key: str, out: str) -> None:
    """Accepts one TLS connection, writes what it sends to ``out``, fsyncs, and acknowledges with one byte."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port.put(server.getsockname()[1])
        connection, _ = server.accept()
        with context.wrap_socket(connection, server_side=True) as tls, open(out, "wb") as handle:
            left = int.from_bytes(tls.recv(8), "little")  # the sender says how many bytes follow
            buffer = memoryview(bytearray(SOCKET_BYTES))
            while left > 0:
                received = tls.recv_into(buffer, min(left, SOCKET_BYTES))
                if not received:
                    raise OSError(f"the sender stopped {left} bytes early")
                handle.write(buffer[:received])
                left -= received
            handle.flush()
            os.fsync(handle.fileno())
            tls.sendall(b"k")


def socket_seconds(files: list[Path], root: Path) -> float:
    """Seconds to send ``files`` over a plain TLS socket to a process that writes them to a file and fsyncs."""
    key, cert = pki.create_authority()
    (root / "key.pem").write_bytes(key)
    (root / "cert.pem").write_bytes(cert)
    spawn = multiprocessing.get_context("spawn")
    port = spawn.Queue()
    receiver = spawn.Process(target=receive_to_file, args=(port, str(root / "cert.pem"), str(root / "key.pem"),
                                                           str(root / "received")))
    receiver.start()
    address = ("127.0.0.1", port.get(timeout=60))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(root / "cert.pem"))
    context.check_hostname = False
    started = time.perf_counter()
    with context.wrap_socket(socket.create_connection(address)) as tls:
        tls.sendall(sum(path.stat().st_size for path in files).to_bytes(8, "little"))
        for path in files:
            for chunk in read_range(path, chunk_bytes=SOCKET_BYTES):
                tls.sendall(chunk)
        if tls.recv(1) != b"k":
            raise OSError("the receiver did not acknowledge")
    seconds = time.perf_counter() - started
    receiver.join(timeout=60)
    (root / "received").unlink()
    return seconds


# -- the real path ---------------------------------------------------------------------------------------------------
def daemon_memory(fed: Federation) -> dict[str, int]:
    """The daemon's peak and current resident memory (VmHWM, VmRSS) in MiB."""
    fields = {}
    for line in Path(f"/proc/{fed.processes['coordinator'].pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) // 1024
    return fields


def upload_and_download(model_dir: Path, data: Path, root: Path) -> dict:
    fed = Federation(root / "federation", say=lambda line: None)
    try:
        fed.init("--sequence-length", "64", "--batch-size", "4")
        fed.serve()
        memory = {"started": daemon_memory(fed)}
        workdir = Workdir(root / "node")
        enrol(JoinToken.decode(fed.token("bench")), workdir, model_dir, data)
        agent = Agent(workdir)
        started = time.perf_counter()
        upload = model_upload(model_dir, "bench")
        planned = time.perf_counter()
        workdir.record_own_blobs({sha: (str(where.path), where.start, where.size)
                                  for sha, where in upload.sources.items()})
        agent.upload(upload)
        uploaded = time.perf_counter()
        workdir.update(model_upload=True)
        memory["after_upload"] = daemon_memory(fed)
        agent.state = workdir.state()
        agent.run(once=True)  # statistics, so that a version is published
        fed.wait_exact(["bench"])
        memory["after_publication"] = daemon_memory(fed)
        stub = rpc.FederationStub(workdir.channel())
        cache = BlobStore(root / "fetch-cache")
        started_download = time.perf_counter()
        version = stub.GetVersion(pb.VersionRequest(version=0))
        wanted = version_blobs(version)
        count, received = fetch_missing(stub, wanted, cache)
        downloaded = time.perf_counter()
        write_version(version, cache, root / "fetched")
        fetched = time.perf_counter()
        assert count == len(wanted), "the fresh cache should have downloaded every blob"
        return {"plan_s": planned - started, "stream_s": uploaded - planned, "upload_s": uploaded - started,
                "download_s": downloaded - started_download, "write_s": fetched - downloaded,
                "fetch_s": fetched - started_download, "download_bytes": received, "coordinator_mib": memory}
    finally:
        fed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="about how large the model is")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dume-transfer-") as scratch:
        root = Path(scratch)
        model_dir = build_model(root / "model", args.size_mib)
        data = root / "data.txt"
        data.write_text("\n\n".join(synthetic_documents("code", 200)) + "\n")
        files = model_files(model_dir)
        size = sum(path.stat().st_size for path in files)
        before = socket_seconds(files, root)
        timings = upload_and_download(model_dir, data, root)
        after = socket_seconds(files, root)
    reference = min(before, after)  # the faster of two runs: the machine is shared, the socket is the bound
    rates = {"socket": size / reference, "upload": size / timings["upload_s"], "stream": size / timings["stream_s"],
             "download": timings["download_bytes"] / timings["download_s"],
             "fetch": timings["download_bytes"] / timings["fetch_s"]}
    print(f"{size / MIB:.0f} MiB model; socket runs {before:.2f} s and {after:.2f} s")
    print(f"{'path':>9} {'MB/s':>8} {'ratio':>6}")
    for path, rate in rates.items():
        print(f"{path:>9} {rate / 1e6:>8.1f} {rate / rates['socket']:>6.3f}")
    print(f"plan (hashing) {timings['plan_s']:.2f} s, chunk stream and commit {timings['stream_s']:.2f} s; "
          f"download {timings['download_s']:.2f} s, writing the directory {timings['write_s']:.2f} s")
    print(f"coordinator RSS MiB: {timings['coordinator_mib']}")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "model_bytes": size, "download_bytes": timings["download_bytes"],
        "socket_seconds": [round(before, 3), round(after, 3)],
        "seconds": {key: round(value, 3) for key, value in timings.items() if key.endswith("_s")},
        "mb_per_s": {key: round(value / 1e6, 1) for key, value in rates.items()},
        "ratio_to_socket": {key: round(value / rates["socket"], 3) for key, value in rates.items() if key != "socket"},
        "coordinator_mib": timings["coordinator_mib"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
