"""The control plane's REST API (docs/control-plane.md): `create_app(services)`.

The app serves operators (bearer tokens), agents (TLS client certificates) and the
public health check under `/api/v1`, plus `/openapi.json` and `/docs`. Its lifespan
starts and stops the services (store, job runner, scheduler) it is given, so the same
app runs under `api.server.serve` and in tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from standby import __version__
from standby.api import deps, errors, schemas
from standby.api.routes import admin, agents, inventory, items, jobs, plans, policies, recovery

log = logging.getLogger("standby.api")

PREFIX = "/api/v1"

# Documented on every route of a router, so clients (and schemathesis) know the error body.
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorOut, "description": "no valid credentials"},
    403: {"model": schemas.ErrorOut, "description": "not allowed with these credentials"},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorOut, "description": "bad input"},
    404: {"model": schemas.ErrorOut, "description": "not found"},
    409: {"model": schemas.ErrorOut, "description": "refused, or a conflict with the current state"},
    422: {"model": schemas.ErrorOut, "description": "the request does not match its schema"},
}


def create_app(services: deps.Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Blocking start/stop (threads, the store) off the event loop.
        try:
            await run_in_threadpool(services.start)
        except BaseException as e:
            app.state.startup_error = e  # for api.server to raise: uvicorn only logs it
            raise
        log.info("control plane started (API %s)", __version__)
        try:
            yield
        finally:
            await run_in_threadpool(services.stop)
            log.info("control plane stopped")

    app = FastAPI(
        title="Standby control plane",
        version=__version__,
        description="Site recovery for virtual machines: protection, replication, jobs, alerts. "
        "Operators authenticate with `Authorization: Bearer <token>`, agents with the client "
        "certificate issued at registration.",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)

    app.include_router(admin.public, prefix=PREFIX, responses=_ERRORS)
    app.include_router(agents.public, prefix=PREFIX, responses=_ERRORS)
    app.include_router(agents.agent_router, prefix=PREFIX, responses={**_AUTH_ERRORS, **_ERRORS})
    for module in (admin, agents, inventory, policies, items, jobs, recovery, plans):
        app.include_router(module.router, prefix=PREFIX, responses={**_AUTH_ERRORS, **_ERRORS})
    return app
