"""The OpenAPI description is served and complete: every route of the app, and every
route of the contract's REST table (docs/control-plane.md)."""

from __future__ import annotations

import re
from pathlib import Path

from api_helpers import API, ControlPlane, api_routes

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "control-plane.md"


# The contract's REST table, route by route (a test below checks each path is in the doc).
CONTRACT_ROUTES = [
    ("POST", "/agents/register"),
    ("POST", "/agent/heartbeat"),
    ("PUT", "/agent/inventory"),
    ("POST", "/agent/tasks/claim"),
    ("POST", "/agent/tasks/{id}/progress"),
    ("POST", "/agent/tasks/{id}/result"),
    ("GET", "/status"),
    ("GET", "/readiness"),
    ("POST", "/registration-keys"),
    ("GET", "/registration-keys"),
    ("DELETE", "/registration-keys/{id}"),
    ("GET", "/agents"),
    ("GET", "/agents/{name}"),
    ("DELETE", "/agents/{name}"),
    ("GET", "/sites"),
    ("GET", "/servers"),
    ("GET", "/clouds"),
    ("GET", "/hosts"),
    ("GET", "/vms"),
    ("GET", "/networks"),
    ("POST", "/networks"),
    ("POST", "/policies"),
    ("GET", "/policies"),
    ("GET", "/policies/{name}"),
    ("PATCH", "/policies/{name}"),
    ("DELETE", "/policies/{name}"),
    ("POST", "/pairings"),
    ("GET", "/pairings"),
    ("DELETE", "/pairings/{id}"),
    ("POST", "/pairings/{id}/policies"),
    ("DELETE", "/pairings/{id}/policies/{policy}"),
    ("POST", "/network-mappings"),
    ("GET", "/network-mappings"),
    ("DELETE", "/network-mappings/{primary}"),
    ("POST", "/items"),
    ("GET", "/items"),
    ("GET", "/items/{ref}"),
    ("POST", "/items/{ref}/pause"),
    ("POST", "/items/{ref}/resume"),
    ("POST", "/items/{ref}/replicate-now"),
    ("POST", "/items/{ref}/resync"),
    ("DELETE", "/items/{ref}"),
    ("GET", "/items/{ref}/points"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("GET", "/alerts"),
    ("POST", "/alerts/{id}/clear"),
    ("POST", "/webhooks"),
    ("GET", "/webhooks"),
    ("DELETE", "/webhooks/{name}"),
    ("POST", "/tokens"),
    ("GET", "/tokens"),
    ("DELETE", "/tokens/{name}"),
    ("GET", "/health"),
]


def test_the_route_list_follows_the_contract_text() -> None:
    """Each route is in the contract's REST tables: its path in a row (placeholders may be
    named otherwise), or, in the tables' short form (`POST /items/{ref}/pause`, `/resume`),
    its last segment in the row that names its parent path."""
    text = CONTRACT.read_text()
    section = text[text.index("## REST API") : text.index("## Tasks")]
    rows = [shape(line) for line in section.splitlines() if line.startswith("|")]
    missing = []
    for method, path in CONTRACT_ROUTES:
        full = shape(path)
        parent, last = full.rsplit("/", 1)
        if not any(full in row and method in row.split("|")[1] for row in rows) and not any(
                parent + "/" in row and f"`/{last}`" in row for row in rows):
            missing.append(f"{method} {path}")
    assert not missing, missing


def shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_openapi_lists_every_route_of_the_app(cp: ControlPlane) -> None:
    r = cp.client().get(cp.url + "/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["info"]["title"] == "Standby control plane"
    from standby import __version__

    assert doc["info"]["version"] == __version__
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app_routes = api_routes(cp.server.app)
    assert app_routes and app_routes == documented
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_every_contract_route_is_served(cp: ControlPlane) -> None:
    served = {(m, shape(p)) for m, p in api_routes(cp.server.app)}
    wanted = {(m, shape(API + p)) for m, p in CONTRACT_ROUTES}
    missing = wanted - served
    assert not missing, sorted(missing)
