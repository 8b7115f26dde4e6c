"""Agent registration against the store (SQLite and PostgreSQL) and the control plane's PKI."""

from __future__ import annotations

import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from standby.errors import BadInput, Conflict, Refused
from standby.orchestration.registration import init_ca_and_server_cert, parse_address, register
from standby.orchestration.settings import ServerSettings
from standby.replication import tls
from standby.store import Store
from standby.store.models import Agent, Site
from standby.store.repo import agents, inventory

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    s = ServerSettings(data_dir=tmp_path / "cp", heartbeat_seconds=7.0, heartbeat_timeout=21.0, sans=("cp.example",))
    init_ca_and_server_cert(s)
    return s


def _key(store: Store, *, validity: timedelta = timedelta(days=5)) -> tuple[int, str, str]:
    with store.transaction() as s:
        row, secret = agents.issue_registration_key(s, description="test", validity=validity, now=T0)
        return row.id, row.prefix, secret


def _register(store: Store, settings: ServerSettings, secret: str, *, name: str = "agent-a", csr: bytes | None = None,
              now: datetime = T0, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = dict(kind="agent", host="kvm-a", site="site-a", server="sm-a", cloud="cloud-a",
                                   host_group="group-a", address="10.0.0.5:7443", version="0.1.0")
    args.update(kw)
    if csr is None:
        _k, csr = tls.make_key_and_csr(name)
    with store.transaction() as s:
        return register(s, settings, key=secret, name=name, csr_pem=csr, now=now, **args)  # type: ignore[arg-type]


def test_register_signs_the_csr_and_records_the_agent_and_its_place(store: Store, settings: ServerSettings) -> None:
    key_id, _prefix, secret = _key(store)
    _agent_key, csr = tls.make_key_and_csr("agent-a")
    res = _register(store, settings, secret, csr=csr, now=T0 + timedelta(hours=1))

    assert res.name == "agent-a" and res.heartbeat_seconds == 7.0
    assert res.ca_pem == (settings.ca_dir / "ca.crt").read_text()
    cert = x509.load_pem_x509_certificate(res.cert_pem.encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(res.ca_pem.encode()))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent-a"
    assert cert.public_key() == x509.load_pem_x509_csr(csr).public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agent-a", "kvm-a"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]

    with store.read() as s:
        agent = agents.get_agent(s, "agent-a")
        assert agent.id == res.agent_id
        assert agent.host_name == "kvm-a" and agent.kind == "agent" and agent.state == "active"
        assert agent.address == "10.0.0.5:7443" and agent.version == "0.1.0"
        assert agent.cert_fingerprint == tls.fingerprint(res.cert_pem)
        assert agent.cert_serial == format(cert.serial_number, "x")
        assert agent.cert_not_after == cert.not_valid_after_utc
        assert agent.registration_key_id == key_id
        assert agent.facts == {"site": "site-a", "server": "sm-a", "cloud": "cloud-a", "host_group": "group-a"}
        assert agents.agent_by_fingerprint(s, tls.fingerprint(res.cert_pem)).name == "agent-a"  # type: ignore[union-attr]
        server = inventory.get_server(s, "sm-a")
        assert server.site.name == "site-a" and server.platform == "kvm" and server.version == "0.1.0"
        cloud = inventory.get_cloud(s, "cloud-a")
        assert cloud.server.name == "sm-a" and cloud.capabilities == ["kvm"]
        used = agents.list_registration_keys(s)[0]
        assert used.use_count == 1 and used.last_used_at == T0 + timedelta(hours=1)


def test_re_registering_a_name_replaces_its_certificate(store: Store, settings: ServerSettings) -> None:
    _id, _p, secret = _key(store)
    first = _register(store, settings, secret)
    _id2, _p2, secret2 = _key(store)
    second = _register(store, settings, secret2, address="10.0.0.6:7443")
    assert second.agent_id == first.agent_id
    assert tls.fingerprint(second.cert_pem) != tls.fingerprint(first.cert_pem)
    with store.read() as s:
        assert agents.agent_by_fingerprint(s, tls.fingerprint(first.cert_pem)) is None
        agent = agents.agent_by_fingerprint(s, tls.fingerprint(second.cert_pem))
        assert agent is not None and agent.address == "10.0.0.6:7443"
        assert len(agents.list_agents(s)) == 1


def test_a_second_agent_joins_the_same_cloud_and_keeps_its_capabilities(store: Store, settings: ServerSettings) -> None:
    with store.transaction() as s:
        inventory.ensure_server(s, "sm-a", site="site-a", version="0.0.9")
        inventory.ensure_cloud(s, "cloud-a", server="sm-a", capabilities=["hyperv"])
    _id, _p, secret = _key(store)
    _register(store, settings, secret, name="agent-a", version="dev")  # not a dotted version: server's kept
    _register(store, settings, secret, name="agent-b", host="kvm-b", address="[fd00::5]:7443")
    with store.read() as s:
        assert inventory.get_cloud(s, "cloud-a").capabilities == ["hyperv", "kvm"]
        assert inventory.get_server(s, "sm-a").version == "0.1.0"
        assert [a.name for a in agents.list_agents(s)] == ["agent-a", "agent-b"]
        assert agents.get_agent(s, "agent-b").address == "[fd00::5]:7443"


@pytest.mark.parametrize("how", ["expired", "revoked", "unknown"])
def test_bad_keys_are_refused_by_prefix_and_leave_nothing_behind(store: Store, settings: ServerSettings,
                                                                 how: str) -> None:
    key_id, prefix, secret = _key(store, validity=timedelta(days=1))
    now = T0 + timedelta(hours=1)
    if how == "expired":
        now = T0 + timedelta(days=1, seconds=1)
    elif how == "revoked":
        with store.transaction() as s:
            agents.revoke_registration_key(s, key_id, now=T0)
    else:
        secret = "sbk_" + "x" * 43
        prefix = secret[:12]
    with pytest.raises(Refused) as info:
        _register(store, settings, secret, now=now)
    msg = str(info.value)
    assert prefix in msg and secret not in msg
    assert {"expired": "expired", "revoked": "revoked", "unknown": "unknown"}[how] in msg
    assert info.value.http_status == 403
    with store.read() as s:
        assert s.query(Agent).count() == 0
        assert s.query(Site).count() == 0


def test_registration_input_is_checked(store: Store, settings: ServerSettings) -> None:
    _id, _p, secret = _key(store)
    with pytest.raises(BadInput, match="HOST:PORT"):
        _register(store, settings, secret, address="10.0.0.5")
    with pytest.raises(BadInput, match="port 70000"):
        _register(store, settings, secret, address="10.0.0.5:70000")
    with pytest.raises(BadInput, match="agent name"):
        _register(store, settings, secret, name="../evil")
    with pytest.raises(BadInput, match="not a PEM CSR"):
        _register(store, settings, secret, csr=b"nonsense")
    with pytest.raises(BadInput, match="kind"):
        _register(store, settings, secret, kind="robot")
    with pytest.raises(Refused, match="no registration key"):
        _register(store, settings, "")
    with store.read() as s:
        assert s.query(Agent).count() == 0


def test_a_server_or_cloud_elsewhere_is_a_conflict(store: Store, settings: ServerSettings) -> None:
    _id, _p, secret = _key(store)
    _register(store, settings, secret)
    with pytest.raises(Conflict, match="site 'site-a', not 'site-b'"):
        _register(store, settings, secret, name="agent-b", host="kvm-b", site="site-b")
    with store.transaction() as s:
        inventory.ensure_server(s, "sm-b", site="site-b")
    with pytest.raises(Conflict, match="belongs to server 'sm-a'"):
        _register(store, settings, secret, name="agent-b", host="kvm-b", site="site-b", server="sm-b")


def test_parse_address() -> None:
    assert parse_address("host-1.example:7443") == ("host-1.example", 7443)
    assert parse_address("[::1]:1") == ("::1", 1)
    for bad in ("", ":7443", "h:", "h:0", "h:x", "a b:1"):
        with pytest.raises(BadInput):
            parse_address(bad)


# ---------------------------------------------------------------- PKI of the data dir


def test_init_ca_and_server_cert_is_idempotent(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path / "d", sans=("cp.example", "10.1.2.3"))
    pki = init_ca_and_server_cert(settings)
    assert pki.created == ("ca", "server certificate")
    assert pki.server_cert == tmp_path / "d" / "server.crt" and pki.ca_cert == tmp_path / "d" / "ca" / "ca.crt"
    for private in (settings.server_key, settings.ca_dir / "ca.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = {p: p.read_bytes() for p in (settings.server_cert, settings.server_key, pki.ca_cert)}
    again = init_ca_and_server_cert(settings)
    assert again.created == ()
    assert {p: p.read_bytes() for p in before} == before

    cert = x509.load_pem_x509_certificate(settings.server_cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    assert dns[0] == "localhost" and "cp.example" in dns
    assert socket.gethostname() in dns or socket.gethostname() in [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    # The server certificate works as a TLS server identity with the CA.
    tls.server_context(tls.Identity(settings.server_cert, settings.server_key, pki.ca_cert))


def test_a_server_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path / "d")
    init_ca_and_server_cert(settings)
    other = ServerSettings(data_dir=tmp_path / "other")
    init_ca_and_server_cert(other)
    for f in ("server.crt", "server.key"):
        (settings.data_dir / f).unlink()
        (settings.data_dir / f).write_bytes((other.data_dir / f).read_bytes())
    with pytest.raises(Conflict, match="not issued by the CA"):
        init_ca_and_server_cert(settings)
    # Half a pair is not silently replaced either.
    settings.server_key.unlink()
    with pytest.raises(Conflict, match="refusing to overwrite"):
        init_ca_and_server_cert(settings)
