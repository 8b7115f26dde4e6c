"""A small certificate authority and the TLS contexts of the data plane.

Replication runs over mutual TLS 1.3 only: the agent (server) and the sender (client)
each present a certificate issued by the deployment's CA, and each verifies the other's
against that CA alone (no system trust store). A peer with a certificate of another CA,
an expired one, or none at all is refused during the handshake.

Files (PEM): a CA directory holds `ca.key` (mode 0600) and `ca.crt`; `issue` writes
`NAME.key` (0600) and `NAME.crt` beside them (or into `out_dir`). Keys are ECDSA P-256.
Host certificates carry the host's DNS names and IP addresses as subjectAltName and
both serverAuth and clientAuth extended key usages, so one certificate serves an
agent's receiver and its sender. Nothing here logs or prints key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from standby.errors import BadInput, Conflict, NotFound

CA_KEY = "ca.key"
CA_CERT = "ca.crt"


@dataclass(frozen=True)
class Identity:
    """The three files a TLS end needs."""

    cert: Path
    key: Path
    ca: Path


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temporary file, fsync, rename) with `mode` from the start, so a
    secret is never readable by others, not even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, name: str = "Standby CA", days: int = 3650) -> Path:
    """Create a CA in `directory`; return the certificate's path. Refuses to overwrite."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise Conflict(f"{directory} already holds a CA ({CA_KEY}/{CA_CERT}); refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Standby")])
    now = _utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if not key_path.exists() or not cert_path.exists():
        raise NotFound(f"{directory} holds no CA ({CA_KEY} and {CA_CERT}); create one with `standby ca init`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise BadInput(f"{directory}: cannot read the CA files: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BadInput(f"{key_path}: not an EC private key")
    return cert, key


def parse_san(entry: str) -> x509.GeneralName:
    entry = entry.strip()
    if not entry:
        raise BadInput("empty subjectAltName entry")
    for prefix in ("IP:", "ip:"):
        if entry.startswith(prefix):
            entry = entry[len(prefix):]
    if entry.startswith(("DNS:", "dns:")):
        return x509.DNSName(entry[4:])
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    if not all(part and len(part) < 64 and all(c.isalnum() or c in "-_*" for c in part)
               for part in entry.split(".")):
        raise BadInput(f"subjectAltName {entry!r} is neither an IP address nor a DNS name")
    return x509.DNSName(entry)


def issue(ca_dir: Path, name: str, sans: list[str] | None = None, days: int = 825,
          out_dir: Path | None = None, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> Identity:
    """Issue a host certificate `name` (CN) with the given SANs (DNS names and IPs).

    Default SANs: `name` itself. `not_before`/`not_after` override the validity (tests
    make expired certificates with them)."""
    ca_dir = Path(ca_dir)
    out = Path(out_dir) if out_dir else ca_dir
    out.mkdir(parents=True, exist_ok=True)
    if not name or "/" in name or name.startswith("."):
        raise BadInput(f"certificate name {name!r} is not usable as a file name")
    key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
    if key_path.exists() or cert_path.exists():
        raise Conflict(f"{cert_path} or {key_path} already exists; refusing to overwrite")
    ca_cert, ca_key = _load_ca(ca_dir)
    alt_names = [parse_san(s) for s in (sans or [name])]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Standby")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(cert_path, key_path, ca_dir / CA_CERT)


def _base_context(purpose: int, ident: Identity) -> ssl.SSLContext:
    for what, path in (("certificate", ident.cert), ("key", ident.key), ("CA certificate", ident.ca)):
        if not Path(path).is_file():
            raise NotFound(f"TLS {what} {path} not found")
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ident.ca))
        ctx.load_cert_chain(certfile=str(ident.cert), keyfile=str(ident.key))
    except ssl.SSLError as exc:
        raise BadInput(f"cannot load TLS files ({ident.cert}, {ident.key}, {ident.ca}): "
                       f"{exc.reason or exc}") from None
    # Check the certificate of the peer against the CA's validity rules strictly.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(ident: Identity) -> ssl.SSLContext:
    """The agent's context: TLS 1.3, client certificate required and verified."""
    return _base_context(0, ident)


def client_context(ident: Identity, check_hostname: bool = True) -> ssl.SSLContext:
    """The sender's context: TLS 1.3, the agent's certificate verified against the CA and
    (by default) its SAN against the address dialed."""
    ctx = _base_context(1, ident)
    ctx.check_hostname = check_hostname
    return ctx


def describe_tls_error(exc: BaseException) -> str:
    """One line saying why a handshake failed, without key material."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the connection was cut"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").replace("_", " ").lower()
        hints = {
            "peer did not return a certificate": "the peer presented no client certificate",
            "tlsv13 alert certificate required": "the peer requires a client certificate and got none",
            "sslv3 alert certificate expired": "the peer refused our certificate: expired",
            "tlsv1 alert unknown ca": "the peer refused our certificate: issued by a CA it does not trust",
            "sslv3 alert bad certificate": "the peer refused our certificate",
            "wrong version number": "the peer does not speak TLS",
            "unsupported protocol": "the peer does not speak TLS 1.3",
            "tlsv1 alert protocol version": "the peer does not speak TLS 1.3",
        }
        return hints.get(reason, f"TLS error: {reason or exc}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError):
        return f"connection lost during the TLS handshake ({exc.strerror or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def hang_up(sock: socket.socket) -> None:
    """Shut down the TCP connection under `sock` (both directions), from any thread.

    Never `SSLSocket.shutdown` for this: it drops the TLS layer (`_sslobj = None`) before
    it shuts the socket, so a thread still reading that connection goes on reading the
    raw TLS records as if they were plaintext (a frame whose body is ciphertext: a
    checksum error that looks like corruption), and a thread still writing sends its
    plaintext unencrypted. Shutting the descriptor alone keeps TLS in place: a reader
    gets the data already received, then the end of the stream; a writer gets EPIPE."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def peer_name(sock: ssl.SSLSocket) -> str:
    """The CN of the verified peer certificate (for logs)."""
    cert = sock.getpeercert()
    if not cert:
        return "?"
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"


# ---------------------------------------------------------------- registration (CSR)
#
# An agent makes its key and a CSR; only the CSR travels to the control plane, which signs
# it with its CA. The private key never leaves the agent.


def make_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """(key_pem, csr_pem): a new ECDSA P-256 key and a CSR for CN=`name`, signed by that key."""
    if not name:
        raise BadInput("a certificate request needs a name")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def sign_csr(ca_dir: Path, csr_pem: bytes | str, name: str, days: int = 825,
             sans: list[str] | None = None) -> bytes:
    """Sign a certificate request with the CA in `ca_dir`; return the certificate (PEM).

    The CSR's own signature is checked (its sender holds the private key). Only its public
    key is used: the subject is forced to CN=`name` and the extensions are the same as
    `issue`'s (serverAuth + clientAuth, SANs = `sans` or `name`), whatever the CSR asks for."""
    if not name:
        raise BadInput("a certificate needs a name")
    try:
        csr = x509.load_pem_x509_csr(_as_bytes(csr_pem))
    except ValueError as exc:
        raise BadInput(f"the certificate request is not a PEM CSR: {exc}") from None
    if not csr.is_signature_valid:
        raise BadInput("the certificate request's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, (ec.EllipticCurvePublicKey,)):
        # The data plane is ECDSA throughout; refuse RSA/Ed25519 rather than mix.
        raise BadInput(f"the certificate request carries a {type(public_key).__name__}; an EC P-256 key is needed")
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise BadInput(f"the certificate request's key is on {public_key.curve.name}; P-256 (secp256r1) is needed")
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    alt_names = [parse_san(s) for s in (sans or [name])]
    now = _utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Standby")]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(cert_pem_or_der: bytes | str) -> x509.Certificate:
    """A certificate from PEM (text or bytes) or DER bytes."""
    data = _as_bytes(cert_pem_or_der)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise BadInput(f"not a certificate: {exc}") from None


def fingerprint(cert_pem_or_der: bytes | str) -> str:
    """SHA-256 of the certificate's DER, lowercase hex: how an agent is recognised (mTLS)."""
    return load_cert(cert_pem_or_der).fingerprint(hashes.SHA256()).hex()
