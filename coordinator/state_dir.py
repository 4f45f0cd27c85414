"""The coordinator's state directory: where everything it owns lies, and ``init``, which creates it.

    config.json        listen and advertise addresses, federation settings, resource limits
    ca/key.pem         the federation's CA key (owner-only); ca/cert.pem is also the TLS server certificate
    admin/             the admin identity that ``token``, ``status``, ``revoke`` and ``export`` present
    ledger.sqlite      metadata, ledger and audit log (WAL)
    blobs/             content-addressed tensors and files
    uploads/           staging of uploads in progress
    daemon.json        written by ``serve``: its pid and the addresses it is bound to
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dume.coordinator.limits import Limits
from dume.shared.errors import CoordinatorUnreachable, DumeError
from dume.shared.method.settings import LEGACY_EXPERT_WEIGHTING, MergeSettings
from dume.shared.trust import pki

ADMIN_NAME = "admin"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "cert.pem"

    @property
    def admin_key(self) -> Path:
        return self.root / "admin" / "key.pem"

    @property
    def admin_cert(self) -> Path:
        return self.root / "admin" / "cert.pem"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def daemon(self) -> Path:
        return self.root / "daemon.json"

    def config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise DumeError(f"{self.root} is not a coordinator state directory: run `dume-coordinator init --state "
                            f"{self.root}` first")
        return json.loads(self.config_path.read_text())

    def update_config(self, **changes: Any) -> None:
        current = self.config() if self.config_path.is_file() else {}
        pki.write_private(self.config_path, (json.dumps({**current, **changes}, indent=2, sort_keys=True)
                                             + "\n").encode())

    def settings(self) -> MergeSettings:
        """The federation's merge settings; one initialised before ``expert_weighting`` existed keeps solving as it
        did (``tokens``), so an upgrade never changes the bytes of its next version."""
        return MergeSettings(**{"expert_weighting": LEGACY_EXPERT_WEIGHTING, **self.config()["settings"]})

    def limits(self) -> Limits:
        return Limits.from_config(self.config().get("limits"))

    def daemon_addresses(self) -> dict[str, str]:
        """Where the running daemon listens (from daemon.json, which ``serve`` writes once bound)."""
        try:
            return json.loads(self.daemon.read_text())
        except (OSError, ValueError):
            raise CoordinatorUnreachable(f"no coordinator daemon is running on {self.root}: start `dume-coordinator "
                                         f"serve --state {self.root}`") from None


def split_address(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if not (colon and host and port.isdigit() and int(port) < 65536):
        raise DumeError(f"address {value!r} is not HOST:PORT")
    return host, int(port)


def initialise(root: Path, listen: str, enrolment_listen: str, advertise: str | None,
               enrolment_advertise: str | None, settings: MergeSettings,
               architecture: dict[str, Any] | None) -> StateDir:
    """Creates a new state directory with its CA and admin identity; refuses to overwrite one."""
    state = StateDir(root)
    if root.exists() and not root.is_dir():
        raise DumeError(f"--state {root} is a file, not a directory: choose a new or empty directory")
    if state.config_path.exists():
        raise DumeError(f"{root} already holds a coordinator: use another --state or remove it first")
    for address in (listen, enrolment_listen, advertise, enrolment_advertise):
        if address is not None:
            split_address(address)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    ca_key, ca_cert = pki.create_authority()
    pki.write_private(state.ca_key, ca_key)
    pki.write_private(state.ca_cert, ca_cert)
    admin_key = pki.create_private_key()
    admin_cert, _ = pki.sign_csr(ca_key, ca_cert, pki.create_csr(admin_key, ADMIN_NAME), ADMIN_NAME, "admin",
                                 days=3650)
    pki.write_private(state.admin_key, admin_key)
    pki.write_private(state.admin_cert, admin_cert)
    config = {
        "listen": listen,
        "enrolment_listen": enrolment_listen,
        "advertise": advertise,
        "enrolment_advertise": enrolment_advertise,
        "settings": asdict(settings),
        "architecture": architecture,
        "limits": asdict(Limits()),
    }
    state.update_config(**config)
    return state
