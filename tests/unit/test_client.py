"""ApiClient against a real HTTP(S) server on loopback (http.server in a thread): the
contract's error bodies become the same `standby.errors` classes, exit codes and
details; transport failures become RemoteError naming the URL."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from standby import errors
from standby.client import ApiClient, error_class
from standby.errors import BadInput, Conflict, NotFound, NotReady, Refused, RemoteError, StandbyError
from standby.replication.tls import init_ca, issue

Route = tuple[int, Any]  # status, body (dict -> JSON, str -> text, None -> empty)


def _error(type_name: str, message: str, exit_code: int, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"type": type_name, "message": message, "exit_code": exit_code, "details": details or {}}}


FINDINGS = [{"rule": "kvm.libvirt-version", "severity": "error", "subject": "host/kvm1",
             "message": "libvirt 6.0 is too old", "remedy": "upgrade libvirt to 7.2 or later"}]

ROUTES: dict[str, Route] = {
    "/api/v1/health": (200, {"ok": True}),
    "/api/v1/empty": (204, None),
    "/api/v1/items/nope": (404, _error("NotFound", "no protected item 'nope'", 3)),
    "/api/v1/items": (409, _error("NotReady", "web01 is not ready for protection", 1, {"findings": FINDINGS})),
    "/api/v1/pairings": (409, _error("Conflict", "cloud gold is already paired", 4)),
    "/api/v1/bad": (422, _error("BadInput", "copy_frequency_seconds: must be one of 0, 30, 300, 900", 2)),
    "/api/v1/agents/register": (403, _error("RegistrationRefused", "registration key expired", 1)),
    "/api/v1/newer": (409, _error("SomethingNew", "a newer server's refusal", 4)),
    "/api/v1/fabric": (400, _error("FabricError", "fabric.yaml: invalid fabric file", 2)),
    "/api/v1/no-token": (401, _error("Unauthorized", "missing bearer token", 1)),
    "/api/v1/viewer": (403, _error("Forbidden", "role viewer may not change anything", 1)),
    "/api/v1/proxy": (502, "<html><body>Bad Gateway</body></html>"),
    "/api/v1/plain404": (404, {"detail": "Not Found"}),
    "/api/v1/notjson": (200, "<html>hello</html>"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        self.seen.append({"method": self.command, "path": path, "query": query,
                          "auth": self.headers.get("Authorization"),
                          "json": json.loads(raw) if raw else None, "peer_cert": peer})
        if path == "/api/v1/slow":
            time.sleep(1.5)
        status, body = ROUTES.get(path, (200, {"path": path}))
        data = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (the timeout tests) leaves a broken pipe behind: expected,
        # and a traceback printed from this thread would land in a later test's stderr.
        pass


def _serve(wrap: Callable[[socket.socket], socket.socket] | None = None) -> Iterator[str]:
    _Handler.seen = []
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    if wrap is not None:
        httpd.socket = wrap(httpd.socket)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    scheme = "https" if wrap else "http"
    try:
        yield f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture()
def server() -> Iterator[str]:
    yield from _serve()


@pytest.fixture()
def make() -> Iterator[Callable[..., ApiClient]]:
    """ApiClient(...) or ApiClient.from_env(...) (env=True), closed after the test (warnings are errors)."""
    made: list[ApiClient] = []

    def _make(*args: Any, env: bool = False, **kwargs: Any) -> ApiClient:
        api = ApiClient.from_env(*args, **kwargs) if env else ApiClient(*args, **kwargs)
        made.append(api)
        return api

    yield _make
    for api in made:
        api.close()


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    init_ca(ca, "test control plane CA")
    srv = issue(ca, "localhost", ["localhost", "127.0.0.1"], out_dir=tmp_path / "srv")
    agent = issue(ca, "agent1", ["agent1"], out_dir=tmp_path / "agent")
    other = tmp_path / "other"
    init_ca(other, "some other CA")
    return {"ca": ca / "ca.crt", "other_ca": other / "ca.crt", "srv_cert": srv.cert, "srv_key": srv.key,
            "agent_cert": agent.cert, "agent_key": agent.key}


@pytest.fixture()
def tls_server(pki: dict[str, Path]) -> Iterator[str]:
    # CERT_OPTIONAL, as the control plane: a CLI comes without a certificate, an agent with one.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki["srv_cert"]), str(pki["srv_key"]))
    ctx.load_verify_locations(cafile=str(pki["ca"]))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    yield from _serve(lambda s: ctx.wrap_socket(s, server_side=True))


# ------------------------------------------------------------------ success


def test_get_returns_json_and_sends_the_bearer_token_and_params(server: str, make: Callable[..., ApiClient]) -> None:
    with make(server, token="sbt_secret") as api:
        assert api.get("/health") == {"ok": True}
        assert api.get("jobs", params={"state": "running", "kind": None, "open": True, "limit": 5}) == {
            "path": "/api/v1/jobs"}
    first, second = _Handler.seen
    assert first["auth"] == "Bearer sbt_secret"
    assert second["query"] == "state=running&open=true&limit=5"  # None left out, bools lower-case


def test_post_put_patch_delete_send_json_and_an_empty_body_is_none(server: str, make: Callable[..., ApiClient]) -> None:
    api = make(server + "/api/v1/")  # a URL given with the prefix is accepted too
    assert api.post("/policies", json={"name": "gold"}) == {"path": "/api/v1/policies"}
    api.put("/agent/inventory", json={"hosts": []})
    api.patch("/policies/gold", json={"compression": False})
    assert api.delete("/empty") is None
    assert [(s["method"], s["path"], s["json"]) for s in _Handler.seen] == [
        ("POST", "/api/v1/policies", {"name": "gold"}), ("PUT", "/api/v1/agent/inventory", {"hosts": []}),
        ("PATCH", "/api/v1/policies/gold", {"compression": False}), ("DELETE", "/api/v1/empty", None)]
    assert _Handler.seen[0]["auth"] is None


def test_a_success_that_is_not_json_is_a_remote_error(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(RemoteError, match="not JSON"):
        make(server).get("/notjson")


# ------------------------------------------------------------------ error bodies


@pytest.mark.parametrize(("path", "cls", "exit_code", "message"), [
    ("/items/nope", NotFound, 3, "no protected item 'nope'"),
    ("/pairings", Conflict, 4, "cloud gold is already paired"),
    ("/bad", BadInput, 2, "copy_frequency_seconds: must be one of 0, 30, 300, 900"),
])
def test_an_error_body_raises_the_class_it_names(server: str, path: str, cls: type[StandbyError],
                                                  exit_code: int, message: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(StandbyError) as info:
        make(server).post(path, json={})
    assert type(info.value) is cls
    assert info.value.exit_code == exit_code
    assert info.value.message == message


def test_a_readiness_refusal_carries_the_findings_in_details(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(NotReady) as info:
        make(server, token="t").post("/items", json={"vm": "web01"})
    assert info.value.exit_code == 1
    assert info.value.details == {"findings": FINDINGS}  # type: ignore[attr-defined]


def test_an_unknown_class_keeps_its_name_and_exit_code_under_the_nearest_known_class(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(Refused) as info:
        make(server).post("/agents/register", json={})
    assert type(info.value).__name__ == "RegistrationRefused"
    assert info.value.exit_code == 1
    with pytest.raises(Conflict) as info2:
        make(server).get("/newer")
    assert type(info2.value).__name__ == "SomethingNew"
    assert info2.value.exit_code == 4
    # The same name maps to the same class each time (an `except` clause can rely on it).
    assert error_class("SomethingNew", 409, 4) is error_class("SomethingNew", 409, 4)


def test_a_class_with_its_own_constructor_is_still_raised(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(errors.FabricError) as info:
        make(server).get("/fabric")
    assert info.value.message == "fabric.yaml: invalid fabric file"
    assert info.value.exit_code == 2


def test_an_error_without_a_standby_body_falls_back_on_the_status(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(RemoteError) as info:
        make(server).get("/proxy")
    assert info.value.exit_code == 5
    assert "HTTP 502" in info.value.message and "/api/v1/proxy" in info.value.message
    assert "Bad Gateway" in info.value.message
    with pytest.raises(NotFound, match="HTTP 404"):
        make(server).get("/plain404")


@pytest.mark.parametrize(("status", "cls"), [(400, BadInput), (422, BadInput), (404, NotFound), (409, Conflict),
                                             (403, Refused), (500, RemoteError), (503, RemoteError)])
def test_fallback_by_status(status: int, cls: type[StandbyError]) -> None:
    assert error_class(None, status) is cls


def test_401_without_a_token_says_to_set_one(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(StandbyError) as info:
        make(server).get("/no-token")
    assert "missing bearer token" in info.value.message
    assert "set STANDBY_TOKEN" in info.value.message
    with pytest.raises(StandbyError, match="unknown, revoked or expired"):
        make(server, token="wrong").get("/no-token")


def test_403_with_a_token_says_the_role_is_viewer(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(StandbyError) as info:
        make(server, token="viewer-token").post("/viewer", json={})
    assert "this token's role is viewer" in info.value.message
    assert info.value.exit_code == 1


# ------------------------------------------------------------------ transport failures


def test_connection_refused_names_the_url(make: Callable[..., ApiClient]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RemoteError) as info:
        make(f"http://127.0.0.1:{port}").get("/status")
    assert f"cannot reach the control plane at http://127.0.0.1:{port}/api/v1/status" in info.value.message
    assert info.value.exit_code == 5


def test_a_slow_server_times_out(server: str, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(RemoteError, match=r"no answer within 0.3 s"):
        make(server, timeout=0.3).get("/slow")


def test_a_url_without_a_scheme_is_bad_input(make: Callable[..., ApiClient]) -> None:
    with pytest.raises(BadInput, match="must start with https://"):
        make("127.0.0.1:8443")


# ------------------------------------------------------------------ TLS


def test_https_with_the_right_ca(tls_server: str, pki: dict[str, Path], make: Callable[..., ApiClient]) -> None:
    url = tls_server.replace("127.0.0.1", "localhost")
    assert make(url, ca=pki["ca"], token="t").get("/health") == {"ok": True}
    assert _Handler.seen[-1]["peer_cert"] is None or _Handler.seen[-1]["peer_cert"] == {}


def test_an_agent_presents_its_client_certificate(tls_server: str, pki: dict[str, Path], make: Callable[..., ApiClient]) -> None:
    api = make(tls_server, ca=pki["ca"], cert=(pki["agent_cert"], pki["agent_key"]))
    api.post("/agent/heartbeat", json={"version": "x"})
    subject = dict(x[0] for x in _Handler.seen[-1]["peer_cert"]["subject"])
    assert subject["commonName"] == "agent1"


def test_an_untrusted_server_certificate_says_which_ca_to_set(tls_server: str, pki: dict[str, Path], make: Callable[..., ApiClient]) -> None:
    with pytest.raises(RemoteError) as info:
        make(tls_server).get("/health")  # system trust store: our CA is not in it
    assert "cannot verify the TLS certificate" in info.value.message
    assert "STANDBY_CA" in info.value.message
    with pytest.raises(RemoteError, match=r"is .*other.* the CA that signed"):
        make(tls_server, ca=pki["other_ca"]).get("/health")


def test_a_missing_ca_file_is_bad_input(tmp_path: Path, make: Callable[..., ApiClient]) -> None:
    with pytest.raises(BadInput, match="cannot load it"):
        make("https://127.0.0.1:1", ca=tmp_path / "nope.crt")


# ------------------------------------------------------------------ environment


def test_from_env_reads_url_token_file_and_ca(tls_server: str, pki: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, make: Callable[..., ApiClient]) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("sbt_from_file\n")
    monkeypatch.setenv("STANDBY_URL", tls_server)
    monkeypatch.delenv("STANDBY_TOKEN", raising=False)
    monkeypatch.setenv("STANDBY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("STANDBY_CA", str(pki["ca"]))
    api = make(env=True)
    assert api.get("/health") == {"ok": True}
    assert _Handler.seen[-1]["auth"] == "Bearer sbt_from_file"
    monkeypatch.setenv("STANDBY_TOKEN", "sbt_env")  # STANDBY_TOKEN wins over the file
    assert make(env=True).token == "sbt_env"
    assert make(env=True, token="sbt_arg", url="http://example.invalid").token == "sbt_arg"
    assert make(env=True, url="http://example.invalid").base_url == "http://example.invalid"


def test_from_env_defaults_and_a_bad_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[..., ApiClient]) -> None:
    for name in ("STANDBY_URL", "STANDBY_TOKEN", "STANDBY_CA", "STANDBY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    api = make(env=True)
    assert (api.base_url, api.token, api.ca) == ("https://127.0.0.1:8443", None, None)
    monkeypatch.setenv("STANDBY_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(BadInput, match="token file"):
        make(env=True)
    (tmp_path / "empty").write_text("  \n")
    monkeypatch.setenv("STANDBY_TOKEN_FILE", str(tmp_path / "empty"))
    with pytest.raises(BadInput, match="is empty"):
        make(env=True)
