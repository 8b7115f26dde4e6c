"""The control plane's background services as one: the runner, the scheduler's thread and
the webhook thread, on a store opened from the settings (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import build  # noqa: E402

from standby.orchestration import protection  # noqa: E402
from standby.orchestration.service import ControlPlaneServices  # noqa: E402
from standby.orchestration.settings import ServerSettings  # noqa: E402
from standby.store import Store  # noqa: E402
from standby.store.repo import agents, alerts, items, jobs, tasks  # noqa: E402

TIMEOUT = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def wait_for(fn: Any, what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _settings(tmp_path: Path, store_url: str, **kw: Any) -> ServerSettings:
    base: dict[str, Any] = dict(data_dir=tmp_path / "cp", db_url=store_url, tick_seconds=0.05, heartbeat_seconds=60,
                                heartbeat_timeout=3600, runner_workers=2, webhook_timeout=2.0)
    base.update(kw)
    return ServerSettings(**base)


def test_services_run_protection_end_to_end_and_stop_cleanly(store: Store, store_url: str, tmp_path: Path) -> None:
    build(store, now=utcnow())
    services = ControlPlaneServices(_settings(tmp_path, store_url))
    services.start()
    try:
        item_id, job_id = protection.enable_protection(services.store, services.runner, vm="web01")

        # No test tick: the scheduler's thread dispatches the first cycle to the primary's agent.
        def cycle_task() -> int | None:
            with services.store.read() as s:
                task = tasks.open_task_for_item(s, item_id, "cycle")
                return task.id if task is not None else None

        task_id = wait_for(cycle_task, "the scheduler to dispatch a cycle")
        with services.store.transaction() as s:  # agent-kvm-a answers through the task protocol
            agent = agents.get_agent(s, "agent-kvm-a")
            assert [t.id for t in tasks.claim(s, agent.id, max=4)] == [task_id]
            done, _ = tasks.finish(s, agent.id, task_id, ok=True, result={
                "points": {"web01-vda": "20260301T120000-0001"}, "point_at": utcnow().isoformat(),
                "bytes_sent": 5})
            services.scheduler.apply_task_result(s, done, utcnow())

        def ended() -> str | None:
            with services.store.read() as s:
                state = jobs.get(s, job_id).state
            return state if state in ("succeeded", "failed", "errored", "cancelled") else None

        assert wait_for(ended, "the protect job") == "succeeded"
        with services.store.read() as s:
            assert items.get(s, item_id).state == "protected"
    finally:
        services.stop()
    services.stop()  # twice is fine
    assert not services.running
    assert not any(t.is_alive() for t in services._threads)  # noqa: SLF001
    with pytest.raises(RuntimeError):
        services.start()


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook_server() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_an_alert_raised_by_the_scheduler_reaches_a_webhook(
    store: Store, store_url: str, tmp_path: Path, hook_server: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, received = hook_server
    build(store, now=utcnow() - timedelta(hours=2))  # every agent's last heartbeat is 2 h old
    with store.transaction() as s:
        alerts.add_webhook(s, "ops", url, secret="s3cret", kinds=["heartbeat_lost"])
    # a control plane up for an hour (a fresh start would give the agents a heartbeat
    # timeout to report in before alerting: tests/integration/test_scheduler.py)
    settings = _settings(tmp_path, store_url, heartbeat_timeout=60, started_at=utcnow() - timedelta(hours=1))
    with ControlPlaneServices(settings, store=store) as services:
        wait_for(lambda: any(json.loads(b).get("alert", {}).get("subject") == "agent:agent-kvm-a"
                             for _, b in received), "the heartbeat_lost webhook")
        assert services.running
    headers, body = next((h, b) for h, b in received if b"agent-kvm-a" in b)
    payload = json.loads(body)
    assert payload["event"] == "raised" and payload["alert"]["kind"] == "heartbeat_lost"
    want = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["x-standby-signature"] == want
    # A store handed in stays open after stop.
    with store.read() as s:
        assert alerts.open_alert(s, "heartbeat_lost", "agent:agent-kvm-a") is not None
