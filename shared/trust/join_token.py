"""The one-line join token an operator copies from the coordinator to a new node.

Why one line: it is pasted through chat or a terminal, so it carries everything a node needs to enrol safely in a
single copyable string: where to connect, the CA fingerprint to pin (so no address or public CA is trusted), the name
the node will get and a one-time secret. The coordinator keeps only the secret's digest, so a leaked coordinator
state cannot be replayed as tokens. Expiry is checked by the coordinator, whose clock is the one that counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, fields

from dume.shared.errors import DumeError

PREFIX = "dume1."
_HINT = "copy the whole line printed by `dume-coordinator token`"


@dataclass(frozen=True)
class JoinToken:
    """Everything a node needs to enrol with a coordinator it has never talked to."""

    coordinator: str  # host:port of the mutual-TLS service
    enrolment: str  # host:port of the enrolment service (server-TLS only)
    ca_fingerprint: str  # lowercase hex SHA-256 of the CA certificate's DER
    node: str  # the name the CA will put in the node's certificate
    secret: str  # one-time secret; the coordinator stores only secret_digest(secret)
    expires_at: float  # unix seconds
    expert: str = ""  # the expert the node contributes to: its own (= node) or an existing one; "" in old tokens

    def __post_init__(self) -> None:
        if not self.expert:
            object.__setattr__(self, "expert", self.node)

    def encode(self) -> str:
        """``dume1.`` + unpadded base64url of compact JSON with sorted keys."""
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse a token; every failure is a one-line DumeError. Expiry is deliberately not checked here."""
        text = text.strip()
        if not text.startswith(PREFIX):
            raise DumeError(f"this is not a dume join token (it should start with {PREFIX!r}): {_HINT}")
        body = text[len(PREFIX) :]
        try:
            raw = base64.b64decode(body.encode("ascii") + b"=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise DumeError(f"the join token is malformed (bad base64): {_HINT}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise DumeError(f"the join token is malformed (bad JSON): {_HINT}") from None
        if not isinstance(data, dict):
            raise DumeError(f"the join token is malformed (not a JSON object): {_HINT}")
        values = {}
        data.setdefault("expert", data.get("node"))  # a token from before experts: the node owns its expert
        for spec in fields(cls):
            if spec.name not in data:
                raise DumeError(f"the join token is malformed (missing {spec.name}): {_HINT}")
            value = data[spec.name]
            if spec.name == "expires_at":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:
                ok = isinstance(value, str) and bool(value)
            if not ok:
                raise DumeError(f"the join token is malformed ({spec.name} has the wrong type): {_HINT}")
            values[spec.name] = value
        return cls(**values)

    @property
    def contributor(self) -> bool:
        """Whether the node joins another node's expert (sending statistics only, no weights)."""
        return self.expert != self.node

    def expired(self, now: float | None = None) -> bool:
        """Whether the token is past its expiry at ``now`` (default: this machine's clock)."""
        return (time.time() if now is None else now) >= self.expires_at


def new_secret() -> str:
    """A fresh one-time enrolment secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """Hex SHA-256 of a secret: what the coordinator stores and compares (with hmac.compare_digest)."""
    return hashlib.sha256(secret.encode()).hexdigest()
