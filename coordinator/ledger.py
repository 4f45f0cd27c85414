"""The coordinator's ledger: SQLite in WAL mode for tokens, members, contributions, bases, versions and the audit log.

A member (a node) contributes to one expert: its own (``expert`` equal to its name: the owner, whose model row holds
the expert's weights) or, admitted by its token, another node's. A contribution is the statistics of one named
dataset of one node toward its expert, one row each; a dataset taken out leaves a row in ``removed_datasets`` so
that a stale process cannot bring it back under the same name.

Tensors are not in the database: rows hold serialized messages (a member's ``UploadPlan``, ``TensorManifest``s, a
version's file list) naming content-addressed blobs in ``state/blobs``. A blob is adopted into the blob store
before the row that refers to it is committed, so a kill at any instant leaves at worst an unreferenced blob,
never a row naming a missing or partial one. One connection is shared by the daemon's threads behind a lock;
every change is one transaction. Rows come back as the typed records of ``records``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from dume.coordinator import messages
from dume.coordinator.records import (
    BasisRecord,
    BlobUse,
    Contribution,
    Member,
    RoutingProbeRecord,
    VersionFile,
    VersionRecord,
)
from dume.shared.method.expert_weights import expert_hash, expert_manifest
from dume.shared.method.families import detect_family
from dume.shared.method.settings import DEFAULT_DATASET
from dume.shared.trust.audit import GENESIS, AuditEntry, canonical_json, entry_hash
from dume.v1 import federation_pb2, tensors_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY, node TEXT NOT NULL, expires_at REAL NOT NULL, used_at REAL, expert TEXT,
    certificate BLOB);
CREATE TABLE IF NOT EXISTS members (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, role TEXT NOT NULL DEFAULT 'node', cert_serial TEXT,
    reason TEXT NOT NULL DEFAULT '', model BLOB, joined_at REAL, expert TEXT);
CREATE TABLE IF NOT EXISTS contributions (
    node TEXT NOT NULL, dataset TEXT NOT NULL, expert TEXT NOT NULL, basis_hash TEXT NOT NULL,
    expert_hash TEXT NOT NULL, token_count INTEGER NOT NULL, manifest BLOB NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (node, dataset));
CREATE TABLE IF NOT EXISTS pending_contributions (
    node TEXT NOT NULL, dataset TEXT NOT NULL, expert TEXT NOT NULL, basis_hash TEXT NOT NULL,
    expert_hash TEXT NOT NULL, token_count INTEGER NOT NULL, manifest BLOB NOT NULL, at REAL NOT NULL,
    reason TEXT NOT NULL, PRIMARY KEY (node, dataset));
CREATE TABLE IF NOT EXISTS removed_datasets (
    node TEXT NOT NULL, dataset TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (node, dataset));
CREATE TABLE IF NOT EXISTS bases (
    hash TEXT PRIMARY KEY, members TEXT NOT NULL, manifest BLOB NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    number INTEGER PRIMARY KEY, exact INTEGER NOT NULL, basis_hash TEXT NOT NULL, members TEXT NOT NULL,
    files BLOB NOT NULL, fingerprint TEXT NOT NULL, at REAL NOT NULL, pruned_at REAL,
    contributions TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS published_blobs (sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS basis_blobs (sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS version_blobs (
    sha256 TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (sha256, version));
CREATE TABLE IF NOT EXISTS routing_probes (
    version INTEGER PRIMARY KEY, experts TEXT NOT NULL, per_layer TEXT NOT NULL, tokens INTEGER NOT NULL,
    error TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    sequence INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    detail_json TEXT NOT NULL, previous_hash TEXT NOT NULL, entry_hash TEXT NOT NULL);
"""


def is_expert_owner(member: Member) -> bool:
    """An active owner whose weights are recorded: its expert is in the versions published now."""
    return member.state == "active" and member.owner and member.model is not None


class StateChanged(Exception):
    """A conditional change found the row in another state than it expected: someone else's change came first."""


class Ledger:
    """The one owner of the coordinator's durable state (besides the blobs its rows name)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._index_blobs()

    def _add_missing_columns(self) -> None:
        """Brings a ledger written by an earlier version up to the schema (columns added since)."""
        added = {"versions": ("pruned_at REAL", "contributions TEXT NOT NULL DEFAULT '[]'"),
                 "members": ("expert TEXT",), "tokens": ("expert TEXT", "certificate BLOB")}
        with self.transaction():
            for table, columns in added.items():
                present = {row[1] for row in self._rows(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in present:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            self._db.execute("UPDATE members SET expert = name WHERE expert IS NULL")  # each member its own expert
            if self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'statistics'"):
                self._migrate_member_statistics()

    def _migrate_member_statistics(self) -> None:
        """A ledger from before contributions held one statistics row per member: each becomes the member's
        contribution of its dataset ``default`` to its own expert (what its node calls an unnamed --data), made
        with the expert weights the member's model row holds."""
        for member, basis_hash, count, manifest, at in self._rows(
                "SELECT member, basis_hash, token_count, manifest, at FROM statistics"):
            record = self.member(member)
            weights = self.expert_weights(record) if record is not None else None
            self._db.execute("INSERT OR REPLACE INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (member, DEFAULT_DATASET, member, basis_hash,
                              expert_hash(weights) if weights is not None else "", count, manifest, at))
        self._db.execute("DROP TABLE statistics")

    def _index_blobs(self) -> None:
        """Fills the blob indexes of a ledger written before they existed (once: they are kept from then on)."""
        if (self._rows("SELECT 1 FROM basis_blobs LIMIT 1") or self._rows("SELECT 1 FROM version_blobs LIMIT 1")
                or not self._rows("SELECT 1 FROM bases LIMIT 1")):
            return
        with self.transaction():
            for (manifest,) in self._rows("SELECT manifest FROM bases"):
                self._index_basis(tensors_pb2.TensorManifest.FromString(manifest))
            for (number, files) in self._rows("SELECT number, files FROM versions"):
                self._index_version(number, messages.file_list(federation_pb2.Version.FromString(files)))

    def _index_basis(self, manifest: tensors_pb2.TensorManifest) -> None:
        self._db.executemany("INSERT OR IGNORE INTO basis_blobs VALUES (?)", [(e.sha256,) for e in manifest.tensors])

    def _index_version(self, number: int, files: list[VersionFile]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO version_blobs VALUES (?, ?)",
                             [(sha, number) for file in files for sha in file.blob_hashes()])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Holds off every other thread's reads and changes across several transactions (``gc`` deletes files after
        its rows stop naming them, and nothing may adopt them in between)."""
        with self._lock:
            yield

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All changes inside commit together or not at all (nested uses join the outer transaction)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a COMMIT that failed (a disk error) must not leave it open
                        with suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as error:
                raise self._write_failure(error) from error

    def _write_failure(self, error: sqlite3.OperationalError) -> Exception:
        """SQLite reports a write the system refused as "disk I/O error", without the reason; a probe write beside
        the ledger finds it (a read-only or full filesystem: the ``OSError`` the caller can name to the operator).
        Any other error is returned as it is."""
        if getattr(error, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_IOERR:
            return error
        try:
            with tempfile.TemporaryFile(dir=self._path.parent) as probe:
                probe.write(b"\0")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as cause:
            return cause
        return error

    def _rows(self, sql: str, *args: Any) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _run(self, sql: str, *args: Any) -> int:
        """Runs one statement in a transaction; returns the number of rows it changed."""
        with self.transaction():
            return self._db.execute(sql, args).rowcount

    # -- settings -------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", key)
        return json.loads(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: Any) -> None:
        self._run("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", key, json.dumps(value, sort_keys=True))

    # -- tokens ---------------------------------------------------------------------------------------------------
    def add_token(self, digest: str, node: str, expert: str, expires_at: float) -> None:
        self._run("INSERT INTO tokens (digest, node, expert, expires_at) VALUES (?, ?, ?, ?)",
                  digest, node, expert, expires_at)

    def token(self, digest: str) -> tuple[str, str, float, float | None] | None:
        """``(node, expert, expires_at, used_at)``; a token from before experts makes the node its own expert."""
        rows = self._rows("SELECT node, COALESCE(expert, node), expires_at, used_at FROM tokens WHERE digest = ?",
                          digest)
        return rows[0] if rows else None

    def use_token(self, digest: str, at: float, certificate: bytes) -> None:
        """Marks the token used and keeps the certificate it was exchanged for, to answer a retry of that same
        exchange whose answer was lost on the way."""
        self._run("UPDATE tokens SET used_at = ?, certificate = ? WHERE digest = ?", at, certificate, digest)

    def token_certificate(self, digest: str) -> bytes | None:
        rows = self._rows("SELECT certificate FROM tokens WHERE digest = ?", digest)
        return rows[0][0] if rows and rows[0][0] is not None else None

    # -- members --------------------------------------------------------------------------------------------------
    _MEMBER_COLUMNS = "name, state, cert_serial, reason, model, expert"

    def member(self, name: str) -> Member | None:
        rows = self._rows(f"SELECT {self._MEMBER_COLUMNS} FROM members WHERE name = ?", name)
        return self._member(rows[0]) if rows else None

    def members(self) -> list[Member]:
        rows = self._rows(f"SELECT {self._MEMBER_COLUMNS} FROM members ORDER BY name")
        return [self._member(row) for row in rows]

    @staticmethod
    def _member(row: tuple) -> Member:
        name, state, serial, reason, model, expert = row
        if model is None:
            return Member(name, state, serial, reason, None, {}, expert)
        plan = federation_pb2.UploadPlan.FromString(model)
        return Member(name, state, serial, reason, plan.manifest, messages.file_hashes(plan), expert)

    def active_members(self) -> list[Member]:
        return [member for member in self.members() if member.state == "active"]

    def experts(self) -> dict[str, Member]:
        """Expert name -> its owner, for every active owner whose weights are recorded: the experts of a version."""
        return {member.name: member for member in self.members() if is_expert_owner(member)}

    def expert_owner(self, expert: str) -> Member | None:
        """The owner of ``expert`` if it is one of ``experts`` (one row read, not every member's)."""
        owner = self.member(expert)
        return owner if owner is not None and is_expert_owner(owner) else None

    def expert_weights(self, owner: Member) -> tensors_pb2.TensorManifest | None:
        """The MLP manifest of an owner's recorded model (None before its upload)."""
        if owner.model is None:
            return None
        family = detect_family(self.get_meta("architecture")["config"])
        return expert_manifest(owner.model, family)

    def expert_hashes(self) -> dict[str, str]:
        """Expert name -> the hash of its current weights, for every expert of ``experts``."""
        return {name: expert_hash(self.expert_weights(owner)) for name, owner in self.experts().items()}

    def enrol(self, name: str, cert_serial: str, expert: str) -> None:
        """A (re-)enrolled member starts over: a left member's old contributions are not reused, and the datasets
        it had taken out may be contributed again."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO members (name, state, cert_serial, joined_at, expert) VALUES (?, 'enrolled', ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET state = 'enrolled', cert_serial = excluded.cert_serial, "
                "reason = '', model = NULL, joined_at = excluded.joined_at, expert = excluded.expert",
                (name, cert_serial, time.time(), expert),
            )
            self._db.execute("DELETE FROM contributions WHERE node = ?", (name,))
            self._db.execute("DELETE FROM pending_contributions WHERE node = ?", (name,))
            self._db.execute("DELETE FROM removed_datasets WHERE node = ?", (name,))

    def enrol_again(self, name: str, cert_serial: str) -> None:
        """A member that lost its key gets a new certificate and keeps its contribution; the old one is refused."""
        self._run("UPDATE members SET cert_serial = ? WHERE name = ?", cert_serial, name)

    def set_model(self, name: str, plan: federation_pb2.UploadPlan) -> None:
        """Records a member's model as uploaded (its tensors and files), which makes the member active; only a
        member that is enrolled or active (never one revoked or gone)."""
        changed = self._run("UPDATE members SET state = 'active', model = ? WHERE name = ? "
                            "AND state IN ('enrolled', 'active')", plan.SerializeToString(deterministic=True), name)
        if changed != 1:
            raise StateChanged(f"member {name!r} is no longer enrolled or active")

    def set_state(self, name: str, state: str, expected: tuple[str, ...], reason: str = "") -> None:
        """Moves a member to ``state``, only from one of the ``expected`` states. A member that leaves or is revoked
        takes its contributions (recorded or held for approval) with it and, when it owns an expert, every
        contribution to that expert, whose contributors leave with it."""
        with self.transaction():
            placeholders = ", ".join("?" * len(expected))
            if self._run(f"UPDATE members SET state = ?, reason = ? WHERE name = ? AND state IN ({placeholders})",
                         state, reason, name, *expected) != 1:
                raise StateChanged(f"member {name!r} is not in state {' or '.join(expected)}")
            if state in ("left", "revoked"):
                self._run("DELETE FROM contributions WHERE node = ? OR expert = ?", name, name)
                self._run("DELETE FROM pending_contributions WHERE node = ? OR expert = ?", name, name)
                # An owner's contributors have nothing left to feed: their membership ends with its expert.
                self._run("UPDATE members SET state = 'left', reason = ? WHERE expert = ? AND name != ? "
                          "AND state IN ('enrolled', 'active')", f"its expert {name} is {state}", name, name)

    # -- contributions --------------------------------------------------------------------------------------------
    def set_contribution(self, contribution: Contribution) -> None:
        """Records (or replaces) one dataset's statistics: only for a node that is enrolled or active, toward the
        expert it contributes to, and for a dataset it has not taken out. A contributor becomes active with it."""
        with self.transaction():
            member = self.member(contribution.node)
            if member is None or member.state not in ("enrolled", "active") or member.expert != contribution.expert:
                raise StateChanged(f"node {contribution.node!r} does not contribute to {contribution.expert!r} now")
            if self._rows("SELECT 1 FROM removed_datasets WHERE node = ? AND dataset = ?", contribution.node,
                          contribution.dataset):
                raise StateChanged(f"dataset {contribution.dataset!r} of {contribution.node!r} was taken out of the "
                                   "federation; it is not taken back under that name")
            self._db.execute(
                "INSERT OR REPLACE INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (contribution.node, contribution.dataset, contribution.expert, contribution.basis_hash,
                 contribution.expert_hash, contribution.token_count,
                 contribution.manifest.SerializeToString(deterministic=True), time.time()),
            )
            self._db.execute("DELETE FROM pending_contributions WHERE node = ? AND dataset = ?",
                             (contribution.node, contribution.dataset))
            self._db.execute("UPDATE members SET state = 'active' WHERE name = ? AND state = 'enrolled'",
                             (contribution.node,))

    _CONTRIBUTION_COLUMNS = "node, dataset, expert, basis_hash, expert_hash, token_count, manifest"

    def contributions(self, node: str | None = None) -> list[Contribution]:
        """Every contribution recorded (or ``node``'s), in the canonical order: expert, node, dataset."""
        where, args = ("WHERE node = ? ", (node,)) if node is not None else ("", ())
        rows = self._rows(f"SELECT {self._CONTRIBUTION_COLUMNS} FROM contributions {where}"
                          "ORDER BY expert, node, dataset", *args)
        return [self._contribution(row) for row in rows]

    def contribution(self, node: str, dataset: str) -> Contribution | None:
        rows = self._rows(f"SELECT {self._CONTRIBUTION_COLUMNS} FROM contributions WHERE node = ? AND dataset = ?",
                          node, dataset)
        return self._contribution(rows[0]) if rows else None

    @staticmethod
    def _contribution(row: tuple) -> Contribution:
        node, dataset, expert, basis_hash, weights, count, manifest = row
        return Contribution(node, dataset, expert, basis_hash, weights, count,
                            tensors_pb2.TensorManifest.FromString(manifest))

    # -- contributions held for the operator's approval (limits.approve_tokens_above_ratio) -----------------------
    def hold_contribution(self, contribution: Contribution, reason: str) -> None:
        """Records (or replaces) a contribution that waits for approval: in no version until ``take_pending``."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO pending_contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (contribution.node, contribution.dataset, contribution.expert, contribution.basis_hash,
                 contribution.expert_hash, contribution.token_count,
                 contribution.manifest.SerializeToString(deterministic=True), time.time(), reason),
            )

    def pending_contributions(self) -> list[tuple[Contribution, str]]:
        """Every held contribution with why it was held, in the canonical order: expert, node, dataset."""
        rows = self._rows(f"SELECT {self._CONTRIBUTION_COLUMNS}, reason FROM pending_contributions "
                          "ORDER BY expert, node, dataset")
        return [(self._contribution(row[:-1]), row[-1]) for row in rows]

    def pending_contribution(self, node: str, dataset: str) -> tuple[Contribution, str] | None:
        """The contribution of ``node``'s ``dataset`` held for approval, with why (None when none is held)."""
        rows = self._rows(f"SELECT {self._CONTRIBUTION_COLUMNS}, reason FROM pending_contributions "
                          "WHERE node = ? AND dataset = ?", node, dataset)
        return (self._contribution(rows[0][:-1]), rows[0][-1]) if rows else None

    def datasets(self, node: str) -> set[str]:
        """The names of ``node``'s datasets recorded or held for approval: what its dataset limit counts."""
        return {row[0] for row in self._rows("SELECT dataset FROM contributions WHERE node = ? UNION "
                                             "SELECT dataset FROM pending_contributions WHERE node = ?", node, node)}

    def take_pending(self, node: str, dataset: str) -> Contribution | None:
        """Removes a held contribution and returns it (None when there is none)."""
        with self.transaction():
            rows = self._rows(f"SELECT {self._CONTRIBUTION_COLUMNS} FROM pending_contributions "
                              "WHERE node = ? AND dataset = ?", node, dataset)
            self._db.execute("DELETE FROM pending_contributions WHERE node = ? AND dataset = ?", (node, dataset))
        return self._contribution(rows[0]) if rows else None

    def refuse_dataset(self, node: str, dataset: str) -> None:
        """Takes a dataset out of the federation, whether or not a contribution of it is recorded (a refused one
        was only held): its node is told and stops sending it."""
        with self.transaction():
            self._db.execute("DELETE FROM contributions WHERE node = ? AND dataset = ?", (node, dataset))
            self._db.execute("INSERT OR REPLACE INTO removed_datasets VALUES (?, ?, ?)", (node, dataset, time.time()))

    def remove_dataset(self, node: str, dataset: str) -> None:
        """Takes one dataset's contribution out, recorded or held for approval, and remembers that it was (raises
        StateChanged when there is none)."""
        with self.transaction():
            removed = self._run("DELETE FROM contributions WHERE node = ? AND dataset = ?", node, dataset)
            removed += self._run("DELETE FROM pending_contributions WHERE node = ? AND dataset = ?", node, dataset)
            if not removed:
                raise StateChanged(f"node {node!r} has no dataset {dataset!r} in the federation")
            self._db.execute("INSERT OR REPLACE INTO removed_datasets VALUES (?, ?, ?)", (node, dataset, time.time()))

    def removed_datasets(self, node: str) -> list[str]:
        return [row[0] for row in self._rows("SELECT dataset FROM removed_datasets WHERE node = ? ORDER BY dataset",
                                             node)]

    # -- bases and versions ---------------------------------------------------------------------------------------
    def add_basis(self, record: BasisRecord) -> None:
        with self.transaction():
            self._db.execute(
                # The same basis recurs with other members when experts share their non-MLP weights: it then
                # names the members of its latest computation.
                "INSERT INTO bases (hash, members, manifest, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (hash) DO UPDATE SET members = excluded.members",
                (record.hash, json.dumps(record.members), record.manifest.SerializeToString(deterministic=True),
                 time.time()),
            )
            self._publish_blobs(entry.sha256 for entry in record.manifest.tensors)
            self._index_basis(record.manifest)

    def _publish_blobs(self, hashes: Iterable[str]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO published_blobs VALUES (?)", [(sha,) for sha in hashes])

    def blob_is_published(self, sha256: str) -> bool:
        """Whether a blob is part of some basis or version (the only blobs nodes and admins may read)."""
        return bool(self._rows("SELECT 1 FROM published_blobs WHERE sha256 = ?", sha256))

    def referenced_blobs(self) -> set[str]:
        """Every blob a row names: members' models and files, statistics, bases and versions (for backups)."""
        hashes = {row[0] for row in self._rows("SELECT sha256 FROM published_blobs")}
        for member in self.members():
            if member.model is not None:  # an enrolled member before its upload, or one whose model gc released
                hashes.update(entry.sha256 for entry in member.model.tensors)
            hashes.update(member.files.values())
        for contribution in self.contributions():
            hashes.update(entry.sha256 for entry in contribution.manifest.tensors)
        return hashes

    def basis(self, basis_hash: str) -> BasisRecord | None:
        rows = self._rows("SELECT hash, members, manifest FROM bases WHERE hash = ?", basis_hash)
        if not rows:
            return None
        found, members, manifest = rows[0]
        return BasisRecord(found, json.loads(members), tensors_pb2.TensorManifest.FromString(manifest))

    def add_version(self, exact: bool, basis_hash: str, members: list[str], files: list[VersionFile],
                    fingerprint: str, contributions: list[str]) -> int:
        """Records a published version: the nodes whose weights or statistics it holds (``members``) and its
        contributions ("node/dataset")."""
        with self.transaction():
            number = (self._rows("SELECT COALESCE(MAX(number), 0) FROM versions")[0][0]) + 1
            self._db.execute(
                "INSERT INTO versions (number, exact, basis_hash, members, files, fingerprint, at, contributions) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (number, int(exact), basis_hash, json.dumps(members),
                 messages.file_list_message(files).SerializeToString(deterministic=True), fingerprint, time.time(),
                 json.dumps(contributions)),
            )
            self._publish_blobs(sha for file in files for sha in file.blob_hashes())
            self._index_version(number, files)
        return number

    def blob_in_basis(self, sha256: str) -> bool:
        return bool(self._rows("SELECT 1 FROM basis_blobs WHERE sha256 = ?", sha256))

    def versions_with_blob(self, sha256: str) -> list[int]:
        return [number for (number,) in self._rows("SELECT version FROM version_blobs WHERE sha256 = ?", sha256)]

    def latest_version_number(self) -> int:
        return self._rows("SELECT COALESCE(MAX(number), 0) FROM versions")[0][0]

    def version_members(self, number: int) -> list[str]:
        rows = self._rows("SELECT members FROM versions WHERE number = ?", number)
        return json.loads(rows[0][0]) if rows else []

    def version(self, number: int = 0) -> VersionRecord | None:
        """Version ``number``, or the latest with 0 (never pruned: ``gc`` keeps the latest)."""
        sql = ("SELECT number, exact, basis_hash, members, files, fingerprint, at, pruned_at, contributions "
               "FROM versions")
        rows = self._rows(sql + " WHERE number = ?", number) if number else self._rows(sql + " ORDER BY number DESC")
        if not rows:
            return None
        number, exact, basis_hash, members, files, fingerprint, at, pruned_at, contributions = rows[0]
        return VersionRecord(number, bool(exact), basis_hash, json.loads(members),
                             messages.file_list(federation_pb2.Version.FromString(files)), fingerprint, at,
                             pruned_at, json.loads(contributions))

    # -- routing probes (each version's share of routing per expert on the operator's probe text) ----------------
    def record_routing_probe(self, probe: RoutingProbeRecord) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO routing_probes VALUES (?, ?, ?, ?, ?, ?)",
                             (probe.version, json.dumps(probe.experts), json.dumps(probe.per_layer), probe.tokens,
                              probe.error, time.time()))

    def routing_probe(self, version: int = 0) -> RoutingProbeRecord | None:
        """The probe of version ``version``, or the latest probe with 0."""
        sql = "SELECT version, experts, per_layer, tokens, error FROM routing_probes"
        rows = self._rows(sql + " WHERE version = ?", version) if version else self._rows(
            sql + " ORDER BY version DESC LIMIT 1")
        if not rows:
            return None
        number, experts, per_layer, tokens, error = rows[0]
        return RoutingProbeRecord(number, json.loads(experts), json.loads(per_layer), tokens, error)

    # -- garbage collection ---------------------------------------------------------------------------------------
    def blob_use(self, prune_before: int = 0) -> BlobUse:
        """Which blobs the ledger still needs, and which it names only through what ``gc`` may drop: members revoked
        or gone, versions numbered below ``prune_before`` (or pruned before), and bases nothing kept names.

        Kept: the models of enrolled and active members, every contribution (only theirs exist) and their held ones,
        every version not pruned, and the current basis with those the kept versions and statistics were made under.
        """
        live: set[str] = set()
        departed: dict[str, set[str]] = {}
        for member in self.members():
            blobs = ({entry.sha256 for entry in member.model.tensors} | set(member.files.values())
                     if member.model is not None else set())
            if member.state in ("enrolled", "active"):
                live |= blobs
            elif member.model is not None:
                departed[member.name] = blobs
        statistics = self.contributions()
        for record in statistics:
            live.update(entry.sha256 for entry in record.manifest.tensors)
        current_members = {member.name for member in self.members() if member.state in ("enrolled", "active")}
        for record, _ in self.pending_contributions():  # kept until approved or refused
            if record.node in current_members:
                live.update(entry.sha256 for entry in record.manifest.tensors)
        kept_bases = {self.get_meta("current_basis")} | {record.basis_hash for record in statistics}
        pruned: dict[int, set[str]] = {}
        pruning: list[int] = []
        for number, basis_hash, files, pruned_at in self._rows(
                "SELECT number, basis_hash, files, pruned_at FROM versions ORDER BY number"):
            blobs = {sha for file in messages.file_list(federation_pb2.Version.FromString(files))
                     for sha in file.blob_hashes()}
            if pruned_at is not None or number < prune_before:
                pruned[number] = blobs
                if pruned_at is None:
                    pruning.append(number)
            else:
                live |= blobs
                kept_bases.add(basis_hash)
        superseded: dict[str, set[str]] = {}
        for basis_hash, manifest in self._rows("SELECT hash, manifest FROM bases"):
            blobs = {entry.sha256 for entry in tensors_pb2.TensorManifest.FromString(manifest).tensors}
            if basis_hash in kept_bases:
                live |= blobs
            else:
                superseded[basis_hash] = blobs
        return BlobUse(live, departed, pruned, pruning, superseded)

    def forget(self, use: BlobUse, deleted: set[str]) -> None:
        """Drops the rows' claims on what ``gc`` deletes: marks the versions in ``use.pruning`` pruned, deletes the
        superseded bases, clears departed members' models, and takes ``deleted`` blobs out of the published set."""
        with self.transaction():
            at = time.time()
            self._db.executemany("UPDATE versions SET pruned_at = ? WHERE number = ?",
                                 [(at, number) for number in use.pruning])
            self._db.executemany("DELETE FROM version_blobs WHERE version = ?", [(n,) for n in use.pruned])
            self._db.executemany("DELETE FROM bases WHERE hash = ?", [(basis,) for basis in use.superseded])
            self._db.executemany("UPDATE members SET model = NULL WHERE name = ?", [(m,) for m in use.departed])
            self._db.executemany("DELETE FROM published_blobs WHERE sha256 = ?", [(sha,) for sha in deleted])
            self._db.execute("DELETE FROM basis_blobs")
            for (manifest,) in self._rows("SELECT manifest FROM bases"):
                self._index_basis(tensors_pb2.TensorManifest.FromString(manifest))

    # -- audit log ------------------------------------------------------------------------------------------------
    def audit(self, kind: str, subject: str, **detail: Any) -> None:
        with self.transaction():
            last = self._rows("SELECT sequence, entry_hash FROM audit ORDER BY sequence DESC LIMIT 1")
            sequence, previous = (last[0][0] + 1, last[0][1]) if last else (1, GENESIS)
            at, detail_json = time.time(), canonical_json(detail)
            digest = entry_hash(previous, sequence, at, kind, subject, detail_json)
            self._db.execute(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sequence, at, kind, subject, detail_json, previous, digest),
            )

    def audit_entries(self) -> list[AuditEntry]:
        return [AuditEntry(*row) for row in self._rows("SELECT * FROM audit ORDER BY sequence")]

    def audit_length(self) -> int:
        """How many entries the log holds (its last sequence number): what ``status`` shows, without reading a
        log that grows for the daemon's whole life."""
        return self._rows("SELECT COALESCE(MAX(sequence), 0) FROM audit")[0][0]
