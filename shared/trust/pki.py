"""The federation's certificate authority: the coordinator owns one self-signed CA and signs node and admin certs.

Why this shape: a node learns the coordinator's CA only through the fingerprint in its join token, so trust never
depends on a hostname or on a public CA. The coordinator's single certificate is both the CA and its TLS server
certificate, because Python 3.11's ssl module cannot hand us an unverified peer chain to pin an intermediate; the node
therefore pins the CA by fingerprint and uses that very certificate as the gRPC root. The subject of every certificate
the CA signs is chosen by the CA (never copied from the request), so the name a peer presents is the name the
coordinator gave it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dume.shared.errors import DumeError
from dume.shared.files import write_atomically

# The DNS name in the coordinator's certificate. Clients always connect with the gRPC option
# ("grpc.ssl_target_name_override", TLS_SERVER_NAME): the pinned CA fingerprint, not the address, is what is trusted.
TLS_SERVER_NAME = "dume-coordinator"

ROLES = ("node", "admin")
_ROLE_PREFIX = "dume-"
_AUTHORITY_DAYS = 3650
# Certificates are back-dated a little so that a peer whose clock runs slightly behind still accepts them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(key_pem: bytes, what: str):
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise DumeError(f"the {what} is not an unencrypted PEM private key: {error}") from None


def _load_cert(cert_pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise DumeError(f"the {what} is not a PEM certificate: {error}") from None


def create_authority() -> tuple[bytes, bytes]:
    """A new CA as (key_pem, cert_pem); the certificate doubles as the coordinator's TLS server certificate."""
    key = _new_ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=_AUTHORITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    """Lowercase hex SHA-256 of the certificate's DER: what a join token pins."""
    der = _load_cert(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def create_private_key() -> bytes:
    """A new EC P-256 key as unencrypted PKCS8 PEM (it stays on the machine that made it)."""
    return _key_pem(_new_ec_key())


def create_csr(key_pem: bytes, name: str) -> bytes:
    """A certificate request for key_pem; the CN is only a hint, since the CA sets the subject itself."""
    key = _load_key(key_pem, "private key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def request_key_digest(csr_pem: bytes) -> str:
    """Lowercase hex SHA-256 of the public key a CSR asks to certify (its DER SubjectPublicKeyInfo): the same key
    asking again is recognised, whatever the request's signature bytes (EC signatures differ each time)."""
    try:
        public_key = x509.load_pem_x509_csr(csr_pem).public_key()
    except ValueError as error:
        raise DumeError(f"the certificate request is not a PEM CSR: {error}") from None
    return _key_digest(public_key)


def certificate_key_digest(cert_pem: bytes) -> str:
    """``request_key_digest`` of the key a certificate certifies."""
    return _key_digest(_load_cert(cert_pem).public_key())


def _key_digest(public_key: object) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _check_request_key(public_key: object) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return
    kind = type(public_key).__name__
    raise DumeError(f"the certificate request uses an unsupported key ({kind}): use an EC or RSA-2048+ key")


def sign_csr(
    ca_key_pem: bytes, ca_cert_pem: bytes, csr_pem: bytes, name: str, role: str, days: int = 365
) -> tuple[bytes, int]:
    """Sign a client certificate as (cert_pem, serial); the subject is CN=name, O=dume-<role>, whatever the CSR says."""
    if role not in ROLES:
        raise DumeError(f"unknown certificate role {role!r}: use one of {', '.join(ROLES)}")
    if not name:
        raise DumeError("a certificate needs a non-empty name")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise DumeError(f"the certificate request is not a PEM CSR: {error}") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature) as error:
        valid, reason = False, str(error) or type(error).__name__
    else:
        reason = "the signature does not match its public key"
    if not valid:
        raise DumeError(f"the certificate request is not validly signed: {reason}")
    public_key = csr.public_key()
    _check_request_key(public_key)

    ca_key = _load_key(ca_key_pem, "CA key")
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    serial = x509.random_serial_number()
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ROLE_PREFIX + role),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), serial


@dataclass(frozen=True)
class Identity:
    """Who a client certificate names: the CA-chosen name, its role and the serial (for revocation)."""

    name: str
    role: str
    serial: int


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if not values:
        return None
    value = values[0].value
    return value.decode() if isinstance(value, bytes) else value


def identity_of(cert_pem: bytes) -> Identity:
    """The identity a peer certificate carries (the caller has already had TLS verify it against the CA)."""
    cert = _load_cert(cert_pem, "peer certificate")
    name = _attribute(cert, NameOID.COMMON_NAME)
    organization = _attribute(cert, NameOID.ORGANIZATION_NAME)
    if not name or not organization or not organization.startswith(_ROLE_PREFIX):
        raise DumeError("the certificate carries no dume role: enrol again to get a certificate from the coordinator")
    return Identity(name=name, role=organization[len(_ROLE_PREFIX) :], serial=cert.serial_number)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even briefly, and replaces path atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # mkdir's mode is filtered through the umask
    write_atomically(path, data, mode=0o600)


def read_bytes(path: Path, what: str) -> bytes:
    """The contents of path, or a one-line DumeError that names what was being read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DumeError(f"cannot read {what} at {path} ({type(error).__name__}): {error.strerror or error}") from None
