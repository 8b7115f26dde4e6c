"""A real control plane for the API tests: a data dir made by `init_data_dir`, the real
services, and uvicorn serving HTTPS (client certificates optional, checked against the
control plane's CA) on a free loopback port in a thread of the test process.

- `cp`: on the data dir's own SQLite store;
- `cp_any`: on the `store_url` of tests/store_fixtures.py, so the test runs on SQLite and
  on a real PostgreSQL.

`cp.client(token)` is an httpx client that trusts the control plane's CA;
`cp.client(cert=(crt, key))` presents a client certificate (an agent's). Clients are closed before the server stops (an idle
keep-alive TLS connection would hold up its graceful shutdown).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.api.server import ControlPlaneServer, init_data_dir

from api_helpers import ControlPlane, fast_settings  # noqa: E402  (tests/api is on sys.path)


@pytest.fixture
def start_cp(tmp_path: Path) -> Iterator[Any]:
    """A factory: start_cp(db_url=None, **settings) -> a running ControlPlane."""
    running: list[ControlPlane] = []

    def start(db_url: str | None = None, **overrides: Any) -> ControlPlane:
        settings = fast_settings(tmp_path / f"cp{len(running)}", db_url=db_url, **overrides)
        result = init_data_dir(settings)
        server = ControlPlaneServer(settings).start()
        cp = ControlPlane(server, settings, result.admin_token_file.read_text().strip())
        running.append(cp)
        return cp

    yield start
    for cp in running:
        cp.close_clients()
        cp.server.stop()


@pytest.fixture
def cp(start_cp: Any) -> ControlPlane:
    return start_cp()  # type: ignore[no-any-return]


@pytest.fixture
def cp_any(start_cp: Any, store_url: str) -> ControlPlane:
    return start_cp(db_url=store_url)  # type: ignore[no-any-return]
