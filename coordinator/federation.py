"""The coordinator below gRPC: who may act, and every change and view a call can ask for, in plain Python.

The servicers hand in a peer identity and plain values and get back records or a ``Refused``; the commit logic
is ``commits``, publication runs on the ``Publisher`` thread, and everything durable is in the ``Ledger``. A
node acts only for itself and only while its certificate is the one the ledger holds for it and it is neither
revoked nor gone; admin operations need the admin identity.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from dume.coordinator import gc, validation
from dume.coordinator.commits import check_dataset_room, commit_upload
from dume.coordinator.errors import Refused
from dume.coordinator.failpoints import failpoint
from dume.coordinator.ledger import Ledger, StateChanged
from dume.coordinator.metrics import Metrics
from dume.coordinator.probe import ProbeSettings, RoutingProber
from dume.coordinator.publication import Publisher, basis_is_current
from dume.coordinator.records import (
    BasisRecord,
    Contribution,
    ContributionStatus,
    ExpertStatus,
    GarbageReport,
    Member,
    MemberStatus,
    Published,
    Removal,
    RoutingStatus,
    Status,
    VersionRecord,
)
from dume.coordinator.state_dir import ADMIN_NAME, StateDir
from dume.coordinator.uploads import EMPTY_SHA256, PlannedUpload, Uploads
from dume.shared.errors import DumeError
from dume.shared.method.expert_weights import expert_hash
from dume.shared.method.merge import check_member_name
from dume.shared.transport.blobs import BlobStore
from dume.shared.trust import pki
from dume.shared.trust.audit import AuditEntry
from dume.shared.trust.join_token import JoinToken, new_secret, secret_digest
from dume.v1 import federation_pb2 as pb

log = logging.getLogger("dume.coordinator")


class Coordinator:
    """Owns the ledger, the blobs, the uploads in progress and the publisher; the servicers are thin views on it."""

    def __init__(self, state: StateDir, metrics: Metrics | None = None, probe: ProbeSettings | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.config = state.config()
        self.settings = state.settings()
        self.limits = state.limits()
        self.ledger = Ledger(state.ledger)
        self.blobs = BlobStore(state.blobs)
        self.uploads = Uploads(state.uploads, self.blobs, self.limits, self.may_reuse_blob)
        self.uploads.expire()  # what expired while the daemon was down goes at once
        self.ca_key = pki.read_bytes(state.ca_key, "the CA key")
        self.ca_cert = pki.read_bytes(state.ca_cert, "the CA certificate")
        if self.config.get("architecture") and self.ledger.get_meta("architecture") is None:
            self.ledger.set_meta("architecture", self.config["architecture"])
        self.addresses: dict[str, str] = {}
        self.stopping = False
        self._online: Counter[str] = Counter()  # open Watch streams per member
        self._transfers: Counter[str] = Counter()  # open SendChunks and ReadBlob streams per member
        self._online_lock = threading.Lock()
        self._changed = threading.Condition()
        self.prober: RoutingProber | None = None
        self.publisher = Publisher(self.ledger, self.blobs, self.settings, self.notify, self.metrics,
                                   on_publish=self._probe_routing)
        if probe is not None:
            self.prober = RoutingProber(probe, self.ledger, self.blobs, state.root / "probe",
                                        self.settings.sequence_length)
        latest = self.ledger.version()
        self.metrics.latest_version.set(latest.number if latest else 0)
        self.metrics.watch_members(lambda: dict(Counter(member.state for member in self.ledger.members())))
        self._closing = threading.Event()
        self._expiry = threading.Thread(target=self._expire_uploads, name="upload-expiry", daemon=True)
        self._expiry.start()

    # -- authorisation --------------------------------------------------------------------------------------------
    def authorise(self, identity: pki.Identity, allow_admin: bool = False) -> str:
        """The name a verified certificate may act as, checked against the ledger on every call."""
        if identity.role == "admin":
            if not allow_admin:
                raise Refused("permission", "this call is for nodes, not the admin")
            return ADMIN_NAME
        member = self.ledger.member(identity.name)
        if member is None or member.cert_serial != str(identity.serial):
            raise Refused("permission",
                          f"the certificate of {identity.name!r} is no longer valid: enrol again with a new token")
        if member.state == "revoked":
            raise Refused("permission", f"node {identity.name!r} was revoked "
                          f"({member.reason or 'no reason given'}): its certificate is refused")
        if member.state == "left":
            why = f" ({member.reason})" if member.reason else ""
            raise Refused("permission", f"node {identity.name!r} has left the federation{why}: "
                          "ask the admin for a new join token to rejoin")
        return identity.name

    def authorise_admin(self, identity: pki.Identity) -> None:
        if self.authorise(identity, allow_admin=True) != ADMIN_NAME:
            raise Refused("permission", "this call needs the admin identity of the state dir")

    # -- membership -----------------------------------------------------------------------------------------------
    def create_token(self, node: str, ttl_seconds: float, expert: str = "") -> JoinToken:
        """A one-time join token for ``node``, which owns the expert named after it or, with ``expert``, contributes
        to that existing expert; only the token's digest is kept."""
        expert = expert or node
        try:
            node = check_member_name(node)
            check_member_name(expert)
        except DumeError as error:
            raise Refused("invalid", str(error)) from None
        if ADMIN_NAME in (node, expert):
            raise Refused("invalid", f"{ADMIN_NAME!r} is reserved: choose another node name")
        if not ttl_seconds > 0:
            raise Refused("invalid", "the token lifetime must be positive")
        secret, expires_at = new_secret(), time.time() + ttl_seconds
        with self.ledger.transaction():
            self._check_token_target(node, expert)
            self.ledger.add_token(secret_digest(secret), node, expert, expires_at)
            self.ledger.audit("token", node, expires_at=expires_at, expert=expert)
        return JoinToken(coordinator=self.addresses["listen"], enrolment=self.addresses["enrolment"],
                         ca_fingerprint=pki.fingerprint(self.ca_cert), node=node, secret=secret,
                         expires_at=expires_at, expert=expert)

    def _check_token_target(self, node: str, expert: str) -> None:
        """A node owns at most one expert and contributes to one: a token may only confirm what a current member
        already does, and a contributor's expert must exist (its owner enrolled and not gone)."""
        member = self.ledger.member(node)
        if member is not None and member.state == "revoked":
            raise Refused("precondition", f"node {node!r} was revoked: choose another name")
        current = member is not None and member.state in ("enrolled", "active")
        if current and member.expert != expert:
            role = "owns expert" if member.owner else "contributes to expert"
            raise Refused("precondition", f"node {node!r} {role} {member.expert!r}; a node contributes to one "
                          f"expert: `dume-coordinator revoke {node}` (or the node leaves) before it joins another")
        if expert != node:
            owner = self.ledger.member(expert)
            if owner is None or owner.state not in ("enrolled", "active") or not owner.owner:
                raise Refused("not_found", f"there is no expert {expert!r} to contribute to: its owner must join "
                              f"first (`dume-coordinator token --node {expert}`); see `dume-coordinator status`")

    def enrol(self, secret: str, csr_pem: bytes) -> tuple[bytes, str, str]:
        """Exchanges a join token's secret and a CSR for a certificate; returns it, the node's name and its expert."""
        ledger = self.ledger
        with ledger.transaction():
            token = ledger.token(secret_digest(secret))
            if token is None:
                raise Refused("unauthenticated", "this join token was not issued by this coordinator: "
                              "ask this coordinator's admin for a token")
            node, expert, expires_at, used_at = token
            if used_at is not None:
                return self._answer_again(secret_digest(secret), csr_pem, node, expert)
            if time.time() >= expires_at:
                raise Refused("unauthenticated", f"this join token expired at "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires_at))}: ask for a new one")
            member = ledger.member(node)
            if member is not None and member.state == "revoked":
                raise Refused("permission", f"node {node!r} was revoked and cannot rejoin")
            self._check_token_target(node, expert)  # the expert may have gone since the token was made
            try:
                certificate, serial = pki.sign_csr(self.ca_key, self.ca_cert, csr_pem, node, "node")
            except DumeError as error:
                raise Refused("invalid", str(error)) from None
            ledger.use_token(secret_digest(secret), time.time(), certificate)
            if member is not None and member.state in ("active", "enrolled"):
                ledger.enrol_again(node, str(serial))
            else:
                ledger.enrol(node, str(serial), expert)
            ledger.audit("enrol", node, serial=str(serial), expert=expert)
        failpoint("enrolment.answering")
        log.info("enrolled %s for expert %s", node, expert)
        return certificate, node, expert

    def _answer_again(self, digest: str, csr_pem: bytes, node: str, expert: str) -> tuple[bytes, str, str]:
        """A used token presented again with the same key: the node retries an enrolment whose answer it never
        received (connection cut, coordinator restarted), so it gets the certificate it was issued, as long as that
        certificate is still the member's. Anyone else gets the refusal; the key check means a leaked secret alone
        yields nothing (and a certificate without its private key opens no connection anyway)."""
        certificate = self.ledger.token_certificate(digest)
        member = self.ledger.member(node)
        try:
            same_key = certificate is not None and pki.request_key_digest(csr_pem) == pki.certificate_key_digest(
                certificate)
        except DumeError:
            same_key = False
        if not same_key or member is None or member.state not in ("enrolled", "active") or (
                member.cert_serial != str(pki.identity_of(certificate).serial)):
            raise Refused("unauthenticated", "this join token was already used: ask for a new one")
        log.info("answered %s's enrolment again (its first answer was lost)", node)
        return certificate, node, expert

    def leave(self, identity: pki.Identity) -> Removal:
        """Takes a member out of the federation; says what was published without it."""
        with self.ledger.transaction():
            member = self.authorise(identity)  # inside the transaction: a revocation cannot be turned into a leave
            self.ledger.set_state(member, "left", ("enrolled", "active"))
            self.ledger.audit("leave", member)
        log.info("%s left", member)
        return self._publish_without(member)

    def revoke(self, node: str, reason: str, dataset: str = "") -> Removal:
        """Removes a member's contributions (an owner's: its expert and every contribution to it) and refuses its
        certificate, or with ``dataset`` removes only that dataset of the node; says what was published without."""
        if dataset:
            return self._remove_dataset(node, dataset, "revoke", reason=reason)
        with self.ledger.transaction():
            member = self.ledger.member(node)
            if member is None:
                raise Refused("not_found", f"no member {node!r}: see `dume-coordinator status`")
            if member.state == "revoked":
                raise Refused("precondition", f"{node!r} is already revoked")
            self.ledger.set_state(member.name, "revoked", (member.state,), reason)
            self.ledger.audit("revoke", member.name, reason=reason)
        log.info("revoked %s (%s)", member.name, reason)
        failpoint("revocation.before_publication")
        return self._publish_without(member.name)

    def forget(self, identity: pki.Identity, dataset: str) -> Removal:
        """Takes one of the calling node's datasets out; says what was published without it."""
        return self._remove_dataset(self.authorise(identity), dataset, "forget", identity=identity)

    def _remove_dataset(self, node: str, dataset: str, kind: str, identity: pki.Identity | None = None,
                        reason: str = "") -> Removal:
        with self.ledger.transaction():
            if identity is not None:
                self.authorise(identity)  # inside the transaction: a revocation landing first wins
            member = self.ledger.member(node)
            if member is None:
                raise Refused("not_found", f"no member {node!r}: see `dume-coordinator status`")
            held = self.ledger.datasets(node)
            if dataset not in held:
                raise Refused("not_found", f"{node!r} has no dataset {dataset!r} in the federation (it has: "
                              f"{', '.join(sorted(held)) or 'none'}): see `dume-coordinator status`")
            self.ledger.remove_dataset(node, dataset)
            self.ledger.audit(kind, node, dataset=dataset, **({"reason": reason} if kind == "revoke" else {}))
        log.info("%s: dataset %s of %s taken out", kind, dataset, node)
        return self._publish_without(node, f"{node}/{dataset}")

    def approve(self, node: str, dataset: str, refuse: bool = False) -> Removal:
        """Records a contribution held for approval and publishes with it, or refuses it: the dataset is taken out
        of the federation and its node stops sending it. Says what the latest version is afterwards."""
        label = f"{node}/{dataset}"
        with self.ledger.transaction():
            pending = self.ledger.take_pending(node, dataset)
            if pending is None:
                held = [c.label for c, _ in self.ledger.pending_contributions()]
                raise Refused("not_found", f"{label} is not held for approval (held: {', '.join(held) or 'none'}): "
                              "see `dume-coordinator status`")
            if refuse:
                self.ledger.refuse_dataset(node, dataset)
            else:
                check_dataset_room(self.ledger, node, dataset, self.limits.datasets_per_node)
                try:
                    self.ledger.set_contribution(pending)
                except StateChanged as error:
                    raise Refused("precondition", f"cannot approve {label}: {error}") from None
            self.ledger.audit("refuse" if refuse else "approve", node, dataset=dataset, expert=pending.expert,
                              tokens=pending.token_count)
        log.info("%s %s (%d tokens for %s)", "refused" if refuse else "approved", label, pending.token_count,
                 pending.expert)
        if refuse:
            return self._publish_without(node, label)
        self.publisher.wait(self.publisher.request())
        latest = self.ledger.version()
        if latest is not None and label in latest.contributions:
            return Removal(latest.number)
        return Removal(latest.number if latest else 0, f"no version with {label} was published "
                       f"({self.publisher.error or 'its statistics are stale: its node recomputes them'})")

    # -- uploads --------------------------------------------------------------------------------------------------
    def begin_upload(self, member: str, plan: pb.UploadPlan) -> PlannedUpload:
        """Opens an upload once its plan fits the federation's architecture and the member's limits: weights only
        from an expert's owner, statistics only once the weights of the node's expert are in."""
        record = self.ledger.member(member)
        if plan.kind == pb.UPLOAD_KIND_MODEL and not record.owner:
            raise Refused("permission", f"{member} contributes to expert {record.expert!r}, whose weights come from "
                          "its owner: a contributor sends statistics only (join without --model)")
        if plan.kind == pb.UPLOAD_KIND_STATISTICS and self.ledger.expert_owner(record.expert) is None:
            raise Refused("precondition", "upload the model before its statistics" if record.owner else
                          f"expert {record.expert!r} has no weights in the federation yet: wait for its owner")
        if plan.kind == pb.UPLOAD_KIND_STATISTICS:
            check_dataset_room(self.ledger, member, plan.statistics.dataset, self.limits.datasets_per_node)
        try:
            validation.check_plan(plan, self.ledger.get_meta("architecture"))
        except DumeError as error:
            raise Refused("invalid", str(error)) from None
        return self.uploads.begin(member, plan)

    def commit_upload(self, identity: pki.Identity, upload_id: str) -> tuple[str, str]:
        """Records a complete upload and asks for publication; returns the current basis hash ("" if none) and,
        for statistics held for the operator's approval, why ("" when recorded).

        The caller is authorised again inside the transaction that records the upload: a revocation or a leave
        landing while the upload is validated wins, and the upload is refused.
        """
        member = self.authorise(identity)
        planned = self.uploads.planned(member, upload_id)
        metrics = self.metrics
        recorded = commit_upload(self.ledger, self.uploads, self.settings, member, planned,
                                 lambda: self.authorise(identity),
                                 lambda: metrics.timed(metrics.statistics_validation_seconds))
        if recorded:  # a commit repeated because its answer was lost is not counted again
            kind = "model" if planned.plan.kind == pb.UPLOAD_KIND_MODEL else "statistics"
            metrics.uploads.labels(kind).inc()
            metrics.upload_bytes.labels(kind).inc(sum(planned.sizes.values()))
        self.publisher.request()
        held = (self.ledger.pending_contribution(member, planned.plan.statistics.dataset)
                if planned.plan.kind == pb.UPLOAD_KIND_STATISTICS else None)
        return self.ledger.get_meta("current_basis") or "", held[1] if held else ""

    # -- what is published ----------------------------------------------------------------------------------------
    def basis(self, basis_hash: str) -> BasisRecord:
        """The basis named, or the current one for ""."""
        record = self.ledger.basis(basis_hash or self.ledger.get_meta("current_basis") or "")
        if record is None:
            raise Refused("not_found", f"no basis {basis_hash[:12]}: ask for the current one")
        return record

    def version(self, number: int, reader: str = ADMIN_NAME) -> VersionRecord:
        """Version ``number``, or the latest for 0, if ``reader`` may read it (see ``may_read_version``)."""
        record = self.ledger.version(number)
        if record is None:
            raise Refused("not_found", f"version {number} is not published" if number
                          else "no version is published yet: wait until a member has uploaded statistics")
        if not self.may_read_version(reader, record.number, record.members):
            raise Refused("not_found", f"version {number} does not include {reader}: a member reads the latest "
                          "version and the versions it is part of")
        if record.pruned_at is not None:
            raise Refused("not_found", f"version {number} was pruned on "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(record.pruned_at))} (`dume-coordinator "
                          f"gc`): its blobs are deleted; fetch a later version, such as the latest "
                          f"({self.ledger.latest_version_number()})")
        return record

    def may_read_version(self, reader: str, number: int, members: list[str]) -> bool:
        """The admin reads every version; a member the latest and those it is part of, so a member that joins
        after a revocation never sees the earlier versions that still hold the revoked expert."""
        return reader == ADMIN_NAME or reader in members or number == self.ledger.latest_version_number()

    def may_read_blob(self, reader: str, sha256: str) -> bool:
        """A blob of any basis (averaged shared weights, which every node needs for its statistics), of the current
        weights of the expert the reader contributes to, or of a version the reader may read; no other blob."""
        if self.ledger.blob_in_basis(sha256) or sha256 in self._expert_blobs(reader):
            return True
        return any(self.may_read_version(reader, number, self.ledger.version_members(number))
                   for number in self.ledger.versions_with_blob(sha256))

    def published_blob(self, sha256: str, reader: str = ADMIN_NAME) -> Path:
        """Where a blob lies, if ``reader`` may read it."""
        if not self.may_read_blob(reader, sha256):
            raise Refused("not_found", f"blob {sha256[:12]} is in no basis or version {reader} may read")
        return self.blobs.path(sha256)

    def may_reuse_blob(self, member: str, sha256: str) -> bool:
        """Whether a blob the store already holds counts as sent for ``member``'s upload: only one the member
        uploaded itself or may read anyway. Naming another member's blob hash is not owning it: such a blob's
        bytes must be sent like any other."""
        if sha256 == EMPTY_SHA256 or self.may_read_blob(member, sha256):
            return True
        record = self.ledger.member(member)
        own = ({entry.sha256 for entry in record.model.tensors} | set(record.files.values())
               if record is not None and record.model is not None else set())
        for contribution in self.ledger.contributions(member):
            own |= {entry.sha256 for entry in contribution.manifest.tensors}
        return sha256 in own

    def expert(self, reader: str) -> tuple[str, pb.Expert]:
        """The current weights of the expert ``reader`` contributes to: ``(hash, message)``."""
        owner = self._expert_of(reader)
        if owner is None:
            record = self.ledger.member(reader)
            raise Refused("not_found", f"expert {record.expert if record else reader!r} has no weights in the "
                          "federation yet: wait for its owner to upload them")
        weights = self.ledger.expert_weights(owner)
        files = [pb.FileEntry(name=name, sha256=sha, size_bytes=self.blobs.path(sha).stat().st_size)
                 for name, sha in sorted(owner.files.items())]
        digest = expert_hash(weights)
        return digest, pb.Expert(name=owner.name, expert_hash=digest, manifest=weights, files=files)

    def _expert_blobs(self, reader: str) -> set[str]:
        """The blobs of the current weights of ``reader``'s expert (MLPs, config and tokenizer files), which its
        owner and contributors read before any version holds them; empty for the admin or an expert not in."""
        owner = self._expert_of(reader)
        if owner is None:
            return set()
        return {entry.sha256 for entry in self.ledger.expert_weights(owner).tensors} | set(owner.files.values())

    def _expert_of(self, node: str) -> Member | None:
        """The owner of the expert ``node`` contributes to, while that expert's weights are in the federation."""
        record = self.ledger.member(node)
        return self.ledger.expert_owner(record.expert) if record is not None else None

    def published(self, member: str = "") -> Published:
        """What a watching node is told; with ``member``, also its expert's current weights and its datasets that
        were taken out."""
        latest = self.ledger.version()
        # While a model just recorded waits for the publisher, no basis is named: statistics under the previous one
        # (with the new weights) would be stale at once.
        experts = self.ledger.experts()
        current = self.ledger.get_meta("current_basis") if basis_is_current(self.ledger, experts) else None
        basis = self.ledger.basis(current or "")
        record = self.ledger.member(member) if member else None
        owner = experts.get(record.expert) if record is not None else None
        weights = expert_hash(self.ledger.expert_weights(owner)) if owner is not None else ""
        return Published(basis.hash if basis else "", basis.members if basis else [],
                         latest.number if latest else 0, bool(latest and latest.exact), weights,
                         self.ledger.removed_datasets(member) if member else [])

    @contextmanager
    def watching(self, member: str) -> Iterator[None]:
        """Counts the member online while its Watch stream is open; refuses a stream past the limits (each holds a
        server thread: see ``serve``)."""
        limits = self.limits
        with self._online_lock:
            if self._online[member] >= limits.watch_streams_per_member:
                raise Refused("exhausted", f"{member} already holds {self._online[member]} Watch streams, the most "
                              "a member may: close one (a node needs one), or wait until the stale one ends")
            if sum(self._online.values()) >= limits.watch_streams_total:
                raise Refused("exhausted", f"the coordinator serves {limits.watch_streams_total} Watch streams, its "
                              "limit: try again later, or ask its operator to raise limits.watch_streams_total")
            self._online[member] += 1
        try:
            yield
        finally:
            with self._online_lock:
                self._online[member] -= 1

    @contextmanager
    def transferring(self, reader: str) -> Iterator[None]:
        """Holds one of the reader's transfer slots (SendChunks, ReadBlob) while its stream is open: each holds a
        server thread, so one member cannot take the threads every other call needs. The admin is not limited."""
        with self._online_lock:
            if reader != ADMIN_NAME and self._transfers[reader] >= self.limits.transfers_per_member:
                raise Refused("exhausted", f"{reader} already has {self._transfers[reader]} transfers open, the most "
                              "a member may: finish them first (a node sends or reads two blob streams at a time)")
            self._transfers[reader] += 1
        try:
            yield
        finally:
            with self._online_lock:
                self._transfers[reader] -= 1

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def _probe_routing(self, version: int) -> None:
        if self.prober is not None:
            self.prober.request(version)

    def notify(self) -> None:
        """Wakes every watcher: something published may have changed."""
        with self._changed:
            self._changed.notify_all()

    # -- administration -------------------------------------------------------------------------------------------
    def status(self) -> Status:
        current = self.ledger.get_meta("current_basis") or ""
        weights = self.ledger.expert_hashes()
        contributions = self.ledger.contributions()

        def is_current(c: Contribution) -> bool:
            return c.basis_hash == current and c.expert_hash == weights.get(c.expert)

        pending = self.ledger.pending_contributions()
        members, everyone = [], self.ledger.members()
        for member in everyone:
            own = [c for c in contributions if c.node == member.name]
            held = any(c.node == member.name for c, _ in pending)  # in no version until the operator approves
            members.append(MemberStatus(
                name=member.name, state=member.state, online=self._online[member.name] > 0,
                # A contributor left without datasets has nothing to recompute; an owner has its own data.
                stats_current=(bool(own) or not member.owner) and not held and all(is_current(c) for c in own),
                reason=member.reason,
                token_count=sum(c.token_count for c in own), expert=member.expert or member.name))
        current_members = [m for m in everyone if m.state in ("enrolled", "active")]  # sorted by name
        experts = [ExpertStatus(
            name=owner.name, owner=owner.name, expert_hash=weights.get(owner.name, ""),
            contributors=[m.name for m in current_members if m.expert == owner.name and not m.owner],
            contributions=[ContributionStatus(c.node, c.dataset, c.token_count, c.basis_hash, is_current(c))
                           for c in contributions if c.expert == owner.name],
            pending=[ContributionStatus(c.node, c.dataset, c.token_count, c.basis_hash, is_current(c))
                     for c, _ in pending if c.expert == owner.name])
            for owner in current_members if owner.owner]
        latest = self.ledger.version()
        probe = self.ledger.routing_probe() if self.prober is not None else None
        routing = RoutingStatus(probe, self.prober.settings.flag_ratio) if probe is not None else None
        return Status(latest.number if latest else 0, bool(latest and latest.exact), current, members,
                      self.ledger.audit_length(), asdict(self.settings), self.publisher.error, experts,
                      latest.contributions if latest else [], routing)

    def audit_entries(self) -> list[AuditEntry]:
        return self.ledger.audit_entries()

    def collect_garbage(self, prune_before: int, dry_run: bool) -> GarbageReport:
        """Deletes what nothing needs (see ``gc``), with publication paused; versions below ``prune_before`` go too."""
        latest = self.ledger.latest_version_number()
        if prune_before < 0 or prune_before > latest:
            raise Refused("invalid", f"cannot prune the versions before {prune_before}: the latest is "
                          f"{latest or 'none'}, and it is always kept; give a number from 1 to the latest")
        with self.publisher.paused():
            return gc.collect(self.ledger, self.blobs, self.uploads, prune_before, dry_run)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _publish_without(self, member: str, contribution: str = "") -> Removal:
        """Runs publication for a member (or one of its contributions, "node/dataset") just taken out, and checks
        that the latest version no longer contains it: a removal is reported done only when what is served is
        without it."""
        self.publisher.wait(self.publisher.request())
        latest = self.ledger.version()
        if latest is None or (contribution not in latest.contributions if contribution
                              else member not in latest.members):
            return Removal(latest.number if latest else 0)
        why = self.publisher.error or "no other contribution remains"
        return Removal(0, f"version {latest.number}, the latest, still contains {contribution or member}: no "
                          f"version without it was published ({why})")

    def begin_drain(self) -> None:
        """Ends every Watch stream at its next poll."""
        self.stopping = True
        self.notify()

    def _expire_uploads(self) -> None:
        """Deletes stale uploads a few times per expiry period, for as long as the coordinator runs."""
        every = min(self.limits.staging_expiry_seconds / 4, 600.0)
        while not self._closing.wait(every):
            try:
                self.uploads.expire()
            except OSError as error:  # an unreadable staging directory must not end the daemon
                log.warning("cannot expire uploads: %s", error)

    def close(self) -> None:
        self._closing.set()
        self._expiry.join()
        self.publisher.stop()
        if self.prober is not None:
            self.prober.stop()
        self.ledger.close()
