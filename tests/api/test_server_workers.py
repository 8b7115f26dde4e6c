"""`standby server run --workers 2` on a real PostgreSQL: both processes serve the API
(changes too), exactly one leads (scheduler, job runner), a job queued outside the leader
is run by it, the lead passes to the other worker when the leader is killed and the
supervisor starts a new worker; a change committed in one process wakes the long-polls of
another (NOTIFY); SIGTERM stops everything; SQLite refuses several workers."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from standby.demo.local import free_port, standby_command
from standby.orchestration.desired import ChangeNotifier, PgChangeRelay
from standby.store import open_store
from standby.store.repo import jobs

pytestmark = [pytest.mark.slow, pytest.mark.postgresql, pytest.mark.timeout(300)]


def _wait(pred: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def test_two_workers_serve_lead_once_and_hand_over(tmp_path: Path, postgresql_server: Any) -> None:
    name = f"standby_workers_{uuid.uuid4().hex[:8]}"
    db = postgresql_server.create_database(name)
    data, port = tmp_path / "cp", free_port()
    subprocess.run(standby_command("server", "init", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}",
                                   "--db", db), check=True, capture_output=True, timeout=120)
    token = (data / "admin.token").read_text().strip()
    base, ca = f"https://127.0.0.1:{port}/api/v1", ssl.create_default_context(cafile=str(data / "ca" / "ca.crt"))
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen(standby_command("server", "run", "--data-dir", str(data), "--workers", "2",
                                               "--tick-seconds", "0.5"), stdout=out, stderr=subprocess.STDOUT)

    def fresh(method: str, path: str, **kw: Any) -> httpx.Response:
        # a new connection each time: the kernel hands it to either worker
        with httpx.Client(verify=ca, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
            return c.request(method, base + path, **kw)

    def workers_seen(n: int = 40) -> dict[int, bool]:
        seen: dict[int, bool] = {}
        for _ in range(n):
            try:
                h = fresh("GET", "/health").json()
            except httpx.HTTPError:
                continue
            seen[h["worker"]] = h["leader"]
        return seen

    try:
        seen = _wait(lambda: (lambda s: s if len(s) == 2 and sum(s.values()) == 1 else None)(workers_seen()),
                     60, "two workers, one leading", log)
        assert set(seen) == _children(sup.pid), (seen, _children(sup.pid))
        leader = next(pid for pid, lead in seen.items() if lead)

        # both serve changes: none of these is refused as passive
        for i in range(12):
            r = fresh("POST", "/policies", json={"name": f"p{i}", "copy_frequency_seconds": 300})
            assert r.status_code == 201, r.text

        # a job queued outside the leader's runner is found and run by it
        store = open_store(db, migrate=False)
        try:
            with store.transaction() as s:
                job_id = jobs.create(s, kind="replicate_now", target="nowhere", payload={"item_id": 999999},
                                     steps=["cycle"]).id
            ended = _wait(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(
                fresh("GET", f"/jobs/{job_id}").json()), 30, "the leader to run the job", log)
            assert ended["state"] in ("failed", "errored"), ended  # item 999999 does not exist

            # the leader dies: the other worker leads, the supervisor starts a third
            os.kill(leader, signal.SIGKILL)
            seen = _wait(lambda: (lambda s: s if leader not in s and len(s) == 2 and sum(s.values()) == 1
                                  else None)(workers_seen()), 60, "a new leader and a new worker", log)
            assert set(seen) == _children(sup.pid)
            assert "exited (signal SIGKILL)" in log.read_text(errors="replace")
        finally:
            store.close()

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, log.read_text(errors="replace")[-3000:]
        for pid in seen:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        postgresql_server.drop_database(name)


def test_a_change_in_one_process_wakes_the_long_polls_of_another(postgresql_server: Any) -> None:
    name = f"standby_notify_{uuid.uuid4().hex[:8]}"
    db = postgresql_server.create_database(name)
    stores = [open_store(db), open_store(db, migrate=False)]
    notifiers = [ChangeNotifier(), ChangeNotifier()]
    relays = [PgChangeRelay(n, s) for n, s in zip(notifiers, stores, strict=True)]
    try:
        for r in relays:
            r.start()
        _wait(lambda: all(n.current >= 1 for n in notifiers), 10, "both to listen")  # a bump on (re)connect
        before = notifiers[1].current
        t0 = time.monotonic()
        notifiers[0].bump()  # a commit in process 0 that changed a desired state
        assert notifiers[1].wait(before, 5) != before
        assert time.monotonic() - t0 < 2.0
    finally:
        for r in relays:
            r.stop()
        for s in stores:
            s.close()
        postgresql_server.drop_database(name)


def test_several_workers_need_postgresql(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    subprocess.run(standby_command("server", "init", "--data-dir", str(data), "--listen",
                                   f"127.0.0.1:{free_port()}"), check=True, capture_output=True, timeout=120)
    r = subprocess.run(standby_command("server", "run", "--data-dir", str(data), "--workers", "2"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--workers 2" in r.stderr and "PostgreSQL" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
