"""Every error response has one body (docs/control-plane.md, "Errors"):

    {"error": {"type": "NotFound", "message": "...", "exit_code": 3, "details": {...}}}

with the HTTP status of the error's class. A client raises the StandbyError subclass
named by `type`, so the CLI prints the same message and exit code as a local error.
Schema violations are `BadInput` with status 422 and the offending fields in
`details.errors`; an unexpected exception is a 500 whose body says nothing of it (the
traceback goes to the log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from standby.errors import BadInput, NotFound, Refused, StandbyError

log = logging.getLogger("standby.api")

INTERNAL_MESSAGE = "internal error (a bug: please report it); the control plane's log has the details"


class Unauthorized(Refused):
    """No credentials, or credentials the control plane does not accept."""

    http_status = 401


class Forbidden(Refused):
    """Valid credentials without the right to do this."""

    http_status = 403


def error_body(type_: str, message: str, exit_code: int, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "exit_code": exit_code, "details": details or {}}}


def standby_error_response(exc: StandbyError) -> JSONResponse:
    details = getattr(exc, "details", None) or {}
    body = error_body(type(exc).__name__, exc.message, exc.exit_code, jsonable_encoder(details))
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


async def _on_standby_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StandbyError)
    if exc.http_status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    return standby_error_response(exc)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """("body", "hosts", 0, "name") -> "hosts[0].name" (the first element says where)."""
    out = ""
    for part in list(loc)[1:]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_WHERE = {"body": "", "query": "query parameter ", "path": "path parameter ", "header": "header "}


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The offending input is left out on purpose: it may be a secret (a registration key).
    errors = []
    for e in exc.errors():
        loc = tuple(e.get("loc", ()))
        errors.append({"location": str(loc[0]) if loc else "body", "field": _field(loc),
                       "message": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    parts = []
    for e in errors:
        what = f"{_WHERE.get(e['location'], e['location'] + ' ')}{e['field']}".strip() or f"the {e['location']}"
        parts.append(f"{what}: {e['message']}")
    message = "invalid request: " + "; ".join(parts)
    return JSONResponse(error_body(BadInput.__name__, message, BadInput.exit_code, {"errors": errors}), status_code=422)


# Starlette's own errors (an unknown path, a wrong method) in the same body.
_HTTP_TYPES: dict[int, type[StandbyError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound}


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    cls = _HTTP_TYPES.get(exc.status_code, BadInput if exc.status_code < 500 else StandbyError)
    body = error_body(cls.__name__, str(exc.detail), cls.exit_code)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


class CatchAll:
    """An unexpected exception becomes a 500 in the contract's body, logged with its
    traceback. (Starlette's handler for `Exception` would re-raise it after responding,
    and the server would log it a second time.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean response: let the server drop the connection
            response = JSONResponse(error_body("StandbyError", INTERNAL_MESSAGE, StandbyError.exit_code), 500)
            await response(scope, receive, send)


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class PassiveGuard:
    """A passive control plane (`orchestration/role.py`) serves reads and answers every
    change with 503 naming the active one, before the request body is read: its database
    is read-only, and an agent that gets the 503 moves on to the next control plane."""

    def __init__(self, app: ASGIApp, services: Any) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        role = getattr(self.services, "role", None)
        if scope["type"] == "http" and scope.get("method") not in _READS and role is not None \
                and not getattr(self.services, "active", True):
            response = standby_error_response(role.passive_error())
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _read_only_database(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return type(orig).__name__ == "ReadOnlySqlTransaction"


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    """A read that writes (GET of an item's points queues a task) on a passive control
    plane's read-only database: the same 503 as a change."""
    role = getattr(request.app.state.services, "role", None)
    if _read_only_database(exc) and role is not None:
        return standby_error_response(role.passive_error())
    raise exc


def install(app: FastAPI) -> None:
    from sqlalchemy.exc import DBAPIError

    app.add_exception_handler(StandbyError, _on_standby_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(DBAPIError, _on_database_error)
    app.add_middleware(PassiveGuard, services=app.state.services)
    app.add_middleware(CatchAll)
