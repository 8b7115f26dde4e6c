"""Registration certificates: a key and CSR made on the agent, signed by the control
plane's CA, usable for mutual TLS with certificates that `issue` makes."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from standby.errors import BadInput, NotFound
from standby.replication import tls


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    tls.init_ca(d)
    return d


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_key_and_csr_belong_together() -> None:
    key_pem, csr_pem = tls.make_key_and_csr("agent-a")
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent-a"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_signed_certificate_forces_the_name_and_carries_both_usages(ca_dir: Path) -> None:
    # The CSR asks for another CN: the control plane decides the name, not the agent.
    _key, csr_pem = tls.make_key_and_csr("someone-else")
    cert = x509.load_pem_x509_certificate(tls.sign_csr(ca_dir, csr_pem, "agent-a", days=30,
                                                       sans=["agent-a.example", "10.0.0.5"]))
    assert _cn(cert) == "agent-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agent-a.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= life.total_seconds() <= 30 * 86400 + 600
    ca_cert = x509.load_pem_x509_certificate((ca_dir / tls.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    # Default SAN: the name.
    cert2 = x509.load_pem_x509_certificate(tls.sign_csr(ca_dir, csr_pem, "agent-b"))
    assert cert2.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["agent-b"]
    assert cert2.serial_number != cert.serial_number


def test_a_tampered_csr_is_refused(ca_dir: Path) -> None:
    _key, csr_pem = tls.make_key_and_csr("aaaaaaaa")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"bbbbbbbb"))
    assert forged.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bbbbbbbb"
    with pytest.raises(BadInput, match="signature"):
        tls.sign_csr(ca_dir, forged.public_bytes(serialization.Encoding.PEM), "agent-a")


def test_garbage_and_non_p256_requests_are_refused(ca_dir: Path) -> None:
    with pytest.raises(BadInput, match="not a PEM CSR"):
        tls.sign_csr(ca_dir, "hello", "agent-a")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(rsa_key, hashes.SHA256()))
    with pytest.raises(BadInput, match="EC P-256"):
        tls.sign_csr(ca_dir, csr.public_bytes(serialization.Encoding.PEM), "agent-a")
    p384 = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(p384, hashes.SHA256()))
    with pytest.raises(BadInput, match="secp384r1"):
        tls.sign_csr(ca_dir, csr.public_bytes(serialization.Encoding.PEM), "agent-a")


def test_signing_without_a_ca_says_so(tmp_path: Path) -> None:
    _key, csr_pem = tls.make_key_and_csr("agent-a")
    with pytest.raises(NotFound, match="holds no CA"):
        tls.sign_csr(tmp_path / "nothing", csr_pem, "agent-a")


def test_fingerprint_is_sha256_of_the_der_from_any_encoding(ca_dir: Path) -> None:
    _key, csr_pem = tls.make_key_and_csr("agent-a")
    pem = tls.sign_csr(ca_dir, csr_pem, "agent-a")
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    want = hashlib.sha256(der).hexdigest()
    assert tls.fingerprint(pem) == tls.fingerprint(pem.decode()) == tls.fingerprint(der) == want
    with pytest.raises(BadInput):
        tls.fingerprint(b"not a certificate")


def test_a_csr_signed_certificate_does_mutual_tls_with_an_issued_one(tmp_path: Path, ca_dir: Path) -> None:
    """The whole point: the agent's own key + the CA-signed cert authenticate both ways."""
    key_pem, csr_pem = tls.make_key_and_csr("agent-a")
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    (agent_dir / "agent.key").write_bytes(key_pem)
    (agent_dir / "agent.crt").write_bytes(tls.sign_csr(ca_dir, csr_pem, "agent-a", sans=["127.0.0.1"]))
    client_ident = tls.Identity(agent_dir / "agent.crt", agent_dir / "agent.key", ca_dir / tls.CA_CERT)
    server_ident = tls.issue(ca_dir, "peer", sans=["127.0.0.1"])

    server_ctx = tls.server_context(server_ident)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            seen["peer"] = tls.peer_name(s)
            s.sendall(s.recv(5))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        ctx = tls.client_context(client_ident)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() == "TLSv1.3"
            s.sendall(b"hello")
            assert s.recv(5) == b"hello"
        t.join(10)
    finally:
        listener.close()
    assert seen["peer"] == "agent-a"
