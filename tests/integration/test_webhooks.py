"""Webhook delivery against a real HTTP server on loopback (http.server in a thread):
the body and its HMAC signature as received, retries with backoff, giving up, secrets
kept out of the logs. Store on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from standby.orchestration.settings import ServerSettings
from standby.orchestration.webhooks import MAX_ATTEMPTS, WebhookDeliverer, backoff_seconds, redact_url, retry_time
from standby.store import Store
from standby.store.repo import alerts

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec-7f3a-do-not-log-me"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Receiver:
    """An HTTP server that records each request and answers with the next status of
    `statuses` (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                answer = b"ok" if status < 300 else b"receiver broke"
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks/standby"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        r = Receiver(statuses)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path, webhook_timeout=2.0)


def _raise(store: Store, subject: str = "item:web01", now: datetime = T0) -> int:
    with store.transaction() as s:
        alert, new = alerts.raise_alert(
            s, kind="rpo_breach", severity="warning", subject=subject, message="RPO is above the 90 s threshold",
            now=now,
        )
        assert new
        return alert.id


def _deliveries(store: Store, alert_id: int) -> list[Any]:
    with store.read() as s:
        out = alerts.deliveries_of(s, alert_id)
        for d in out:
            s.expunge(d)
        return out


def test_backoff_schedule() -> None:
    assert [backoff_seconds(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]
    assert backoff_seconds(20) == 300
    assert retry_time(MAX_ATTEMPTS, T0) is None and retry_time(MAX_ATTEMPTS - 1, T0) == at(64)
    assert redact_url("https://user:pw@hooks.example:8443/x?y=1") == "https://hooks.example:8443/x?y=1"
    assert redact_url("http://h/x") == "http://h/x"


def test_raised_and_cleared_alerts_are_posted_signed(
    store: Store, tmp_path: Path, receiver_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rx = receiver_factory([200])
    with store.transaction() as s:
        alerts.add_webhook(s, "ops", rx.url, secret=SECRET)
    alert_id = _raise(store)
    deliverer = WebhookDeliverer(store, _settings(tmp_path))
    assert deliverer.run_once(at(1)) == 1
    (req,) = rx.requests
    assert req["path"] == "/hooks/standby"
    body = req["body"]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req["headers"]["X-Standby-Signature"], expected)
    assert req["headers"]["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload == {
        "event": "raised",
        "alert": {
            "id": alert_id, "kind": "rpo_breach", "severity": "warning", "subject": "item:web01",
            "message": "RPO is above the 90 s threshold", "raised_at": T0.isoformat(), "cleared_at": None,
        },
    }
    (d,) = _deliveries(store, alert_id)
    assert d.state == "delivered" and d.attempts == 1 and d.delivered_at == at(1)
    assert deliverer.run_once(at(2)) == 0  # nothing left

    with store.transaction() as s:
        alerts.clear_alert(s, kind="rpo_breach", subject="item:web01", now=at(5))
    assert deliverer.run_once(at(6)) == 1
    cleared = json.loads(rx.requests[1]["body"])
    assert cleared["event"] == "cleared" and cleared["alert"]["cleared_at"] == at(5).isoformat()
    assert SECRET not in caplog.text


def test_a_failing_receiver_is_retried_with_backoff(store: Store, tmp_path: Path, receiver_factory: Any) -> None:
    rx = receiver_factory([500, 200])
    with store.transaction() as s:
        alerts.add_webhook(s, "ops", rx.url)
    alert_id = _raise(store)
    deliverer = WebhookDeliverer(store, _settings(tmp_path))
    assert deliverer.run_once(at(1)) == 1
    (d,) = _deliveries(store, alert_id)
    assert d.state == "pending" and d.attempts == 1 and d.next_attempt_at == at(2)
    assert d.last_error == "HTTP 500: receiver broke"
    assert deliverer.run_once(at(1.5)) == 0  # not due yet
    assert deliverer.run_once(at(2)) == 1
    (d,) = _deliveries(store, alert_id)
    assert d.state == "delivered" and d.attempts == 2 and d.last_error is None
    assert len(rx.requests) == 2 and "X-Standby-Signature" not in rx.requests[0]["headers"]  # no secret
    assert rx.requests[0]["body"] == rx.requests[1]["body"]  # the same bytes each time


def test_delivery_is_given_up_after_eight_attempts(store: Store, tmp_path: Path, receiver_factory: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rx = receiver_factory([503])
    with store.transaction() as s:
        alerts.add_webhook(s, "ops", rx.url, secret=SECRET)
    alert_id = _raise(store)
    deliverer = WebhookDeliverer(store, _settings(tmp_path))
    now = at(0)
    waits = []
    for _ in range(MAX_ATTEMPTS):
        assert deliverer.run_once(now) == 1
        (d,) = _deliveries(store, alert_id)
        if d.next_attempt_at is not None:
            waits.append((d.next_attempt_at - now).total_seconds())
            now = d.next_attempt_at
    assert waits == [1, 2, 4, 8, 16, 32, 64]
    (d,) = _deliveries(store, alert_id)
    assert d.state == "failed" and d.attempts == MAX_ATTEMPTS and d.next_attempt_at is None
    assert deliverer.run_once(now + timedelta(hours=1)) == 0
    assert len(rx.requests) == MAX_ATTEMPTS
    assert "gave up" in caplog.text and SECRET not in caplog.text


def test_an_unreachable_receiver_costs_one_attempt_per_pass(store: Store, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with store.transaction() as s:
        alerts.add_webhook(s, "dead", f"http://127.0.0.1:{port}/x")
    first, second = _raise(store, "item:a"), _raise(store, "item:b")
    deliverer = WebhookDeliverer(store, _settings(tmp_path))
    assert deliverer.run_once(at(1)) == 1  # the second waits for the next pass
    (d1,), (d2,) = _deliveries(store, first), _deliveries(store, second)
    assert d1.attempts == 1 and d1.state == "pending" and "ConnectError" in (d1.last_error or "")
    assert d2.attempts == 0


def test_a_disabled_webhooks_pending_deliveries_are_given_up(store: Store, tmp_path: Path,
                                                             receiver_factory: Any) -> None:
    rx = receiver_factory([200])
    with store.transaction() as s:
        alerts.add_webhook(s, "ops", rx.url)
    alert_id = _raise(store)
    with store.transaction() as s:
        alerts.set_webhook_enabled(s, "ops", False)
    assert WebhookDeliverer(store, _settings(tmp_path)).run_once(at(1)) == 0
    (d,) = _deliveries(store, alert_id)
    assert d.state == "failed" and d.last_error == "the webhook is disabled" and rx.requests == []
