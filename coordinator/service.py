"""The coordinator's gRPC services: enrolment, the node calls and the admin calls.

Every call on the mutual-TLS port is authorised by the peer certificate: a node acts only for itself and only
while its certificate is the one the ledger holds for it and it is neither revoked nor gone; admin calls need
the admin identity. Aggregation runs on one background worker (``Publisher``), so uploads return quickly while
leave and revoke wait for the version they cause.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import grpc

from dume.coordinator import aggregation, validation
from dume.coordinator.state_dir import ADMIN_NAME, StateDir
from dume.coordinator.store import Statistics, Store
from dume.coordinator.uploads import PlannedUpload, UploadRefused, Uploads
from dume.shared.errors import DumeError
from dume.shared.method.merge import check_member_name
from dume.shared.transport.blobs import BlobStore, read_range
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken, new_secret, secret_digest
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc
from dume.v1 import tensors_pb2

log = logging.getLogger("dume.coordinator")
WATCH_POLL_SECONDS = 1.0


class Publisher:
    """One worker thread that brings the basis and the published version up to date with the ledger."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._condition = threading.Condition()
        self._wanted = self._done = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def request(self) -> int:
        with self._condition:
            self._wanted += 1
            self._condition.notify_all()
            return self._wanted

    def wait(self, ticket: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._done >= ticket or self._stopping)

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._wanted > self._done or self._stopping)
                if self._stopping:
                    return
                ticket = self._wanted
            try:
                self._coordinator.refresh()
            except Exception:  # a bad aggregate must not kill the daemon; the next change retries
                log.exception("aggregation failed")
            with self._condition:
                self._done = ticket
                self._condition.notify_all()


class Coordinator:
    """Owns the ledger, the blobs and the uploads in progress; the servicers below are thin views on it."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.config = state.config()
        self.settings = state.settings()
        self.store = Store(state.ledger)
        self.blobs = BlobStore(state.blobs)
        self.uploads = Uploads(state.uploads, self.blobs)
        self.ca_key = pki.read_bytes(state.ca_key, "the CA key")
        self.ca_cert = pki.read_bytes(state.ca_cert, "the CA certificate")
        if self.config.get("architecture") and self.store.get_meta("architecture") is None:
            self.store.set_meta("architecture", self.config["architecture"])
        self.addresses: dict[str, str] = {}
        self.online: Counter[str] = Counter()  # open Watch streams per member
        self.online_lock = threading.Lock()
        self.changed = threading.Condition()
        self.stopping = False
        self.publisher = Publisher(self)

    def refresh(self) -> None:
        basis = aggregation.refresh_basis(self.store, self.blobs)
        if basis is not None:
            log.info("basis %s over %s", basis.hash[:12], ", ".join(basis.members))
        number = aggregation.publish_if_due(self.store, self.blobs, self.settings)
        if number is not None:
            version = self.store.version(number)
            log.info("published version %d (%s) over %s", number, "exact" if version.exact else "provisional",
                     ", ".join(version.members))
        self.notify()

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def apply_and_publish(self) -> int:
        """Runs aggregation for a change just recorded and returns the latest version number (0 if none)."""
        self.publisher.wait(self.publisher.request())
        latest = self.store.version()
        return latest.number if latest else 0

    def event(self) -> pb.Event:
        latest = self.store.version()
        basis = self.store.basis(self.store.get_meta("current_basis") or "")
        return pb.Event(basis_hash=basis.hash if basis else "", basis_members=basis.members if basis else [],
                        version=latest.number if latest else 0, exact=bool(latest and latest.exact))

    # -- authorisation --------------------------------------------------------------------------------------------
    def caller(self, context: grpc.ServicerContext, allow_admin: bool = False) -> str:
        certificates = context.auth_context().get("x509_pem_cert")
        if not certificates:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate: enrol with a join token first")
        try:
            identity = pki.identity_of(certificates[0])
        except DumeError as error:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        if identity.role == "admin":
            if not allow_admin:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call is for nodes, not the admin")
            return ADMIN_NAME
        member = self.store.member(identity.name)
        if member is None or member.cert_serial != str(identity.serial):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the certificate of {identity.name!r} is no longer valid: enrol again with a new token")
        if member.state == "revoked":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {identity.name!r} was revoked "
                          f"({member.reason or 'no reason given'}): its certificate is refused")
        if member.state == "left":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {identity.name!r} has left the federation: "
                          "ask the admin for a new join token to rejoin")
        return identity.name

    def admin(self, context: grpc.ServicerContext) -> None:
        if self.caller(context, allow_admin=True) != ADMIN_NAME:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin identity of the state dir")


class EnrolmentService(rpc.EnrolmentServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def Enrol(self, request: pb.EnrolRequest, context: grpc.ServicerContext) -> pb.EnrolResponse:
        store = self.c.store
        with store.transaction():
            token = store.token(secret_digest(request.secret))
            if token is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "this join token was not issued by this coordinator: "
                              "ask this coordinator's admin for a token")
            node, expires_at, used_at = token
            if used_at is not None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "this join token was already used: ask for a new one")
            if time.time() >= expires_at:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"this join token expired at "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires_at))}: ask for a new one")
            member = store.member(node)
            if member is not None and member.state == "revoked":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node!r} was revoked and cannot rejoin")
            try:
                certificate, serial = pki.sign_csr(self.c.ca_key, self.c.ca_cert, request.csr_pem, node, "node")
            except DumeError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            store.use_token(secret_digest(request.secret), time.time())
            if member is not None and member.state in ("active", "enrolled"):
                store.enrol_again(node, str(serial))
            else:
                store.enrol(node, str(serial))
            store.audit("enrol", node, serial=str(serial))
        log.info("enrolled %s", node)
        return pb.EnrolResponse(certificate_pem=certificate, node=node)


class FederationService(rpc.FederationServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def BeginUpload(self, request: pb.UploadPlan, context: grpc.ServicerContext) -> pb.UploadState:
        member = self.c.caller(context)
        if request.kind == pb.UPLOAD_KIND_STATISTICS and self.c.store.member(member).model is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "upload the model before its statistics")
        try:
            return self.c.uploads.begin(member, request)
        except UploadRefused as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def SendChunks(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.UploadState:
        member = self.c.caller(context)
        planned: PlannedUpload | None = None
        for chunk in request_iterator:
            if planned is None or planned.upload_id != chunk.upload_id:
                planned = self._planned(member, chunk.upload_id, context)
            try:
                self.c.uploads.write(planned, chunk)
            except UploadRefused as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return self.c.uploads.state(planned) if planned else pb.UploadState()

    def _planned(self, member: str, upload: str, context: grpc.ServicerContext) -> PlannedUpload:
        try:
            return self.c.uploads.planned(member, upload)
        except PermissionError as error:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        except UploadRefused as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def CommitUpload(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        member = self.c.caller(context)
        planned = self._planned(member, request.upload_id, context)
        missing = self.c.uploads.missing(planned)
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{len(missing)} blobs of the upload are incomplete: send them before committing")
        try:
            if planned.plan.kind == pb.UPLOAD_KIND_MODEL:
                self._commit_model(member, planned)
            else:
                self._commit_statistics(member, planned)
        except DumeError as error:
            self.c.uploads.discard(planned)
            log.warning("refused %s upload of %s: %s", validation.UPLOAD_KINDS[planned.plan.kind], member, error)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        self.c.uploads.discard(planned)
        self.c.publisher.request()
        return pb.CommitResponse(basis_hash=self.c.store.get_meta("current_basis") or "")

    def _commit_model(self, member: str, planned: PlannedUpload) -> None:
        plan = planned.plan
        files = {file.name: self.c.uploads.blob_path(planned, file.sha256) for file in plan.files}
        config = validation.read_config(files)
        reference = self.c.store.get_meta("architecture")
        validation.check_model(config, plan.manifest, reference,
                               lambda sha: self.c.uploads.blob_path(planned, sha))
        self.c.uploads.adopt(planned)
        with self.c.store.transaction():
            if reference is None:
                self.c.store.set_meta("architecture", validation.architecture_of(config, plan.manifest))
            self.c.store.set_model(member, plan.manifest, {file.name: file.sha256 for file in plan.files})
            self.c.store.audit("upload", member, what="model", upload=planned.upload_id,
                               bytes=sum(planned.sizes.values()))
        log.info("%s uploaded its model (%d tensors)", member, len(plan.manifest.tensors))

    def _commit_statistics(self, member: str, planned: PlannedUpload) -> None:
        header = planned.plan.statistics
        config = self.c.store.get_meta("architecture")["config"]
        known = self.c.store.basis(header.basis_hash) is not None
        validation.check_statistics(header, planned.plan.manifest, config, known,
                                    lambda sha: self.c.uploads.blob_path(planned, sha))
        self.c.uploads.adopt(planned)
        with self.c.store.transaction():
            self.c.store.set_statistics(Statistics(member, header.basis_hash, header.token_count,
                                                   planned.plan.manifest))
            self.c.store.audit("upload", member, what="statistics", basis_hash=header.basis_hash,
                               tokens=header.token_count)
        log.info("%s uploaded statistics under basis %s (%d tokens)", member, header.basis_hash[:12],
                 header.token_count)

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        member = self.c.caller(context)
        with self.c.online_lock:
            self.c.online[member] += 1
        try:
            sent = None
            while not self.c.stopping and context.is_active():
                self.c.caller(context)  # ends the stream with PERMISSION_DENIED once revoked or gone
                event = self.c.event()
                if event != sent:
                    yield event
                    sent = event
                with self.c.changed:
                    self.c.changed.wait(WATCH_POLL_SECONDS)
        finally:
            with self.c.online_lock:
                self.c.online[member] -= 1

    def GetBasis(self, request: pb.BasisRequest, context: grpc.ServicerContext) -> pb.Basis:
        self.c.caller(context, allow_admin=True)
        record = self.c.store.basis(request.basis_hash or self.c.store.get_meta("current_basis") or "")
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no basis {request.basis_hash[:12]}: ask for the current one")
        return pb.Basis(basis_hash=record.hash, members=record.members, manifest=record.manifest,
                        sequence_length=self.c.settings.sequence_length, batch_size=self.c.settings.batch_size)

    def GetVersion(self, request: pb.VersionRequest, context: grpc.ServicerContext) -> pb.Version:
        self.c.caller(context, allow_admin=True)
        record = self.c.store.version(request.version)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} is not published" if request.version
                          else "no version is published yet: wait until a member has uploaded statistics")
        files = []
        for file in record.files:
            shard = tensors_pb2.TensorManifest(tensors=[tensors_pb2.TensorEntry(**entry)
                                                        for entry in file.get("shard", [])])
            files.append(pb.VersionFile(name=file["name"], sha256=file.get("sha256", ""), shard=shard,
                                        size_bytes=file.get("size_bytes", 0)))
        return pb.Version(version=record.number, exact=record.exact, basis_hash=record.basis_hash,
                          members=record.members, files=files, published_at=record.at)

    def ReadBlob(self, request: pb.BlobRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self.c.caller(context, allow_admin=True)
        if not self.c.store.blob_is_published(request.sha256):
            context.abort(grpc.StatusCode.NOT_FOUND, f"blob {request.sha256[:12]} is in no basis or version")
        offset = request.offset
        for data in read_range(self.c.blobs.path(request.sha256), offset):
            yield pb.Chunk(sha256=request.sha256, offset=offset, data=data)
            offset += len(data)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        member = self.c.caller(context)
        with self.c.store.transaction():
            self.c.store.set_state(member, "left")
            self.c.store.audit("leave", member)
        log.info("%s left", member)
        return pb.LeaveResponse(version=self.c.apply_and_publish())


class AdminService(rpc.AdminServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def CreateToken(self, request: pb.TokenRequest, context: grpc.ServicerContext) -> pb.TokenResponse:
        self.c.admin(context)
        try:
            node = check_member_name(request.node)
        except DumeError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if node == ADMIN_NAME:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{ADMIN_NAME!r} is reserved: choose another node name")
        member = self.c.store.member(node)
        if member is not None and member.state == "revoked":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {node!r} was revoked: choose another name")
        if not request.ttl_seconds > 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the token lifetime must be positive")
        secret, expires_at = new_secret(), time.time() + request.ttl_seconds
        with self.c.store.transaction():
            self.c.store.add_token(secret_digest(secret), node, expires_at)
            self.c.store.audit("token", node, expires_at=expires_at)
        token = JoinToken(coordinator=self.c.addresses["listen"], enrolment=self.c.addresses["enrolment"],
                          ca_fingerprint=pki.fingerprint(self.c.ca_cert), node=node, secret=secret,
                          expires_at=expires_at)
        return pb.TokenResponse(token=token.encode(), expires_at=expires_at)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self.c.admin(context)
        store = self.c.store
        current = store.get_meta("current_basis") or ""
        statistics = store.statistics()
        members = [pb.MemberStatus(
            name=member.name, state=member.state, online=self.c.online[member.name] > 0,
            stats_current=member.name in statistics and statistics[member.name].basis_hash == current,
            reason=member.reason,
            token_count=statistics[member.name].token_count if member.name in statistics else 0,
        ) for member in store.members()]
        latest = store.version()
        return pb.StatusResponse(version=latest.number if latest else 0, exact=bool(latest and latest.exact),
                                 basis_hash=current, members=members, audit_entries=len(store.audit_entries()),
                                 settings_json=json.dumps(asdict(self.c.settings), sort_keys=True))

    def Revoke(self, request: pb.RevokeRequest, context: grpc.ServicerContext) -> pb.RevokeResponse:
        self.c.admin(context)
        member = self.c.store.member(request.node)
        if member is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no member {request.node!r}: see `dume-coordinator status`")
        if member.state == "revoked":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.node!r} is already revoked")
        with self.c.store.transaction():
            self.c.store.set_state(member.name, "revoked", request.reason)
            self.c.store.audit("revoke", member.name, reason=request.reason)
        log.info("revoked %s (%s)", member.name, request.reason)
        return pb.RevokeResponse(version=self.c.apply_and_publish())

    def Audit(self, request: pb.AuditRequest, context: grpc.ServicerContext) -> pb.AuditResponse:
        self.c.admin(context)
        return pb.AuditResponse(entries=[
            pb.AuditEntry(sequence=entry.sequence, at=entry.at, kind=entry.kind, subject=entry.subject,
                          detail_json=entry.detail_json, previous_hash=entry.previous_hash,
                          entry_hash=entry.entry_hash) for entry in self.c.store.audit_entries()])
