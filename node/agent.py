"""The node agent: enrol with a join token, contribute the model, keep statistics current, and leave.

Only the model's weights (shared parameters and MLPs, with config and tokenizer files) and the summed statistics
of its hidden states ever leave the node; its data never does. Uploads are resumable: after any failure the agent
asks the coordinator what it holds and sends only the rest, so a dropped connection or a restart of either side
costs at most the chunk in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from safetensors.torch import load_file
from tqdm import tqdm

from dume.node.lifecycle import Reconnect
from dume.node.workdir import Workdir
from dume.shared.errors import CoordinatorUnreachable, DumeError
from dume.shared.files import atomic_path, staged_directory
from dume.shared.method.averaging import tensors_hash
from dume.shared.method.data import DocumentStream, load_tokenizer
from dume.shared.method.distributed_statistics import SCRATCH_PREFIX, packed_statistics
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.expert_weights import expert_hash, expert_manifest
from dume.shared.method.families import detect_family
from dume.shared.method.placement import CPU, Placement
from dume.shared.method.settings import CHECKPOINT_EVERY_SECONDS
from dume.shared.method.statistics import (
    check_enough_tokens,
    layout_token_count,
    statistics_tensors,
    token_count,
)
from dume.shared.method.statistics_checkpoint import StatisticsCheckpoint
from dume.shared.method.tensor_file import write_tensors
from dume.shared.method.writer import TOKENIZER_FILES
from dume.shared.progress import byte_progress
from dume.shared.transport.blobs import read_range, sha256_file
from dume.shared.transport.channels import (
    DEFAULT_CHUNK_BYTES,
    TRANSFER_STREAMS,
    TRANSIENT,
    is_refusal,
    refusal,
    server_tls_channel,
    spread,
)
from dume.shared.transport.download import fetch_missing, write_shard_from_blobs
from dume.shared.transport.stall import STALL_SECONDS, ProgressDeadline
from dume.shared.transport.wire import FileRange, safetensors_ranges, stored_tensors
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc
from dume.v1 import tensors_pb2

log = logging.getLogger("dume.node")


def say(message: str) -> None:
    """A progress line: to the log once the command line configured it (`join --log-format`), else to stderr."""
    if logging.getLogger().handlers:
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def enrol(token: JoinToken, workdir: Workdir, model: Path | None, datasets: dict[str, Path],
          give_up_after: float | None = None) -> None:
    """Checks the coordinator against the token's CA fingerprint, then trades the token and a CSR for a cert,
    retrying while the coordinator is unreachable (for ``give_up_after`` seconds; None: for ever)."""
    host, _, port = token.enrolment.rpartition(":")
    try:
        ca_pem = ssl.get_server_certificate((host, int(port)), timeout=15).encode()
    except (OSError, ValueError) as error:
        raise CoordinatorUnreachable(f"cannot reach the coordinator's enrolment service at {token.enrolment} "
                                     f"({error}): check that the coordinator runs and is reachable") from None
    if pki.fingerprint(ca_pem) != token.ca_fingerprint:
        raise DumeError(f"the coordinator at {token.enrolment} presents CA {pki.fingerprint(ca_pem)[:16]}..., the "
                        f"token expects {token.ca_fingerprint[:16]}...: this token is for another coordinator")
    key_pem = workdir.enrolment_key()
    stub = rpc.EnrolmentStub(server_tls_channel(token.enrolment, ca_pem))
    request = pb.EnrolRequest(secret=token.secret, csr_pem=pki.create_csr(key_pem, token.node))
    reconnect = Reconnect(token.enrolment, give_up_after)
    while True:
        try:
            response = stub.Enrol(request, timeout=60)
            break
        except grpc.RpcError as error:
            if is_refusal(error) or error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                          grpc.StatusCode.DEADLINE_EXCEEDED):
                raise refusal(error, "enrolment refused") from None
            # The answer may have been lost after the token was spent: the same key asking again gets it.
            reconnect.failed(error, "cannot enrol")
    workdir.save_identity(key_pem, response.certificate_pem, ca_pem)
    expert = response.expert or response.node
    workdir.update(name=response.node, expert=expert, coordinator=token.coordinator,
                   model=str(model.resolve()) if model is not None else None,
                   datasets={name: str(path.resolve()) for name, path in datasets.items()}, removed_datasets=[],
                   model_upload=None, expert_hash=None, uploaded={}, left=False)
    role = "the owner of expert" if expert == response.node else "a contributor to expert"
    say(f"enrolled as {response.node}, {role} {expert}, with the coordinator at {token.coordinator}")


@dataclass
class Upload:
    """What one upload sends: the plan, and where each blob's bytes lie on this node."""

    plan: pb.UploadPlan
    sources: dict[str, FileRange]
    what: str  # "model" or "statistics"
    dataset: str = ""  # statistics: of which dataset


def described(ranges: dict[str, FileRange]) -> tuple[list[tensors_pb2.TensorEntry], dict[str, FileRange]]:
    """Manifest entries (hashed a chunk at a time from the files, a few tensors side by side: hashing releases the
    GIL) and where each blob's bytes lie."""
    names = sorted(ranges)
    with ThreadPoolExecutor(TRANSFER_STREAMS, thread_name_prefix="hash") as pool:
        hashes = pool.map(lambda name: sha256_file(ranges[name].path, ranges[name].start, ranges[name].size), names)
    entries, sources = [], {}
    for name, sha256 in zip(names, hashes, strict=True):
        where = ranges[name]
        entries.append(tensors_pb2.TensorEntry(name=name, dtype=where.dtype, shape=list(where.shape),
                                               sha256=sha256, size_bytes=where.size))
        sources[sha256] = where
    return entries, sources


def model_upload(model_dir: Path, name: str) -> Upload:
    """The model's tensors straight from its safetensors files (hashed a chunk at a time), plus its small files."""
    expert = ExpertDirectory(model_dir, name)
    ranges: dict[str, FileRange] = {}
    for file in expert.weight_files:
        ranges.update(safetensors_ranges(file))
    entries, sources = described(ranges)
    files = []
    for file in ("config.json", *TOKENIZER_FILES):
        path = model_dir / file
        if path.is_file():
            sha256 = sha256_file(path)
            size = path.stat().st_size
            files.append(pb.FileEntry(name=file, sha256=sha256, size_bytes=size))
            sources[sha256] = FileRange(path, 0, size, "", ())
    plan = pb.UploadPlan(kind=pb.UPLOAD_KIND_MODEL, manifest=tensors_pb2.TensorManifest(tensors=entries), files=files)
    return Upload(plan, sources, "model")


class SentBytes:
    """What an upload's streams sent together: the progress bar, and the rate limit (bytes/s, 0: none) over all of
    them, so that several streams side by side keep the average rate under it as one stream did."""

    def __init__(self, bar: tqdm, max_rate: float) -> None:
        self.total = 0
        self._bar, self._max_rate = bar, max_rate
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.total += size
            self._bar.update(size)
            ahead = self.total / self._max_rate - (time.monotonic() - self._started) if self._max_rate else 0.0
        if ahead > 0:
            time.sleep(ahead)


class Superseded(Exception):
    """What the node was computing or sending was overtaken (its expert's weights moved, or the dataset was taken
    out): the next event says what to do instead."""


class Agent:
    """One enrolled node talking to its coordinator; ``placement``, ``max_tokens``, ``nproc`` (worker processes)
    and ``checkpoint_every`` (seconds between saves of the partial sums) say how statistics run, and
    ``give_up_after`` how long the coordinator may stay unreachable before the agent gives up (None: never)."""

    def __init__(self, workdir: Workdir, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_rate: float = 0.0,
                 placement: Placement = CPU, max_tokens: int | None = None,
                 give_up_after: float | None = None, stall_seconds: float = STALL_SECONDS, nproc: int = 1,
                 checkpoint_every: float = CHECKPOINT_EVERY_SECONDS) -> None:
        self.workdir = workdir
        self.state = workdir.state()
        self.stub = rpc.FederationStub(workdir.channel())
        self.chunk_bytes = chunk_bytes
        self.max_rate = max_rate
        self.placement = placement
        self.max_tokens = max_tokens
        self.nproc = nproc
        self.give_up_after = give_up_after
        self.stall_seconds = stall_seconds  # a transfer moving nothing this long is cancelled and resumed
        self.checkpoint_every = checkpoint_every  # seconds of statistics a kill may cost at most
        self.held: dict[str, str] = {}  # dataset -> why the coordinator holds its statistics for approval

    # -- uploads --------------------------------------------------------------------------------------------------
    def upload(self, upload: Upload) -> pb.CommitResponse:
        """Sends what the coordinator lacks and commits, resuming after transient failures."""
        started, sent = time.monotonic(), 0
        reconnect = Reconnect(self.state["coordinator"], self.give_up_after)
        total = sum(entry.size_bytes for entry in upload.plan.manifest.tensors) + sum(
            file.size_bytes for file in upload.plan.files)
        while True:
            try:
                state = self.stub.BeginUpload(upload.plan, timeout=self.stall_seconds)
                held = {blob.sha256: blob.offset for blob in state.blobs}
                left = {sha: upload.sources[sha].size - offset for sha, offset in held.items()
                        if offset < upload.sources[sha].size}
                with byte_progress(sum(left.values()), f"upload {upload.what}") as bar:
                    counter = SentBytes(bar, self.max_rate)
                    try:
                        self._send(state.upload_id, upload, held, spread(left), counter)
                    finally:
                        sent += counter.total
                        if counter.total:
                            reconnect.succeeded()  # progress: the coordinator is back, the clock starts again
                response = self.stub.CommitUpload(pb.CommitRequest(upload_id=state.upload_id), timeout=600)
                break
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.ABORTED and upload.what == "statistics":
                    raise Superseded(error.details()) from None  # overtaken: not sent again as it is
                if error.code() not in TRANSIENT:
                    raise refusal(error, f"the coordinator refused the {upload.what} upload") from None
                reconnect.failed(error, f"{upload.what} upload interrupted")
        seconds = time.monotonic() - started
        of = f" of {upload.dataset}" if upload.dataset else ""
        say(f"uploaded {upload.what}{of}: {total / 1e6:.2f} MB ({sent / 1e6:.2f} MB sent) in {seconds:.2f} s")
        self.workdir.record_transfer("upload", what=upload.what, bytes=total, sent_bytes=sent, seconds=seconds,
                                     **({"dataset": upload.dataset} if upload.dataset else {}))
        return response

    def _send(self, upload_id: str, upload: Upload, held: dict[str, int], streams: list[list[str]],
              counter: SentBytes) -> None:
        """Sends each group of blobs on its own SendChunks stream, side by side; raises the first failure. The
        streams share one progress deadline; an interruption (a failed or stalled stream, SIGTERM) cancels every
        stream at once rather than waiting for them."""
        deadline = ProgressDeadline(self.stall_seconds)
        calls = [self.stub.SendChunks.future(self._chunks(upload_id, upload, held, blobs, counter, deadline))
                 for blobs in streams]
        try:
            with deadline.watching(*calls):
                for call in calls:
                    call.result()
        finally:
            for call in calls:
                call.cancel()  # nothing for a finished call

    def _chunks(self, upload_id: str, upload: Upload, held: dict[str, int], blobs: list[str],
                counter: SentBytes, deadline: ProgressDeadline) -> Iterator[pb.Chunk]:
        """The chunks the coordinator lacks; gRPC asks for the next one only once the last was handed to the
        connection, so each request is progress, and a stalled link stops asking."""
        for sha256 in blobs:
            where, offset = upload.sources[sha256], held[sha256]
            for data in read_range(where.path, where.start + offset, where.size - offset, self.chunk_bytes):
                deadline.progressed()
                yield pb.Chunk(upload_id=upload_id, sha256=sha256, offset=offset, data=data)
                offset += len(data)
                counter.add(len(data))

    @property
    def owner(self) -> bool:
        return self.state["expert"] == self.state["name"]

    def contribute_model(self, model_dir: Path | None = None) -> None:
        """Uploads the owner's model (``model_dir``: a new one, for ``update``); the workdir records it only once
        the coordinator accepted it, so a refused update leaves the node on its previous weights."""
        model_dir = model_dir or Path(self.state["model"])
        upload = model_upload(model_dir, self.state["name"])
        family = detect_family(ExpertDirectory(model_dir).config)
        weights = expert_hash(expert_manifest(upload.plan.manifest, family))
        index = {sha: (str(where.path), where.start, where.size) for sha, where in upload.sources.items()}
        # Both models' blobs while the coordinator may still refuse the new one (the published versions hold the
        # old): fetch reads either from disk, not the network; only the accepted model's once it is accepted.
        self.workdir.record_own_blobs({**self.workdir.own_blobs(), **index})
        self.upload(upload)
        self.state = self.workdir.update(model=str(model_dir.resolve()), model_upload=True, expert_hash=weights)
        self.workdir.record_own_blobs(index)

    # -- statistics -----------------------------------------------------------------------------------------------
    def contribute_statistics(self, dataset: str, basis_hash: str, weights: str) -> None:
        """Statistics of one dataset under the named basis and expert weights: downloaded, verified, collected,
        uploaded."""
        try:
            basis = self.stub.GetBasis(pb.BasisRequest(basis_hash=basis_hash), timeout=60)
            cache = self.workdir.blobs()
            fetch_missing(self.stub, {e.sha256: e.size_bytes for e in basis.manifest.tensors}, cache,
                          self.workdir.own_blob, stall_seconds=self.stall_seconds)
        except grpc.RpcError as error:
            if error.code() in TRANSIENT:
                raise  # the follow loop reconnects with backoff and asks again; blobs already cached stay
            raise refusal(error, "cannot download the basis") from None
        tensors = stored_tensors(basis.manifest.tensors, cache)  # read a tensor at a time, never the whole basis
        if tensors_hash(tensors) != basis.basis_hash:
            raise DumeError(f"the basis received does not hash to {basis.basis_hash[:12]}: fetch it again")
        model_dir = Path(self.state["model"]) if self.owner else self.expert_weights(weights, basis)
        expert = ExpertDirectory(model_dir, self.state["expert"])
        path = self.workdir.statistics / f"{basis.basis_hash}-{weights[:16]}-{dataset}-{self._inputs_tag(dataset)}"
        path = path.with_suffix(".safetensors")
        if not path.is_file():  # a basis seen before (membership went back) reuses its statistics
            self._collect(expert, basis, tensors, dataset, path)
        entries, sources = described(safetensors_ranges(path))
        tokens = layout_token_count(load_file(path))
        header = tensors_pb2.StatisticsHeader(
            basis_hash=basis.basis_hash, hidden_size=int(expert.config["hidden_size"]), num_layers=expert.num_layers,
            token_count=tokens, sequence_length=int(basis.sequence_length), dataset=dataset, expert_hash=weights)
        plan = pb.UploadPlan(kind=pb.UPLOAD_KIND_STATISTICS, manifest=tensors_pb2.TensorManifest(tensors=entries),
                             statistics=header)
        held = self.upload(Upload(plan, sources, "statistics", dataset)).held
        if held:
            self.held[dataset] = held
            say(f"the coordinator holds the statistics of {dataset} for its operator's approval ({held}); they "
                "count once `dume-coordinator approve` records them")
        else:
            self.held.pop(dataset, None)
        uploaded = {**self.state.get("uploaded", {}), dataset: [basis.basis_hash, weights]}
        self.state = self.workdir.update(uploaded=uploaded)

    def expert_weights(self, weights: str, basis: pb.Basis) -> Path:
        """A contributor's copy of its expert as a dense model directory: the expert's MLPs, config and tokenizer
        downloaded from the coordinator and checked against ``weights``, with the basis as its shared parameters
        (the statistics replace those with the basis anyway)."""
        directory = self.workdir.experts / weights
        if (directory / "model.safetensors").is_file():
            return directory
        try:
            expert = self.stub.GetExpert(pb.ExpertRequest(), timeout=60)
            cache = self.workdir.blobs()
            wanted = {e.sha256: e.size_bytes for e in expert.manifest.tensors}
            wanted.update({f.sha256: f.size_bytes for f in expert.files})
            fetch_missing(self.stub, wanted, cache, self.workdir.own_blob, stall_seconds=self.stall_seconds)
        except grpc.RpcError as error:
            if error.code() in TRANSIENT:
                raise
            raise refusal(error, f"cannot download the weights of expert {self.state['expert']}") from None
        if expert_hash(expert.manifest) != weights:
            raise Superseded(f"expert {expert.name} now has weights {expert_hash(expert.manifest)[:12]}, not "
                               f"{weights[:12]}")
        entries = sorted([*basis.manifest.tensors, *expert.manifest.tensors], key=lambda entry: entry.name)
        with staged_directory(directory) as staging:
            for file in expert.files:
                (staging / file.name).write_bytes(cache.read_bytes(file.sha256))
            # Straight from the blobs, which are the tensors' bytes: no tensor is held in memory.
            write_shard_from_blobs(staging / "model.safetensors", tensors_pb2.TensorManifest(tensors=entries), cache)
        say(f"downloaded the weights of expert {expert.name} ({weights[:12]})")
        return directory

    def _inputs_tag(self, dataset: str) -> str:
        """Names the model, data and settings the statistics came from, so that changed inputs are never served
        from the cache."""
        sources = [self.state["datasets"][dataset]] + ([self.state["model"]] if self.owner else [])
        stamps = [(path, os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in sources]
        stamps.append([self.placement.device, self.placement.dtype, self.max_tokens,
                       *([self.nproc] if self.nproc > 1 else [])])  # another N: other rounding, other bytes
        return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:12]

    def _collect(self, expert: ExpertDirectory, basis: pb.Basis, tensors: dict, dataset: str, path: Path) -> None:
        data = DocumentStream(Path(self.state["datasets"][dataset]), load_tokenizer(expert.path),
                              int(basis.sequence_length), self.max_tokens)
        started = time.monotonic()
        checkpoint = StatisticsCheckpoint(path.with_name(path.name + ".partial"), basis.basis_hash,
                                          self.checkpoint_every)
        for stale in path.parent.glob("*.partial"):  # runs under bases gone since (this basis's: resumed in turn)
            if not stale.name.startswith(basis.basis_hash):
                stale.unlink(missing_ok=True)
        for stale in path.parent.glob(f"{SCRATCH_PREFIX}*"):  # workers' folders of a run killed with the node
            shutil.rmtree(stale, ignore_errors=True)
        gram = packed_statistics(expert, tensors, data, int(basis.batch_size), self.placement, checkpoint,
                                 self.nproc, self.workdir.statistics)
        check_enough_tokens(gram, f"{self.state['name']}/{dataset}")
        seconds, tokens = time.monotonic() - started, token_count(gram)
        workers = f" by {self.nproc} worker processes" if self.nproc > 1 else ""
        say(f"statistics of {dataset} under basis {basis.basis_hash[:12]}: {tokens} tokens in {seconds:.2f} s"
            f"{workers}")
        self.workdir.record_transfer("statistics", basis=basis.basis_hash, dataset=dataset, tokens=tokens,
                                     seconds=seconds)
        with atomic_path(path) as partial:
            write_tensors(statistics_tensors(gram), partial)  # a full disk: an OSError, which join names

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, once: bool = False) -> None:
        """Contributes, then follows the coordinator: recomputes a dataset's statistics whenever the basis or the
        expert's weights move.

        With ``once``, returns as soon as every dataset's statistics are current for the basis and weights of
        that moment.
        """
        if self.owner and not (self.state.get("model_upload") and self.state.get("expert_hash")):
            self.contribute_model()  # also names the weights of a workdir from before experts (nothing is re-sent)
        seen_version, reconnect = None, Reconnect(self.state["coordinator"], self.give_up_after)
        while True:
            try:
                for event in self.stub.Watch(pb.WatchRequest()):
                    reconnect.succeeded()
                    if event.version and event.version != seen_version:
                        seen_version = event.version
                        say(f"version {event.version} published ({'exact' if event.exact else 'provisional'})")
                    self.state = self.workdir.state()  # `forget` or `update` may have changed it meanwhile
                    self._drop(event.removed_datasets)
                    if self._ready(event):
                        for dataset in self._due(event):
                            try:
                                self.contribute_statistics(dataset, event.basis_hash, event.expert_hash)
                            except Superseded as stale:
                                say(f"{stale}: waiting for the federation to catch up")
                                break
                        if once and not self._due(event):
                            return
            except grpc.RpcError as error:
                if error.code() not in TRANSIENT:
                    raise refusal(error, "the coordinator ended this node's session") from None
                reconnect.failed(error, "lost the coordinator")

    def _ready(self, event: pb.Event) -> bool:
        """Whether statistics can be computed now: the basis includes the node's expert, whose weights are in (and,
        for an owner, are the ones it uploaded last: an update is not yet recorded otherwise)."""
        return bool(event.basis_hash and event.expert_hash and self.state["expert"] in event.basis_members
                    and (not self.owner or event.expert_hash == self.state.get("expert_hash")))

    def _due(self, event: pb.Event) -> list[str]:
        """The datasets whose uploaded statistics are not under this event's basis and weights."""
        uploaded = self.state.get("uploaded", {})
        return [name for name in sorted(self.state["datasets"])
                if uploaded.get(name) != [event.basis_hash, event.expert_hash]]

    def _drop(self, removed: list[str]) -> None:
        """Stops contributing the datasets the coordinator took out (a `revoke --dataset`)."""
        gone = sorted(set(removed) & set(self.state["datasets"]))
        if gone:
            self.state = self.workdir.forget_locally(gone)
            say(f"dataset {', '.join(gone)} was taken out of the federation; this node no longer contributes it")

    def forget(self, dataset: str) -> int:
        """Takes one dataset out of the federation and stops contributing it; returns the version published
        without it (0 if none)."""
        if dataset not in self.state["datasets"]:
            known = ", ".join(sorted(self.state["datasets"])) or "none"
            raise DumeError(f"this node has no dataset {dataset!r} (it has: {known}): see `dume-node status`")
        try:
            response = self.stub.Forget(pb.ForgetRequest(dataset=dataset), timeout=600)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or dataset in self.state.get("uploaded", {}):
                raise refusal(error, f"cannot forget {dataset}") from None
            response = pb.LeaveResponse()  # never uploaded: nothing to take out, only to stop contributing
        self.state = self.workdir.forget_locally([dataset])
        if response.publication_error:
            raise DumeError(f"forgot {dataset}, but {response.publication_error}: tell the coordinator's admin")
        return response.version

    def leave(self) -> int:
        """Leaves the federation; returns the version published without this node (0 if none was ever published)."""
        try:
            response = self.stub.Leave(pb.LeaveRequest(), timeout=600)
        except grpc.RpcError as error:
            raise refusal(error, "cannot leave") from None
        self.workdir.update(left=True)
        if response.publication_error:
            raise DumeError(f"left the federation, but {response.publication_error}: tell the coordinator's admin")
        return response.version
