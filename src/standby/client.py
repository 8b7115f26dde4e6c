"""HTTP client of the control plane's REST API (docs/control-plane.md), shared by the CLI
(bearer token) and the agents (client certificate).

Every failure becomes a `standby.errors` exception, so callers (and the CLI's one
error handler) never see httpx: an error body `{"error": {"type", "message",
"exit_code", "details"}}` raises the class it names (the same message and exit code as
if the error had happened locally), and an unreachable server raises `RemoteError`
naming the URL.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby import __version__, errors
from standby.errors import BadInput, RemoteError, StandbyError

if TYPE_CHECKING:
    # httpx is imported when a client is made: it costs half a second of start-up to every
    # `standby` command otherwise, most of which never talk HTTP.
    import httpx

API_PREFIX = "/api/v1"
DEFAULT_URL = "https://127.0.0.1:8443"

# When the server names a class this process does not know (a newer server, or an error
# class defined outside errors.py such as RegistrationRefused), the body's exit code, then
# the HTTP status, picks the nearest class here.
_BY_EXIT_CODE: dict[int, type[StandbyError]] = {
    1: errors.Refused, 2: BadInput, 3: errors.NotFound, 4: errors.Conflict, 5: RemoteError,
    6: errors.IntegrityError, 7: errors.OutOfSpace,
}
_BY_STATUS: dict[int, type[StandbyError]] = {
    400: BadInput, 401: errors.Refused, 403: errors.Refused, 404: errors.NotFound, 409: errors.Conflict,
    422: BadInput, 502: RemoteError, 503: RemoteError, 504: RemoteError, 507: errors.OutOfSpace,
}
_derived: dict[tuple[str, type[StandbyError], int], type[StandbyError]] = {}


def _named_class(name: str) -> type[StandbyError] | None:
    cls = getattr(errors, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, StandbyError) else None


def error_class(type_name: str | None, status: int, exit_code: int | None = None) -> type[StandbyError]:
    """The exception class for an error response: `errors.<type_name>` when it exists,
    else a subclass named `type_name` of the nearest known class (by exit code, then by
    status) that keeps the server's exit code."""
    if type_name:
        known = _named_class(type_name)
        if known is not None:
            return known
    base = _BY_EXIT_CODE.get(exit_code or -1) or _BY_STATUS.get(status)
    if base is None:
        base = RemoteError if status >= 500 else BadInput
    code = exit_code if isinstance(exit_code, int) and 0 < exit_code < 256 else base.exit_code
    name = type_name if type_name and type_name.isidentifier() else base.__name__
    if name == base.__name__ and code == base.exit_code:
        return base
    key = (name, base, code)
    if key not in _derived:  # one class per (name, base, code): `except` and isinstance keep working
        _derived[key] = type(name, (base,), {"exit_code": code, "http_status": status, "__module__": __name__})
    return _derived[key]


def _make(cls: type[StandbyError], message: str) -> StandbyError:
    try:
        return cls(message)
    except TypeError:  # a class with its own constructor (FabricError(path, problems))
        exc = cls.__new__(cls)
        StandbyError.__init__(exc, message)
        return exc


def _attach_details(exc: StandbyError, details: Any) -> None:
    # StandbyError may define `details` itself (a newer errors.py); set it either way.
    try:
        exc.details = details if details is not None else {}  # type: ignore[attr-defined]
    except AttributeError:
        pass


KEEPALIVE_EXPIRY = 4.0  # seconds an idle connection is kept for reuse


class ApiClient:
    """A connection to one control plane. Methods take a path relative to `/api/v1` and
    return the decoded JSON body (None for an empty body)."""

    def __init__(self, base_url: str, *, token: str | None = None, ca: str | Path | None = None,
                 cert: tuple[str | Path, str | Path] | None = None, timeout: float = 30.0) -> None:
        base = base_url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise BadInput(f"control plane URL {base_url!r} must start with https:// (or http://)")
        if base.endswith(API_PREFIX):
            base = base[: -len(API_PREFIX)]
        self.base_url = base
        self.token = token or None
        self.ca = Path(ca) if ca else None
        self.cert = (Path(cert[0]), Path(cert[1])) if cert else None
        self.timeout = timeout
        import httpx

        headers = {"Accept": "application/json", "User-Agent": f"standby/{__version__}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        # Idle connections are dropped well before the server's keep-alive timeout (30 s):
        # reusing one the server is closing loses the request ("disconnected without a response").
        self._http = httpx.Client(base_url=base + API_PREFIX, headers=headers, timeout=timeout,
                                  verify=self._tls_context(), http2=False, follow_redirects=False,
                                  limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY))

    def _tls_context(self) -> ssl.SSLContext | bool:
        if self.base_url.startswith("http://"):
            return False  # no TLS: do not load a trust store for nothing
        if self.ca is None and self.cert is None:
            return True  # the system's trust store
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise BadInput(f"CA certificate {self.ca}: cannot load it ({_reason(exc)}); "
                           "STANDBY_CA / --ca must name the control plane's ca.crt") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            except (OSError, ssl.SSLError) as exc:
                raise BadInput(f"client certificate {self.cert[0]} / key {self.cert[1]}: cannot load them "
                               f"({_reason(exc)})") from None
        return ctx

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None, ca: str | Path | None = None,
                 *, timeout: float = 30.0) -> ApiClient:
        """Arguments first, then STANDBY_URL, STANDBY_TOKEN (or the file named by
        STANDBY_TOKEN_FILE) and STANDBY_CA."""
        env = os.environ
        url = url or env.get("STANDBY_URL") or DEFAULT_URL
        token = token or env.get("STANDBY_TOKEN") or None
        if token is None and env.get("STANDBY_TOKEN_FILE"):
            token = read_token_file(env["STANDBY_TOKEN_FILE"])
        ca = ca or env.get("STANDBY_CA") or None
        return cls(url, token=token, ca=ca, timeout=timeout)

    # ------------------------------------------------------------------ requests

    def get(self, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, json=json, params=params)

    def get_all(self, path: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Every item of a paged list (`{items, next}`), page after page."""
        out: list[Any] = []
        query = dict(params or {})
        while True:
            page = self.get(path, params=query)
            out.extend(page.get("items") or [])
            nxt = page.get("next")
            if not nxt:
                return out
            query["after"] = nxt

    def post(self, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=json, params=params)

    def put(self, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.request("PUT", path, json=json, params=params)

    def patch(self, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.request("PATCH", path, json=json, params=params)

    def delete(self, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.request("DELETE", path, json=json, params=params)

    def url(self, path: str) -> str:
        return f"{self.base_url}{API_PREFIX}/{path.lstrip('/')}"

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        # None-valued params are left out, so callers can pass optional filters as they are.
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        import httpx

        url = self.url(path)
        try:
            resp = self._http.request(method, path.lstrip("/"), json=json, params=query or None)
        except httpx.TimeoutException:
            raise RemoteError(f"control plane at {url}: no answer within {self.timeout:g} s") from None
        except httpx.ConnectError as exc:
            raise RemoteError(self._connect_message(url, exc)) from None
        except httpx.HTTPError as exc:  # protocol errors, a dropped connection
            raise RemoteError(f"control plane at {url}: {type(exc).__name__}: {_reason(exc)}") from None
        if resp.is_success:
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise RemoteError(f"control plane at {url}: HTTP {resp.status_code} with a body that is not "
                                  "JSON (is this URL a Standby control plane?)") from None
        raise self._error(method, url, resp)

    def _connect_message(self, url: str, exc: Exception) -> str:
        reason = _reason(exc)
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
            hint = ("; set STANDBY_CA (or --ca) to the control plane's CA certificate (DATA_DIR/ca/ca.crt)"
                    if self.ca is None else f"; is {self.ca} the CA that signed this server's certificate?")
            return f"cannot verify the TLS certificate of the control plane at {url}: {reason}{hint}"
        return f"cannot reach the control plane at {url}: {reason}"

    def _error(self, method: str, url: str, resp: httpx.Response) -> StandbyError:
        status = resp.status_code
        body: Any = None
        try:
            body = resp.json()
        except ValueError:
            pass
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            type_name = err.get("type") if isinstance(err.get("type"), str) else None
            code = err.get("exit_code") if isinstance(err.get("exit_code"), int) else None
            message, details = err["message"], err.get("details")
        else:  # not a Standby error body: a proxy, a wrong URL, FastAPI's own 404/405
            type_name, code, details = None, None, None
            text = " ".join(resp.text.split())[:200]
            message = f"{method} {url}: HTTP {status} {resp.reason_phrase}" + (f": {text}" if text else "")
        message += self._auth_hint(status)
        exc = _make(error_class(type_name, status, code), message)
        _attach_details(exc, details)
        exc.http_status_received = status  # type: ignore[attr-defined]
        return exc

    def _auth_hint(self, status: int) -> str:
        if status == 401:
            if self.token:
                return (" (the token was not accepted: it is unknown, revoked or expired; set STANDBY_TOKEN "
                        "or STANDBY_TOKEN_FILE to a valid token)")
            if self.cert:
                return " (the client certificate was not accepted: is this agent registered and not revoked?)"
            return (" (no token: set STANDBY_TOKEN, or STANDBY_TOKEN_FILE to a file holding one, e.g. the "
                    "DATA_DIR/admin.token that `standby server init` wrote)")
        if status == 403 and self.token:
            return " (this token's role is viewer, which may only read: use an operator token for changes)"
        return ""

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadInput(f"token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise BadInput(f"token file {path} is empty")
    return token


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"  # httpx would send "True"
    return value


def _reason(exc: BaseException) -> str:
    # httpx wraps the socket/ssl error; its own text is often empty or generic.
    inner = exc.__cause__ or exc.__context__
    text = str(exc) or (str(inner) if inner else "") or type(exc).__name__
    return text
