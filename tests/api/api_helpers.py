"""Helpers of the API tests: the running control plane a test talks to, the contract's
error body, and registering an agent the way `standby agent register` does."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import APIRoute, iter_route_contexts

from standby.api.server import ControlPlaneServer
from standby.orchestration.settings import ServerSettings
from standby.replication import tls

API = "/api/v1"


def fast_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    """A free loopback port, a fast scheduler; heartbeats stay current for the length of a
    test (a loaded machine must not make an agent look lost between two of its requests)."""
    values: dict[str, Any] = dict(
        data_dir=data_dir, listen="127.0.0.1:0", tick_seconds=0.2, heartbeat_seconds=1.0, heartbeat_timeout=120.0
    )
    values.update(overrides)
    return ServerSettings(**values)


@dataclass
class ControlPlane:
    server: ControlPlaneServer
    settings: ServerSettings
    admin_token: str
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca_cert(self) -> Path:
        return self.settings.ca_dir / tls.CA_CERT

    @property
    def store(self) -> Any:
        return self.server.services.store

    def tls_context(self, cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca or self.ca_cert))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    def client(self, token: str | None = None, *, cert: tuple[Path, Path] | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.url + API, headers=headers, verify=self.tls_context(cert), timeout=30)
        self._clients.append(c)
        return c

    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def new_token(self, name: str, role: str) -> str:
        r = self.admin().post("/tokens", json={"name": name, "role": role})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The contract's error body, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"type", "message", "exit_code", "details"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["exit_code"], int)
    assert isinstance(err["details"], dict)
    return err  # type: ignore[no-any-return]


def api_routes(app: Any) -> set[tuple[str, str]]:
    """(METHOD, path) of every API route of the app, through included routers
    (FastAPI includes routers lazily: `app.routes` holds the routers, not their routes)."""
    out: set[tuple[str, str]] = set()
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute) and ctx.path is not None:
            out.update((m, ctx.path) for m in ctx.methods or ())
    return out


def registration_key(cp: ControlPlane) -> str:
    r = cp.admin().post("/registration-keys", json={"description": "tests", "valid_days": 1})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def register(cp: ControlPlane, tmp: Path, name: str, *, key: str | None = None, host: str | None = None,
             site: str = "site-a", server: str = "sm-a", cloud: str = "cloud-a",
             address: str = "127.0.0.1:7443") -> tuple[dict[str, Any], tuple[Path, Path]]:
    """Register like `standby agent register` does: the key stays here, only the CSR travels."""
    key_pem, csr_pem = tls.make_key_and_csr(name)
    body = {"key": key or registration_key(cp), "name": name, "kind": "agent", "host": host or name,
            "site": site, "server": server, "cloud": cloud, "host_group": None, "address": address,
            "csr_pem": csr_pem.decode(), "version": "0.1.0"}
    r = cp.client().post("/agents/register", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "agent.key").write_bytes(key_pem)
    (d / "agent.crt").write_text(answer["cert_pem"])
    return answer, (d / "agent.crt", d / "agent.key")
