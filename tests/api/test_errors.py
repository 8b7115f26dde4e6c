"""Every error is the contract's body with its class's HTTP status and exit code; a
schema violation is a 422 naming the field; an unexpected exception is a 500 that tells
the client nothing of it and the log everything."""

from __future__ import annotations

import logging

import pytest

from api_helpers import API, ControlPlane, error_of


def test_not_found_conflict_and_bad_input_from_the_store(cp: ControlPlane) -> None:
    admin = cp.admin()
    r = admin.get("/policies/nope")
    assert r.status_code == 404
    assert error_of(r) == {"type": "NotFound", "message": "policy 'nope' does not exist", "exit_code": 3,
                           "details": {}}

    assert admin.post("/policies", json={"name": "p"}).status_code == 201
    r = admin.post("/policies", json={"name": "p"})
    assert r.status_code == 409
    err = error_of(r)
    assert err["type"] == "Conflict" and err["exit_code"] == 4 and "exists already" in err["message"]

    # Valid for the schema, refused by the store's rules: BadInput is a 400.
    r = admin.post("/policies", json={"name": "q", "initial_replication": "scheduled"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "BadInput" and err["exit_code"] == 2 and "start time" in err["message"]

    r = admin.post("/jobs/12345/cancel")
    assert r.status_code == 404 and error_of(r)["message"] == "job 12345 does not exist"


def test_schema_violations_are_422_naming_each_field(cp: ControlPlane) -> None:
    r = cp.admin().post(
        "/policies",
        json={"name": "bad name", "copy_frequency_seconds": 60, "replication_port": 70000, "colour": "red"},
    )
    assert r.status_code == 422
    err = error_of(r)
    assert err["type"] == "BadInput" and err["exit_code"] == 2
    fields = {e["field"]: e for e in err["details"]["errors"]}
    assert set(fields) == {"name", "copy_frequency_seconds", "replication_port", "colour"}
    assert all(e["location"] == "body" for e in fields.values())
    for name in fields:
        assert f"{name}:" in err["message"]

    r = cp.admin().get("/jobs", params={"limit": 0, "state": "sleeping"})
    assert r.status_code == 422
    err = error_of(r)
    assert {(e["location"], e["field"]) for e in err["details"]["errors"]} == {("query", "limit"), ("query", "state[0]")}
    assert "query parameter limit" in err["message"]

    r = cp.admin().get("/jobs/0")
    assert r.status_code == 422 and error_of(r)["details"]["errors"][0]["field"] == "job_id"

    r = cp.admin().post("/policies", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and error_of(r)["type"] == "BadInput"


def test_a_rejected_input_is_not_echoed(cp: ControlPlane) -> None:
    secret = "sbk_" + "s3cret" * 40  # too long for a key: refused by the schema
    r = cp.client().post("/agents/register", json={"key": secret})
    assert r.status_code == 422
    assert "s3cret" not in r.text


def test_unknown_paths_and_methods_use_the_contract_body(cp: ControlPlane) -> None:
    r = cp.admin().get("/no-such-thing")
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"
    r = cp.admin().put("/policies")
    assert r.status_code == 405 and error_of(r)["exit_code"] == 2


def test_an_unexpected_exception_is_a_generic_500_and_a_logged_traceback(
    cp: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    def explode() -> None:
        raise RuntimeError("database password is hunter2")

    # A route that fails like a bug would, added to the running app for this test.
    cp.server.app.add_api_route(f"{API}/test-explode", explode, methods=["GET"])
    caplog.set_level(logging.ERROR, logger="standby.api")
    r = cp.admin().get("/test-explode")
    assert r.status_code == 500
    err = error_of(r)
    assert err["type"] == "StandbyError" and err["exit_code"] == 70
    assert "hunter2" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.name == "standby.api" and rec.exc_info]
    assert logged and "hunter2" in str(logged[0].exc_info[1])
    # The server goes on serving.
    assert cp.admin().get("/status").status_code == 200
