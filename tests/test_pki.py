# grpcio 1.85.1: with require_client_auth=False auth_context() never has the client's cert, even if one is offered.
"""The federation CA, the join token and, above all, that gRPC mutual TLS really admits only this CA's certificates."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dume.shared.errors import DumeError
from dume.shared.trust.join_token import JoinToken, new_secret, secret_digest
from dume.shared.trust.pki import (
    TLS_SERVER_NAME,
    Identity,
    create_authority,
    create_csr,
    create_private_key,
    fingerprint,
    identity_of,
    read_bytes,
    sign_csr,
    write_private,
)

WHOAMI = "/dume.test.Probe/WhoAmI"


@pytest.fixture(scope="module")
def authority() -> tuple[bytes, bytes]:
    return create_authority()


@pytest.fixture(scope="module")
def other_authority() -> tuple[bytes, bytes]:
    return create_authority()


def enrol(authority: tuple[bytes, bytes], name: str, role: str = "node") -> tuple[bytes, bytes]:
    """(key_pem, cert_pem) for a client, as the enrolment service would issue it."""
    key = create_private_key()
    cert, _ = sign_csr(*authority, create_csr(key, name), name, role)
    return key, cert


# --- certificate authority ---------------------------------------------------------------------------------------


def test_authority_certificate_is_a_ca_and_a_server_certificate(authority):
    cert = x509.load_pem_x509_certificate(authority[1])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == TLS_SERVER_NAME
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and usage.digital_signature
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [TLS_SERVER_NAME]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650


def test_ca_chooses_the_subject_whatever_the_request_asks(authority):
    key = create_private_key()
    csr = create_csr(key, "admin-please")
    cert_pem, serial = sign_csr(*authority, csr, "hospital-a", "node")
    assert identity_of(cert_pem) == Identity(name="hospital-a", role="node", serial=serial)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "dume-node"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ca = x509.load_pem_x509_certificate(authority[1])
    cert.verify_directly_issued_by(ca)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    # The issued certificate is for the requester's key, not a key the CA made up.
    requester = serialization.load_pem_private_key(key, None).public_key()
    assert cert.public_key() == requester

    admin_pem, admin_serial = sign_csr(*authority, csr, "ops", "admin")
    assert identity_of(admin_pem) == Identity("ops", "admin", admin_serial)
    assert admin_serial != serial


def test_unknown_role_and_foreign_certificates_are_refused(authority):
    with pytest.raises(DumeError):
        sign_csr(*authority, create_csr(create_private_key(), "x"), "x", "root")
    # The CA certificate itself carries no dume role, so it can never pass as a node.
    with pytest.raises(DumeError, match="no dume role"):
        identity_of(authority[1])


def test_fingerprint_is_stable_and_distinguishes_authorities(authority, other_authority):
    first = fingerprint(authority[1])
    assert first == fingerprint(authority[1]) == fingerprint(authority[1] + b"\n")
    assert len(first) == 64 and first == first.lower() and int(first, 16) >= 0
    der = x509.load_pem_x509_certificate(authority[1]).public_bytes(serialization.Encoding.DER)
    assert first == hashlib.sha256(der).hexdigest()
    assert first != fingerprint(other_authority[1])


def _forged_csr(claimed_key: ec.EllipticCurvePrivateKey, signing_key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR that carries claimed_key's public key but is signed by signing_key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    honest = x509.CertificateSigningRequestBuilder().subject_name(name).sign(signing_key, hashes.SHA256())
    der = honest.public_bytes(serialization.Encoding.DER)
    # Splice the other key's SubjectPublicKeyInfo in place of the signer's (same length for two P-256 keys).
    signer_spki = signing_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claimed_spki = claimed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(signer_spki) == len(claimed_spki) and der.count(signer_spki) == 1
    forged = x509.load_der_x509_csr(der.replace(signer_spki, claimed_spki))
    assert forged.public_key() == claimed_key.public_key()
    return forged.public_bytes(serialization.Encoding.PEM)


def test_tampered_request_is_refused(authority):
    victim, attacker = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(DumeError, match="not validly signed") as caught:
        sign_csr(*authority, _forged_csr(victim, attacker), "forged", "node")
    assert "\n" not in str(caught.value)
    with pytest.raises(DumeError):
        garbage = b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
        sign_csr(*authority, garbage, "x", "node")


def test_weak_request_keys_are_refused(authority):
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(weak, hashes.SHA256())
    with pytest.raises(DumeError, match="unsupported key"):
        sign_csr(*authority, csr.public_bytes(serialization.Encoding.PEM), "weak", "node")
    edwards_key = ed25519.Ed25519PrivateKey.generate()
    edwards = x509.CertificateSigningRequestBuilder().subject_name(name).sign(edwards_key, None)
    with pytest.raises(DumeError, match="unsupported key"):
        sign_csr(*authority, edwards.public_bytes(serialization.Encoding.PEM), "ed", "node")


# --- private files -----------------------------------------------------------------------------------------------


def test_write_private_is_owner_only_and_replaces(tmp_path):
    target = tmp_path / "state" / "node.key"
    write_private(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(target.parent).st_mode) == 0o700

    target.chmod(0o644)  # a replacement must not inherit the old file's looser mode
    before = os.stat(target).st_ino
    write_private(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert os.stat(target).st_ino != before  # a new file renamed into place, not rewritten in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["node.key"]  # no temporary left behind


def test_read_bytes_names_what_is_missing(tmp_path):
    (tmp_path / "present").write_bytes(b"ok")
    assert read_bytes(tmp_path / "present", "thing") == b"ok"
    with pytest.raises(DumeError, match=r"cannot read the CA key at .*missing\.pem") as caught:
        read_bytes(tmp_path / "missing.pem", "the CA key")
    assert "\n" not in str(caught.value)


# --- join token --------------------------------------------------------------------------------------------------


def _token(**changes) -> JoinToken:
    values = dict(
        coordinator="10.0.0.1:7443",
        enrolment="10.0.0.1:7444",
        ca_fingerprint="ab" * 32,
        node="hospital-a",
        secret=new_secret(),
        expires_at=1_900_000_000.5,
    )
    values.update(changes)
    return JoinToken(**values)


def test_token_round_trips():
    token = _token()
    text = token.encode()
    assert text.startswith("dume1.") and "=" not in text and "\n" not in text and " " not in text
    assert JoinToken.decode(f"  {text}\n") == token
    assert JoinToken.decode(_token(expires_at=2_000_000_000).encode()).expires_at == 2_000_000_000.0
    assert text == _token(secret=token.secret).encode()  # deterministic: sorted keys, compact JSON


def test_token_expiry_is_reported_not_enforced():
    token = _token(expires_at=time.time() - 60)
    assert JoinToken.decode(token.encode()) == token  # decode leaves expiry to the coordinator
    assert token.expired()
    assert not token.expired(now=token.expires_at - 1)
    assert token.expired(now=token.expires_at)


def test_secrets_are_fresh_and_stored_as_digests():
    first, second = new_secret(), new_secret()
    assert first != second and len(first) >= 43
    assert secret_digest(first) == secret_digest(first) != secret_digest(second)
    assert len(secret_digest(first)) == 64 and first not in secret_digest(first)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dume2." + _token().encode()[6:],  # wrong prefix
        _token().encode()[:-7],  # truncated
        _token().encode()[:6] + "!!!!",  # not base64
        "dume1." + _b64(b"not json"),
        "dume1." + _b64(b"[1, 2]"),
        "dume1." + _b64(b'{"coordinator": "a:1"}'),  # missing fields
    ],
)
def test_malformed_tokens_are_one_line_errors(text):
    with pytest.raises(DumeError) as caught:
        JoinToken.decode(text)
    message = str(caught.value)
    assert "\n" not in message and "dume-coordinator token" in message


def test_ill_typed_token_fields_are_refused():
    good = json.loads(base64.urlsafe_b64decode(_token().encode()[6:] + "=="))
    for field, bad in [("expires_at", "soon"), ("expires_at", True), ("node", 7), ("secret", "")]:
        with pytest.raises(DumeError, match=f"malformed \\({field}"):
            JoinToken.decode("dume1." + _b64(json.dumps({**good, field: bad}).encode()))


# --- gRPC mutual TLS ---------------------------------------------------------------------------------------------


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        return b"anonymous"
    identity = identity_of(certificates[0])
    return f"{identity.role}:{identity.name}".encode()


def _serve(authority: tuple[bytes, bytes], require_client_auth: bool) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(_who_am_i, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("dume.test.Probe", {"WhoAmI": handler})])
    key, cert = authority
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=cert if require_client_auth else None, require_client_auth=require_client_auth
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def mutual_server(authority):
    server, port = _serve(authority, require_client_auth=True)
    yield port
    server.stop(None)


def _call(port: int, trusted_ca: bytes, client: tuple[bytes, bytes] | None) -> bytes:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted_ca,
        private_key=client[0] if client else None,
        certificate_chain=client[1] if client else None,
    )
    options = [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        return channel.unary_unary(WHOAMI)(b"", timeout=3)


def test_node_certificate_is_admitted_and_identified(authority, mutual_server):
    assert _call(mutual_server, authority[1], enrol(authority, "hospital-a")) == b"node:hospital-a"
    assert _call(mutual_server, authority[1], enrol(authority, "ops", role="admin")) == b"admin:ops"


def test_certificate_from_another_ca_is_refused(authority, other_authority, mutual_server):
    with pytest.raises(grpc.RpcError) as caught:
        _call(mutual_server, authority[1], enrol(other_authority, "hospital-a"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(authority, mutual_server):
    with pytest.raises(grpc.RpcError) as caught:
        _call(mutual_server, authority[1], None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_refuses_the_server(authority, other_authority, mutual_server):
    with pytest.raises(grpc.RpcError) as caught:
        _call(mutual_server, other_authority[1], enrol(authority, "hospital-a"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_tls_only_port_does_not_see_client_certificates(authority):
    server, port = _serve(authority, require_client_auth=False)
    try:
        assert _call(port, authority[1], None) == b"anonymous"
        # A client that offers a valid certificate is still anonymous here: the server never asks for it.
        assert _call(port, authority[1], enrol(authority, "hospital-a")) == b"anonymous"
    finally:
        server.stop(None)
