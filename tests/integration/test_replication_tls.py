"""Mutual TLS of the replication link: who is let in, who is refused, and what is logged."""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_pki, running_agent, tls_client  # noqa: E402

from standby.errors import Conflict, RemoteError  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.sender import probe  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _wait_for_log(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in caplog.records:
            if needle in rec.getMessage():
                return rec.getMessage()
        time.sleep(0.02)
    raise AssertionError(f"no log line containing {needle!r}; got {[r.getMessage() for r in caplog.records]}")


def test_key_files_are_private(pki: dict[str, tls.Identity]) -> None:
    for ident in (pki["agent"], pki["sender"]):
        assert stat.S_IMODE(os.stat(ident.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pki["agent"].ca.parent / "ca.key").st_mode) == 0o600


def test_ca_refuses_to_overwrite(pki: dict[str, tls.Identity]) -> None:
    with pytest.raises(Conflict):
        tls.init_ca(pki["agent"].ca.parent)
    with pytest.raises(Conflict):
        tls.issue(pki["agent"].ca.parent, "agent")


def test_certificate_contents(pki: dict[str, tls.Identity]) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki["agent"].cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}


def test_mutual_tls_works(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        hello = probe(endpoint(rx), tls.client_context(pki["sender"]), "d1", 1 << 20)
        assert hello.latest_point is None and hello.replica_size == 0
        s = tls_client(pki["sender"], rx.address[1], pki["agent"].ca)
        try:
            assert s.version() == "TLSv1.3"
            assert tls.peer_name(s) == "agent"
        finally:
            s.close()


@pytest.mark.parametrize("who, server_reason", [
    ("foreign", "certificate verification failed"),
    ("expired", "certificate has expired"),
    (None, "presented no client certificate"),
])
def test_refused_clients(tmp_path: Path, pki: dict[str, tls.Identity], caplog: pytest.LogCaptureFixture,
                         who: str | None, server_reason: str) -> None:
    caplog.set_level(logging.INFO, logger="standby.agent")
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        with pytest.raises(RemoteError) as err:
            if who is None:
                s = tls_client(None, rx.address[1], pki["agent"].ca)
                try:
                    s.sendall(b"x")
                    s.recv(1)
                    s.recv(1)
                except OSError as exc:  # TLS 1.3: the refusal arrives after the handshake
                    raise RemoteError(str(exc)) from None
                finally:
                    s.close()
            else:
                probe(endpoint(rx), tls.client_context(pki[who]), "d1", 1 << 20)
        line = _wait_for_log(caplog, "refused connection from 127.0.0.1:")
        assert server_reason in line
        assert rx.stats["refused"] >= 1
        assert "PRIVATE KEY" not in caplog.text
        if who is not None:
            assert "agent 127.0.0.1" in err.value.message
        # the agent is still serving
        assert probe(endpoint(rx), tls.client_context(pki["sender"]), "d1", 1 << 20).latest_point is None


def test_sender_refuses_an_agent_of_another_ca(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        wrong_trust = tls.Identity(pki["sender"].cert, pki["sender"].key, pki["foreign-ca"].ca)
        with pytest.raises(RemoteError, match="certificate verification failed"):
            probe(endpoint(rx), tls.client_context(wrong_trust), "d1", 1 << 20)


def test_sender_checks_the_agent_address(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    elsewhere = tls.issue(pki["agent"].ca.parent, "elsewhere", ["10.9.9.9"], out_dir=tmp_path)
    with running_agent(tmp_path / "store", elsewhere) as rx:
        with pytest.raises(RemoteError, match="mismatch"):
            probe(endpoint(rx), tls.client_context(pki["sender"]), "d1", 1 << 20)


def test_missing_tls_files(tmp_path: Path) -> None:
    from standby.errors import NotFound

    with pytest.raises(NotFound, match="not found"):
        tls.server_context(tls.Identity(tmp_path / "a.crt", tmp_path / "a.key", tmp_path / "ca.crt"))
