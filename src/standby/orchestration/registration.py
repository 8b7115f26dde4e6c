"""Agent registration and the control plane's own PKI.

    with store.transaction() as s:
        res = register(s, settings, key=..., name="agent-a", kind="agent", host="kvm-a",
                       site="site-a", server="sm-a", cloud="cloud-a", host_group=None,
                       address="10.0.0.5:7443", csr_pem=csr, version="0.1.0")

The agent makes its key and sends only a CSR (`tls.make_key_and_csr`); the control plane
checks the registration key, records the site, server and cloud the agent says it belongs
to, signs the CSR with its CA and records the certificate's fingerprint: from then on the
agent is recognised by that certificate (mTLS), never by the key it registered with.

`init_ca_and_server_cert(settings)` makes the CA and the HTTPS listener's certificate of a
data dir (`standby server init`); it is idempotent.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.errors import BadInput, Conflict
from standby.orchestration.settings import ServerSettings
from standby.replication import tls
from standby.store.models import Cloud, Server
from standby.store.repo import agents, inventory
from standby.store.repo._common import now_or

# A certificate CN, a file name on the agent, and a fabric Name: the safe intersection.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# HOST:PORT or [IPv6]:PORT
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")
PLATFORM = "kvm"  # agents are libvirt/KVM hosts (Hyper-V is readiness-only for now)


@dataclass(frozen=True)
class RegistrationResult:
    agent_id: int
    name: str
    cert_pem: str
    ca_pem: str
    heartbeat_seconds: float


def _check_name(what: str, value: str | None) -> str:
    if not value or not _NAME.match(value):
        raise BadInput(
            f"{what} {value!r} is not a valid name (1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit)"
        )
    return value


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a replication address `HOST:PORT` or `[IPv6]:PORT`."""
    m = _ADDRESS.match(address or "")
    if m is None:
        raise BadInput(f"replication address {address!r} is not HOST:PORT")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise BadInput(f"replication address {address!r}: port {port} is not between 1 and 65535")
    return (m.group("v6") or m.group("host")), port


def _redeem(session: Session, key: str, now: datetime) -> int:
    try:
        return agents.redeem_registration_key(session, key, now=now).id
    except agents.RegistrationRefused as e:
        if e.message == "unknown registration key" and key.startswith("sbk_"):
            # The prefix (what operators see in key listings) helps find the wrong key;
            # the rest of the secret is never echoed.
            raise agents.RegistrationRefused(
                f"unknown registration key {key[:12]}...: issue one with `standby registration-key create`"
            ) from None
        raise


def _ensure_location(session: Session, *, site: str, server: str, cloud: str, version: str) -> Cloud:
    """The site, server and cloud rows the agent says it belongs to (created when new).
    A server or cloud that exists elsewhere is a conflict, not silently moved."""
    existing_server = session.scalars(select(Server).where(Server.name == server)).one_or_none()
    if existing_server is not None:
        if existing_server.site.name != site:
            raise Conflict(f"server {server!r} is in site {existing_server.site.name!r}, not {site!r}")
        if existing_server.platform != PLATFORM:
            raise Conflict(f"server {server!r} is a {existing_server.platform} server; agents register on kvm")
    server_version = version if re.fullmatch(r"\d{1,6}(\.\d{1,6}){0,3}", version or "") else ""
    if existing_server is not None and not server_version:
        server_version = existing_server.version
    inventory.ensure_server(session, server, site=site, platform=PLATFORM, version=server_version)
    existing_cloud = session.scalars(select(Cloud).where(Cloud.name == cloud)).one_or_none()
    if existing_cloud is not None and existing_cloud.server.name != server:
        raise Conflict(f"cloud {cloud!r} belongs to server {existing_cloud.server.name!r}, not {server!r}")
    caps = list(existing_cloud.capabilities) if existing_cloud is not None else []
    if PLATFORM not in caps:
        caps.append(PLATFORM)
    return inventory.ensure_cloud(session, cloud, server=server, capabilities=caps)


def register(
    session: Session,
    settings: ServerSettings,
    *,
    key: str,
    name: str,
    kind: str = "agent",
    host: str,
    site: str,
    server: str,
    cloud: str,
    host_group: str | None = None,
    address: str | None,
    csr_pem: str | bytes,
    version: str = "",
    now: datetime | None = None,
) -> RegistrationResult:
    """Register (or re-register) an agent; see the module docstring. Runs in the caller's
    transaction: a refusal anywhere leaves nothing behind (the key's use count included)."""
    now = now_or(now)
    if not key:
        raise agents.RegistrationRefused("no registration key was given")
    # The key first: someone without a valid key learns nothing about names or inputs.
    key_id = _redeem(session, key, now)
    _check_name("agent name", name)
    _check_name("host name", host)
    for what, value in (("site", site), ("server", server), ("cloud", cloud)):
        _check_name(what, value)
    if host_group is not None:
        _check_name("host group", host_group)
    sans = [name] + ([host] if host != name else [])
    if address is not None:
        addr_host, _port = parse_address(address)
        if addr_host not in sans:
            sans.append(addr_host)  # the sender checks the agent's SAN against the address it dials
    if not csr_pem:
        raise BadInput("the registration carries no certificate request (csr_pem)")

    _ensure_location(session, site=site, server=server, cloud=cloud, version=version)
    cert_pem = tls.sign_csr(settings.ca_dir, csr_pem, name, sans=sans)
    cert = tls.load_cert(cert_pem)
    agent = agents.register_agent(
        session,
        name=name,
        host_name=host,
        kind=kind,
        address=address,
        version=version,
        cert_fingerprint=tls.fingerprint(cert_pem),
        cert_serial=format(cert.serial_number, "x"),
        cert_not_after=cert.not_valid_after_utc,
        registration_key_id=key_id,
        facts={"site": site, "server": server, "cloud": cloud, "host_group": host_group},
        now=now,
    )
    return RegistrationResult(
        agent_id=agent.id,
        name=agent.name,
        cert_pem=cert_pem.decode(),
        ca_pem=(settings.ca_dir / tls.CA_CERT).read_text(),
        heartbeat_seconds=settings.heartbeat_seconds,
    )


# ---------------------------------------------------------------- control-plane PKI

SERVER_CERT_NAME = "server"  # D/server.crt, D/server.key


@dataclass(frozen=True)
class ServerPki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    created: tuple[str, ...]  # what this call made: "ca", "server certificate"


def server_sans(settings: ServerSettings) -> list[str]:
    """localhost, 127.0.0.1, this host's name, then the operator's --san entries."""
    out: list[str] = []
    for s in ("localhost", "127.0.0.1", socket.gethostname(), *settings.sans):
        if s and s not in out:
            out.append(s)
    return out


def init_ca_and_server_cert(settings: ServerSettings) -> ServerPki:
    """Make D/ca (the CA) and D/server.crt + D/server.key unless they exist. Idempotent;
    a half-present pair (a certificate without its key) is refused by `tls`, not replaced."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    ca_cert = settings.ca_dir / tls.CA_CERT
    if not (ca_cert.exists() and (settings.ca_dir / tls.CA_KEY).exists()):
        tls.init_ca(settings.ca_dir, name="Standby control plane CA")
        created.append("ca")
    if not (settings.server_cert.exists() and settings.server_key.exists()):
        ident = tls.issue(settings.ca_dir, SERVER_CERT_NAME, sans=server_sans(settings), out_dir=settings.data_dir)
        assert ident.cert == settings.server_cert and ident.key == settings.server_key
        created.append("server certificate")
    else:
        # An existing server certificate must come from this CA, or agents would refuse it.
        cert = x509.load_pem_x509_certificate(settings.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError) as e:
            raise Conflict(
                f"{settings.server_cert} was not issued by the CA in {settings.ca_dir}: remove "
                f"{settings.server_cert.name} and {settings.server_key.name} to make a new one"
            ) from e
    return ServerPki(ca_cert, settings.server_cert, settings.server_key, tuple(created))
