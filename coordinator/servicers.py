"""The coordinator's gRPC servicers: enrolment, the node calls and the admin calls.

Each call takes the peer identity from the TLS auth context, has the ``Coordinator`` authorise it, calls the
operation below and translates with ``messages``; a ``Refused`` becomes the status code of its kind. Nothing
here decides anything.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from dume.coordinator import messages
from dume.coordinator.errors import RefusalKind, Refused, storage_refusal
from dume.coordinator.federation import Coordinator
from dume.coordinator.uploads import PlannedUpload
from dume.shared.errors import DumeError
from dume.shared.transport.blobs import read_range
from dume.shared.transport.channels import REFUSAL_KEY
from dume.shared.trust import pki
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

log = logging.getLogger("dume.coordinator")
WATCH_POLL_SECONDS = 1.0
STATUS_CODES: dict[RefusalKind, grpc.StatusCode] = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission": grpc.StatusCode.PERMISSION_DENIED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "stale": grpc.StatusCode.ABORTED,
}


def _refusal_of(error: Exception) -> Refused:
    """A refusal as it is; a full or unwritable state directory as the refusal that says so (logged in full)."""
    if isinstance(error, Refused):
        return error
    refused = storage_refusal(error)
    if refused is None:
        raise error
    log.warning("refused a call: %s (%s)", refused, error)
    return refused


def _abort(context: grpc.ServicerContext, refused: Refused) -> None:
    """Ends the call with the refusal's status code, marked as the coordinator's own answer (REFUSAL_KEY), so a
    client tells "the coordinator said no" from "the network failed" even where both share a status code."""
    context.set_trailing_metadata(((REFUSAL_KEY, refused.kind),))
    context.abort(STATUS_CODES[refused.kind], str(refused))


def refusals_abort(method: Callable[..., Any]) -> Callable[..., Any]:
    """Ends a call (unary or streaming) whose operation was refused with the status code of the refusal's kind."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except (Refused, OSError, sqlite3.Error) as error:
                _abort(context, _refusal_of(error))
        return streaming

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except (Refused, OSError, sqlite3.Error) as error:
            _abort(context, _refusal_of(error))
    return unary


def peer_identity(context: grpc.ServicerContext) -> pki.Identity:
    """Who the client certificate (already verified against the CA by TLS) says the caller is."""
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        raise Refused("unauthenticated", "no client certificate: enrol with a join token first")
    try:
        return pki.identity_of(certificates[0])
    except DumeError as error:
        raise Refused("permission", str(error)) from None


class EnrolmentService(rpc.EnrolmentServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @refusals_abort
    def Enrol(self, request: pb.EnrolRequest, context: grpc.ServicerContext) -> pb.EnrolResponse:
        certificate, node, expert = self.c.enrol(request.secret, request.csr_pem)
        return pb.EnrolResponse(certificate_pem=certificate, node=node, expert=expert)


class FederationService(rpc.FederationServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def _member(self, context: grpc.ServicerContext) -> str:
        return self.c.authorise(peer_identity(context))

    def _reader(self, context: grpc.ServicerContext) -> str:
        return self.c.authorise(peer_identity(context), allow_admin=True)

    @refusals_abort
    def BeginUpload(self, request: pb.UploadPlan, context: grpc.ServicerContext) -> pb.UploadState:
        planned = self.c.begin_upload(self._member(context), request)
        return messages.upload_state_message(planned.upload_id, self.c.uploads.held(planned))

    @refusals_abort
    def SendChunks(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.UploadState:
        member = self._member(context)
        planned: PlannedUpload | None = None
        with self.c.transferring(member), self.c.uploads.receiving() as receiver:
            for chunk in request_iterator:
                if planned is None or planned.upload_id != chunk.upload_id:
                    planned = self.c.uploads.planned(member, chunk.upload_id)
                receiver.write(planned, chunk.sha256, chunk.offset, chunk.data)
        if planned is None:
            return pb.UploadState()
        return messages.upload_state_message(planned.upload_id, self.c.uploads.held(planned))

    @refusals_abort
    def CommitUpload(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        basis_hash, held = self.c.commit_upload(peer_identity(context), request.upload_id)
        return pb.CommitResponse(basis_hash=basis_hash, held=held)

    @refusals_abort
    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        member = self._member(context)
        with self.c.watching(member):
            sent, ends = None, time.monotonic() + self.c.limits.watch_stream_seconds
            # A stream ends cleanly after its lifetime and the node opens a new one: threads held by streams whose
            # clients vanished without a word come back at the latest then.
            while not self.c.stopping and context.is_active() and time.monotonic() < ends:
                self._member(context)  # ends the stream with PERMISSION_DENIED once revoked or gone
                published = self.c.published(member)
                if published != sent:
                    yield messages.event_message(published)
                    sent = published
                self.c.wait_for_change(WATCH_POLL_SECONDS)

    @refusals_abort
    def GetBasis(self, request: pb.BasisRequest, context: grpc.ServicerContext) -> pb.Basis:
        self._reader(context)
        return messages.basis_message(self.c.basis(request.basis_hash), self.c.settings)

    @refusals_abort
    def GetVersion(self, request: pb.VersionRequest, context: grpc.ServicerContext) -> pb.Version:
        return messages.version_message(self.c.version(request.version, self._reader(context)))

    @refusals_abort
    def ReadBlob(self, request: pb.BlobRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        reader = self._reader(context)
        offset = request.offset
        if offset < 0:
            raise Refused("invalid", f"offset {offset} is negative: read from 0 or the bytes already received")
        path = self.c.published_blob(request.sha256, reader)
        with self.c.transferring(reader):
            for data in read_range(path, offset):
                yield pb.Chunk(sha256=request.sha256, offset=offset, data=data)
                offset += len(data)

    @refusals_abort
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        removal = self.c.leave(peer_identity(context))
        return pb.LeaveResponse(version=removal.version, publication_error=removal.publication_error)

    @refusals_abort
    def GetExpert(self, request: pb.ExpertRequest, context: grpc.ServicerContext) -> pb.Expert:
        return self.c.expert(self._member(context))[1]

    @refusals_abort
    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        removal = self.c.forget(peer_identity(context), request.dataset)
        return pb.LeaveResponse(version=removal.version, publication_error=removal.publication_error)


class AdminService(rpc.AdminServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def _admin(self, context: grpc.ServicerContext) -> None:
        self.c.authorise_admin(peer_identity(context))

    @refusals_abort
    def CreateToken(self, request: pb.TokenRequest, context: grpc.ServicerContext) -> pb.TokenResponse:
        self._admin(context)
        token = self.c.create_token(request.node, request.ttl_seconds, request.expert)
        return pb.TokenResponse(token=token.encode(), expires_at=token.expires_at)

    @refusals_abort
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self._admin(context)
        return messages.status_message(self.c.status())

    @refusals_abort
    def Revoke(self, request: pb.RevokeRequest, context: grpc.ServicerContext) -> pb.RevokeResponse:
        self._admin(context)
        removal = self.c.revoke(request.node, request.reason, request.dataset)
        return pb.RevokeResponse(version=removal.version, publication_error=removal.publication_error)

    @refusals_abort
    def Approve(self, request: pb.ApproveRequest, context: grpc.ServicerContext) -> pb.ApproveResponse:
        self._admin(context)
        outcome = self.c.approve(request.node, request.dataset, request.refuse)
        return pb.ApproveResponse(version=outcome.version, publication_error=outcome.publication_error)

    @refusals_abort
    def Audit(self, request: pb.AuditRequest, context: grpc.ServicerContext) -> pb.AuditResponse:
        self._admin(context)
        return pb.AuditResponse(entries=[messages.audit_entry_message(entry) for entry in self.c.audit_entries()])

    @refusals_abort
    def CollectGarbage(self, request: pb.GarbageRequest, context: grpc.ServicerContext) -> pb.GarbageReport:
        self._admin(context)
        return messages.garbage_report_message(self.c.collect_garbage(request.prune_versions_before, request.dry_run))
