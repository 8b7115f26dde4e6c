"""Operator authentication and roles over real HTTPS: 401 without a valid token (none,
unknown, revoked, expired, another scheme), 403 for a viewer's change on every
changing route, reads for viewers; secrets never reach the log."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from standby.store.base import utcnow
from standby.store.repo import tokens as tokens_repo
from api_helpers import API, ControlPlane, api_routes, error_of

# Routes that do not take an operator's token.
PUBLIC = {("GET", f"{API}/health"), ("POST", f"{API}/agents/register")}
AGENT_PREFIX = f"{API}/agent/"


def operator_routes(cp: ControlPlane) -> list[tuple[str, str]]:
    return sorted(
        (method, path)
        for method, path in api_routes(cp.server.app)
        if path.startswith(API) and (method, path) not in PUBLIC and not path.startswith(AGENT_PREFIX)
    )


def concrete(path: str) -> str:
    """A route's path relative to the clients' base URL (which ends in /api/v1), its
    parameters filled (ids are numbers, names are words)."""
    path = path.removeprefix(API)
    for name in ("key_id", "alert_id", "job_id", "pairing_id", "task_id"):
        path = path.replace("{" + name + "}", "1")
    for name in ("name", "ref", "policy", "primary"):
        path = path.replace("{" + name + "}", "x")
    assert "{" not in path, path
    return path


def test_no_token_unknown_token_and_other_schemes_are_401_with_a_bearer_challenge(cp: ControlPlane) -> None:
    cases = {
        "none": cp.client(),
        "unknown": cp.client("sbt_not-a-token"),
        "empty": cp.client(),
    }
    cases["empty"].headers["Authorization"] = "Bearer"
    basic = cp.client()
    basic.headers["Authorization"] = "Basic " + "YWRtaW46YWRtaW4="
    cases["basic"] = basic
    for what, client in cases.items():
        r = client.get("/status")
        assert r.status_code == 401, (what, r.text)
        assert r.headers["www-authenticate"] == "Bearer", what
        err = error_of(r)
        assert err["type"] == "Unauthorized" and err["exit_code"] == 1, what


def test_every_operator_route_refuses_a_request_without_a_token(cp: ControlPlane) -> None:
    client = cp.client()
    routes = operator_routes(cp)
    assert len(routes) > 35
    for method, path in routes:
        r = client.request(method, concrete(path), json={})
        assert r.status_code == 401, (method, path, r.status_code, r.text)


def test_revoked_and_expired_tokens_are_401(cp: ControlPlane) -> None:
    secret = cp.new_token("soon-revoked", "viewer")
    viewer = cp.client(secret)
    assert viewer.get("/status").status_code == 200
    r = cp.admin().delete("/tokens/soon-revoked")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = viewer.get("/status")
    assert r.status_code == 401 and "revoked" in error_of(r)["message"]

    secret = cp.new_token("short-lived", "operator")
    with cp.store.transaction() as s:
        tokens_repo.get_token(s, "short-lived").expires_at = utcnow() - timedelta(seconds=1)
    assert cp.client(secret).get("/status").status_code == 401


def test_a_token_with_expires_days_carries_its_expiry(cp: ControlPlane) -> None:
    r = cp.admin().post("/tokens", json={"name": "ci", "role": "viewer", "expires_days": 2})
    assert r.status_code == 201
    body = r.json()
    assert body["token"].startswith(body["prefix"])
    listed = {t["name"]: t for t in cp.admin().get("/tokens").json()["items"]}
    assert listed["ci"]["expires_at"] == body["expires_at"]
    assert "token" not in listed["ci"] and "token_hash" not in listed["ci"]


def test_a_viewer_reads_but_every_change_is_403_and_changes_nothing(cp: ControlPlane) -> None:
    viewer = cp.client(cp.new_token("watcher", "viewer"))
    for path in ("/status", "/tokens", "/policies", "/jobs", "/alerts", "/agents", "/vms", "/items", "/webhooks"):
        r = viewer.get(path)
        assert r.status_code == 200, (path, r.text)

    changes = [(m, p) for m, p in operator_routes(cp) if m not in ("GET", "HEAD")]
    assert {"POST", "PATCH", "DELETE", "PUT"} >= {m for m, _ in changes} >= {"POST", "PATCH", "DELETE"}
    for method, path in changes:
        r = viewer.request(method, concrete(path), json={})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        err = error_of(r)
        assert err["type"] == "Forbidden" and "viewer" in err["message"]

    # A well-formed change is refused as well, and leaves nothing behind.
    r = viewer.post("/policies", json={"name": "sneaky"})
    assert r.status_code == 403
    assert cp.admin().get("/policies/sneaky").status_code == 404
    r = viewer.post("/tokens", json={"name": "escalate", "role": "operator"})
    assert r.status_code == 403
    assert "escalate" not in {t["name"] for t in cp.admin().get("/tokens").json()["items"]}


def test_an_operator_token_may_change_things(cp: ControlPlane) -> None:
    operator = cp.client(cp.new_token("ops", "operator"))
    r = operator.post("/policies", json={"name": "gold", "copy_frequency_seconds": 30})
    assert r.status_code == 201, r.text
    r = operator.patch("/policies/gold", json={"recovery_point_retention_hours": 4})
    assert r.status_code == 200 and r.json()["recovery_point_retention_hours"] == 4
    assert operator.delete("/policies/gold").status_code == 204


def test_a_policy_keeps_every_point_of_the_last_minutes_only_when_asked(cp: ControlPlane) -> None:
    operator = cp.client(cp.new_token("ops", "operator"))
    r = operator.post("/policies", json={"name": "gold"})
    assert r.status_code == 201 and r.json()["keep_all_points_minutes"] == 0  # the reference: hourly only
    r = operator.post("/policies", json={"name": "recent", "keep_all_points_minutes": 30})
    assert r.status_code == 201 and r.json()["keep_all_points_minutes"] == 30
    r = operator.patch("/policies/gold", json={"keep_all_points_minutes": 1440})
    assert r.status_code == 200 and r.json()["keep_all_points_minutes"] == 1440
    assert operator.get("/policies/gold").json()["keep_all_points_minutes"] == 1440
    assert {p["name"]: p["keep_all_points_minutes"] for p in operator.get("/policies").json()["items"]} == {
        "gold": 1440, "recent": 30}
    for bad in (-1, 1441, 2.5):
        r = operator.patch("/policies/gold", json={"keep_all_points_minutes": bad})
        assert r.status_code == 422, r.text
        assert [e["field"] for e in error_of(r)["details"]["errors"]] == ["keep_all_points_minutes"]
    r = operator.patch("/policies/gold", json={"keep_all_points_minutes": None})
    assert r.status_code == 400 and "keep_all_points_minutes" in error_of(r)["message"]
    assert operator.get("/policies/gold").json()["keep_all_points_minutes"] == 1440


def test_the_last_operator_token_cannot_be_revoked(cp: ControlPlane) -> None:
    r = cp.admin().delete("/tokens/admin")
    assert r.status_code == 409 and error_of(r)["type"] == "Refused"
    cp.new_token("second", "operator")
    assert cp.admin().delete("/tokens/admin").status_code == 200
    assert cp.admin().get("/status").status_code == 401


def test_public_routes_need_no_credentials(cp: ControlPlane) -> None:
    anonymous = cp.client()
    r = anonymous.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert anonymous.get(cp.url + "/openapi.json").status_code == 200
    assert anonymous.get(cp.url + "/docs").status_code == 200


def test_tokens_and_keys_never_reach_the_log(cp: ControlPlane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin = cp.admin()
    token = cp.new_token("logged", "operator")
    key = admin.post("/registration-keys", json={"description": "for the log test"}).json()["key"]
    cp.client(token).get("/status")
    cp.client(token + "x").get("/status")  # a wrong token, refused
    cp.client().post("/agents/register", json={"key": key, "name": "bad name!"})  # refused by the schema
    cp.client().post("/agents/register", json={"key": key + "x", "name": "a", "host": "h", "site": "s",
                                               "server": "v", "cloud": "c", "address": "h:1", "csr_pem": "x"})
    assert caplog.records, "the requests were not logged at all"
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (cp.admin_token, token, key):
        assert secret not in text
        assert secret[12:] not in text  # not even the part after the shown prefix
