"""The agent's task dispatch (agent/tasks.py) on real replica stores, and its control-plane
link's outage handling (agent/runtime.py `ControlPlane`) against real HTTP endpoints.

The cycle and seed export tasks need a libvirt guest: tests/integration/test_agent_runtime.py."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from standby.agent.config import AgentConfig
from standby.agent.runtime import ControlPlane, ControlPlaneDown
from standby.agent.tasks import DISPATCH, TaskEnv, TaskProgress, delete_disk, execute
from standby.client import ApiClient
from standby.errors import NotFound
from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest, n_blocks
from standby.replication.seeding import export_image_seed
from standby.replication.store import ReplicaStore

SIZE = 16 * BLOCK_SIZE
HOUR = 3600.0


def _no_driver() -> Any:
    raise AssertionError("this task must not touch the hypervisor")


def _no_tls() -> Any:
    raise AssertionError("this task must not open a replication link")


@pytest.fixture
def env(tmp_path: Path) -> TaskEnv:
    return TaskEnv(ReplicaStore(tmp_path / "replicas"), tmp_path / "state", _no_driver, _no_tls,
                   owns=lambda vm: vm.startswith("demo-"))


def _image(rng: random.Random, size: int = SIZE) -> bytearray:
    raw = bytearray(size)
    for i in rng.sample(range(n_blocks(size)), n_blocks(size) // 2):
        raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = rng.randbytes(BLOCK_SIZE)
    return raw


def _commit(store: ReplicaStore, disk_id: str, raw: bytearray, created_at: float,
            consistency: str = "crash") -> str:
    """One cycle of the whole image as a point (the receiver's path, without the wire)."""
    disk = store.create_disk(disk_id, len(raw))
    latest = disk.latest()
    w = disk.begin_cycle(f"c{time.monotonic_ns()}", latest.id if latest else None)
    table = HashTable(len(raw))
    for i in range(n_blocks(len(raw))):
        block = bytes(raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
        table.set(i, block_digest(block))
        w.write(i * BLOCK_SIZE, block)
    return w.commit(table.disk_digest(), consistency, created_at, {"cycle_kind": "seed" if latest is None
                                                                  else "extents"}).id


def test_every_contract_kind_is_dispatched() -> None:
    # the replication kinds of docs/control-plane.md; recovery's kinds (agent/recovery.py) sit
    # beside them and are checked by tests/unit/test_agent_recovery_tasks.py
    assert set(DISPATCH) >= {"cycle", "prune", "delete_replica", "list_points", "seed_export", "seed_import"}


def test_unknown_kind_and_bad_params_are_failures_not_crashes(env: TaskEnv) -> None:
    out = execute(env, {"id": 1, "kind": "reboot_host", "params": {}})
    assert not out.ok and out.error_type == "BadInput" and "reboot_host" in (out.error or "")
    assert out.body() == {"ok": False, "result": {}, "error": out.error, "error_type": "BadInput"}
    out = execute(env, {"id": 2, "kind": "prune", "params": {"disk_ids": "not-a-list"}})
    assert not out.ok and out.error_type == "BadInput"
    out = execute(env, {"id": 3, "kind": "list_points", "params": {"disk_ids": ["../escape"]}})
    assert not out.ok and out.error_type == "BadInput"
    out = execute(env, {"id": 4, "kind": "prune", "params": []})
    assert not out.ok and out.error_type == "BadInput"


def test_cycle_params_are_checked_before_the_hypervisor_is_touched(env: TaskEnv) -> None:
    peer = {"name": "agent-b", "address": "127.0.0.1:7444"}
    out = execute(env, {"id": 1, "kind": "cycle", "params": {"vm": "dr-web", "peer": peer}})
    assert not out.ok and out.error_type == "Refused" and "domain filter" in (out.error or "")
    out = execute(env, {"id": 2, "kind": "cycle", "params": {"vm": "demo-web", "peer": {"address": "nowhere"}}})
    assert not out.ok and out.error_type == "BadInput"
    out = execute(env, {"id": 3, "kind": "cycle", "params": {"vm": "demo-web", "peer": peer, "consistency": "x"}})
    assert not out.ok and out.error_type == "BadInput"
    out = execute(env, {"id": 4, "kind": "cycle", "params": {"vm": "demo-web", "peer": peer, "compress": 3}})
    assert not out.ok and out.error_type == "BadInput"


def test_a_bug_in_a_task_is_reported_with_its_class_name(env: TaskEnv) -> None:
    # the cycle reaches the driver, whose factory fails with a non-Standby exception
    out = execute(env, {"id": 1, "kind": "cycle",
                        "params": {"vm": "demo-web", "peer": {"name": "b", "address": "127.0.0.1:7444"}}})
    assert not out.ok and out.error_type == "AssertionError" and "hypervisor" in (out.error or "")


def test_list_points_prune_and_delete(env: TaskEnv, tmp_path: Path) -> None:
    rng = random.Random(5)
    now = time.time()
    base = (now // HOUR - 2) * HOUR  # the start of the clock hour two hours ago
    raw = _image(rng)
    ids = [_commit(env.store, "demo-web-vda", raw, at, cons)
           for at, cons in ((base - 3 * HOUR, "crash"), (base + 60, "app"), (base + 120, "crash"))]
    ids.append(_commit(env.store, "demo-web-vda", _image(rng), now - 60))

    out = execute(env, {"id": 1, "kind": "list_points", "params": {"disk_ids": ["demo-web-vda", "demo-web-vdb"]}})
    assert out.ok
    pts = out.result["points"]
    assert pts["demo-web-vdb"] == []  # not replicated (yet)
    assert [p["id"] for p in pts["demo-web-vda"]] == ids
    first = pts["demo-web-vda"][0]
    assert first["kind"] == "seed" and first["consistency"] == "crash" and first["pinned"] is False
    assert first["created_at"].endswith("Z") and first["created_at"][:4].isdigit()
    assert pts["demo-web-vda"][1]["consistency"] == "app"

    # 3 h of retention with app-consistent points taken: only the point older than 3 h goes
    # (the app-consistent one stays although a later point of its clock hour exists)
    prune = {"disk_ids": ["demo-web-vda", "demo-web-vdb"], "retention_hours": 3, "app_consistent_interval_hours": 1}
    out = execute(env, {"id": 2, "kind": "prune", "params": prune})
    assert out.ok, out
    assert out.result == {"removed": {"demo-web-vda": ids[:1]}, "missing": ["demo-web-vdb"]}
    # without app-consistent points in the policy, one point per clock hour is kept
    out = execute(env, {"id": 3, "kind": "prune", "params": {**prune, "app_consistent_interval_hours": 0}})
    assert out.ok and out.result["removed"] == {"demo-web-vda": ids[1:2]}
    out = execute(env, {"id": 4, "kind": "prune", "params": {"disk_ids": ["demo-web-vda"], "retention_hours": 0}})
    assert out.ok and out.result["removed"]["demo-web-vda"] == ids[2:3]  # only the latest stays
    assert [p.id for p in env.store.disk("demo-web-vda").points()] == [ids[3]]

    # a materialized point blocks the delete of every listed disk
    _commit(env.store, "demo-web-vdc", _image(rng), now)
    overlay = env.store.disk("demo-web-vda").materialize(ids[3], tmp_path / "failover.qcow2")
    out = execute(env, {"id": 4, "kind": "delete_replica", "params": {"disk_ids": ["demo-web-vdc", "demo-web-vda"]}})
    assert not out.ok and out.error_type == "Conflict" and "release" in (out.error or "")
    assert set(env.store.disks()) == {"demo-web-vda", "demo-web-vdc"}
    env.store.disk("demo-web-vda").release(overlay)

    out = execute(env, {"id": 5, "kind": "delete_replica",
                        "params": {"disk_ids": ["demo-web-vda", "demo-web-vdc", "demo-web-vdx"]}})
    assert out.ok and out.result == {"deleted": ["demo-web-vda", "demo-web-vdc"], "absent": ["demo-web-vdx"]}
    assert env.store.disks() == []
    assert not any(p.name.startswith(".deleted") for p in env.store.root.iterdir())
    with pytest.raises(NotFound):
        env.store.disk("demo-web-vda")
    # idempotent, and a disk of the same id starts over cleanly (no stale cached handle)
    out = execute(env, {"id": 6, "kind": "delete_replica", "params": {"disk_ids": ["demo-web-vda"]}})
    assert out.ok and out.result == {"deleted": [], "absent": ["demo-web-vda"]}
    again = _commit(env.store, "demo-web-vda", raw, now)
    assert [p.id for p in env.store.disk("demo-web-vda").points()] == [again]
    assert env.store.disk("demo-web-vda").verify(again).ok


def test_delete_disk_of_an_unknown_disk(env: TaskEnv) -> None:
    assert delete_disk(env.store, "never-there") is False


def test_seed_import_is_checked_and_idempotent(env: TaskEnv, tmp_path: Path) -> None:
    rng = random.Random(9)
    img = tmp_path / "disk.img"
    img.write_bytes(_image(rng))
    seeds = tmp_path / "seeds"
    info = export_image_seed(img, seeds / "demo-web-vda", "demo-web-vda")
    params = {"vm": "demo-web", "disk_ids": ["demo-web-vda"], "path": str(seeds)}
    out = execute(env, {"id": 1, "kind": "seed_import", "params": params})
    assert out.ok, out
    assert out.result["bytes"] == info["data_bytes"] > 0
    disk = env.store.disk("demo-web-vda")
    assert disk.latest() is not None and disk.latest().digest == info["digest"]  # type: ignore[union-attr]
    # a re-delivered task (agent restarted before its result was taken) succeeds again
    again = execute(env, {"id": 1, "kind": "seed_import", "params": params})
    assert again.ok and again.result == out.result and len(disk.points()) == 1
    missing = execute(env, {"id": 2, "kind": "seed_import",
                            "params": {**params, "disk_ids": ["demo-web-vdb"]}})
    assert not missing.ok and missing.error_type == "NotFound"


def test_progress_counts_bytes_and_caps_below_done() -> None:
    p = TaskProgress()
    p.total_bytes = 1000
    threads = [threading.Thread(target=lambda: [p.add_bytes(10) for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.snapshot() == {"progress": 99, "message": "", "bytes_done": 1000}  # 100 is the result's


# ---------------------------------------------------------------------------- ControlPlane


def _cfg(tmp_path: Path) -> AgentConfig:
    return AgentConfig(data_dir=tmp_path / "a", name="a", server_url="https://127.0.0.1:1", site="s",
                       server="m", cloud="c", host="h", listen="127.0.0.1:7443")


class _Api:
    """A real HTTP server answering with a status chosen by the test; it records what it got."""

    def __init__(self) -> None:
        self.status = 200
        self.cancel = False
        self.got: list[tuple[float, str, Any]] = []
        self.claims: list[dict[str, Any]] = []  # tasks handed out, one per claim
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                self.do_POST()

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.got.append((time.monotonic(), self.path, json.loads(raw) if raw else None))
                answer: dict[str, Any] = {"ok": True}
                if self.path.endswith("/progress"):
                    answer = {"cancel_requested": api.cancel}
                elif self.path.endswith("/claim"):
                    answer = {"tasks": [api.claims.pop(0)] if api.claims else []}
                body = (json.dumps({"error": {"type": "NotFound", "message": "task 9 does not exist",
                                              "exit_code": 3}}) if api.status == 404
                        else json.dumps(answer) if api.status == 200 else "boom")
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[_Api]:
    a = _Api()
    yield a
    a.close()


def test_an_outage_is_logged_once_and_its_end_once(tmp_path: Path, api: _Api,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cp = ControlPlane(_cfg(tmp_path), client_factory=lambda: ApiClient(api.url, timeout=5))
    caplog.set_level(logging.INFO, logger="standby.agent")
    assert cp.call("POST", "/agent/heartbeat", {}) == {"ok": True}
    api.status = 503
    for _ in range(3):
        with pytest.raises(ControlPlaneDown):
            cp.call("POST", "/agent/heartbeat", {})
    api.status = 404  # an answer that says no is not an outage: it reaches the caller as itself
    with pytest.raises(NotFound):
        cp.call("POST", "/agent/tasks/9/result", {})
    assert cp.down_since is None
    api.status = 500
    with pytest.raises(ControlPlaneDown):
        cp.call("POST", "/agent/heartbeat", {})
    api.status = 200
    cp.call("POST", "/agent/heartbeat", {})
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in lines) == 2 and sum("reachable again" in m for m in lines) == 2
    assert lines.index(next(m for m in lines if "reachable again" in m)) == 1  # ended by the 404
    assert cp.outages == 2
    cp.close()


def test_connection_refused_is_an_outage(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    cp = ControlPlane(_cfg(tmp_path), client_factory=lambda: ApiClient(f"http://127.0.0.1:{port}", timeout=2))
    with pytest.raises(ControlPlaneDown, match="cannot reach"):
        cp.call("POST", "/agent/tasks/claim", {"max": 2})
    assert cp.down_since is not None
    cp.close()


def test_after_an_outage_the_heartbeat_probes_and_wakes_the_other_loops(
        tmp_path: Path, api: _Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """During an outage the heartbeat retries at its own interval whatever the backoff, and
    its first answer wakes the claim loop at once: a restarted control plane hears from
    every agent within one heartbeat interval (the grace it gives them, issue 16)."""
    from standby.agent.runtime import AgentRuntime

    monkeypatch.setattr(AgentRuntime, "_backoff", staticmethod(lambda delay: 3600.0))  # loops would sleep an hour
    cfg = _cfg(tmp_path)
    cp = ControlPlane(cfg, client_factory=lambda: ApiClient(api.url, timeout=5))
    rt = AgentRuntime(cfg, control_plane=cp)  # not started: the three loops run by hand below
    rt.heartbeat_seconds = 0.2
    api.status = 503
    loops = [threading.Thread(target=f, daemon=True)
             for f in (rt._heartbeat_loop, rt._task_loop, rt._control_plane_watch)]  # noqa: SLF001
    for t in loops:
        t.start()

    def posts(path: str) -> int:
        return sum(1 for _, p, _ in api.got if p.endswith(path))

    deadline = time.monotonic() + 30
    while (posts("/heartbeat") < 3 or posts("/claim") < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert posts("/heartbeat") >= 3 and posts("/claim") == 1  # the claim loop now sleeps its backoff
    api.status = 200
    deadline = time.monotonic() + 30
    while posts("/claim") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    rt.stop()
    for t in loops:
        t.join(10)
    assert posts("/claim") >= 2, api.got  # woken by the heartbeat's answer, not an hour later
    cp.close()


# ---------------------------------------------------------------------------- a task's reports


def _slow(env: TaskEnv, params: Any, progress: TaskProgress) -> dict[str, Any]:
    """A task of the test: 2.5 s of work, bytes counted as it goes."""
    progress.total_bytes = 100
    for _ in range(50):
        time.sleep(0.05)
        progress.add_bytes(2)
    return {"done": True, "cancel_seen": progress.cancel_requested}


def test_progress_is_posted_at_most_once_a_second_then_the_result(
        tmp_path: Path, api: _Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from standby.agent import tasks as tasks_mod
    from standby.agent.runtime import AgentRuntime, RunningTask

    monkeypatch.setitem(tasks_mod.DISPATCH, "slow", _slow)
    cp = ControlPlane(_cfg(tmp_path), client_factory=lambda: ApiClient(api.url, timeout=5))
    rt = AgentRuntime(_cfg(tmp_path), control_plane=cp)  # not started: no receiver, no loops
    rt.env = TaskEnv(ReplicaStore(tmp_path / "replicas"), tmp_path / "state", _no_driver, _no_tls)
    task = RunningTask({"id": 5, "kind": "slow", "params": {}})
    rt._tasks[5] = task  # noqa: SLF001 - as claim() does
    t0 = time.monotonic()
    outcome = rt._run(task)  # noqa: SLF001
    assert outcome.ok and outcome.result == {"done": True, "cancel_seen": False}
    task.outcome = outcome  # as the worker does
    assert rt._post_result(task)  # noqa: SLF001
    posts = [(t - t0, path, body) for t, path, body in api.got]
    progress = [p for p in posts if p[1].endswith("/tasks/5/progress")]
    assert progress[0][2] == {"progress": 0, "message": "started", "bytes_done": 0}
    gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:], strict=False)]
    # at most one post a second (the rule), and more than the first (the task took 2.5 s or
    # longer): how many exactly depends on how long it took on this machine
    ran = posts[-1][0]
    assert all(g >= 0.95 for g in gaps) and 2 <= len(progress) <= ran / 0.95 + 1, posts
    done = [p[2]["bytes_done"] for p in progress]
    assert done == sorted(done) and done[-1] > 0
    assert posts[-1][1].endswith("/tasks/5/result") and posts[-1][2] == {"ok": True, "result": outcome.result}
    assert 5 not in rt._tasks  # noqa: SLF001 - accepted: forgotten
    cp.close()


def test_a_cancel_before_the_start_is_honoured(tmp_path: Path, api: _Api) -> None:
    from standby.agent.runtime import AgentRuntime, RunningTask

    api.cancel = True
    cp = ControlPlane(_cfg(tmp_path), client_factory=lambda: ApiClient(api.url, timeout=5))
    rt = AgentRuntime(_cfg(tmp_path), control_plane=cp)
    rt.env = TaskEnv(ReplicaStore(tmp_path / "replicas"), tmp_path / "state", _no_driver, _no_tls)
    outcome = rt._run(RunningTask({"id": 6, "kind": "list_points", "params": {"disk_ids": ["d"]}}))  # noqa: SLF001
    assert not outcome.ok and "cancelled" in (outcome.error or "")
    cp.close()


def test_claims_ask_for_held_tasks_plus_free_workers_and_skip_known_ones(tmp_path: Path) -> None:
    """The control plane hands back the claimed, unfinished tasks first (up to max): the
    agent asks for those it holds plus its free workers, and runs only new ones."""
    from standby.agent.runtime import AgentRuntime, RunningTask

    answers = [{"tasks": [{"id": 1, "kind": "list_points", "params": {}, "attempt": 1},
                          {"id": 2, "kind": "list_points", "params": {}, "attempt": 1}]}]
    asked: list[Any] = []

    class Client:  # the control plane's answers, recorded (no network in this test)
        def request(self, method: str, path: str, json: Any = None) -> Any:
            asked.append(json)
            return answers.pop(0)

        def close(self) -> None:
            pass

    rt = AgentRuntime(_cfg(tmp_path), control_plane=ControlPlane(_cfg(tmp_path), client_factory=Client))
    held = RunningTask({"id": 1, "kind": "cycle"})
    rt._tasks[1] = held  # noqa: SLF001 - running here already
    new = rt.claim()
    assert asked == [{"max": 2}]  # 1 held + 1 free worker
    assert [t.id for t in new] == [2]


def test_a_refusal_is_logged_when_it_starts_changes_and_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from standby.agent.runtime import AgentRuntime

    rt = AgentRuntime(_cfg(tmp_path))
    caplog.set_level(logging.INFO, logger="standby.agent")
    rt._refused("heartbeat", None)  # noqa: SLF001 - nothing to end
    for msg in ("agent revoked", "agent revoked", "agent revoked", "libvirt down", "libvirt down"):
        rt._refused("heartbeat", msg)  # noqa: SLF001
    rt._refused("inventory", "libvirt down")  # noqa: SLF001 - its own loop
    rt._refused("heartbeat", None)  # noqa: SLF001
    rt._refused("heartbeat", None)  # noqa: SLF001
    assert [r.getMessage() for r in caplog.records] == [
        "heartbeat failed: agent revoked (retrying with backoff)",
        "heartbeat failed: libvirt down (retrying with backoff)",
        "inventory failed: libvirt down (retrying with backoff)",
        "heartbeat: works again",
    ]


def _started_runtime(tmp_path: Path, api: _Api, grace: float) -> Any:
    """A whole AgentRuntime (receiver, loops, workers) against the recording server."""
    from standby.agent.runtime import AgentRuntime
    from standby.errors import RemoteError
    from standby.replication import tls

    data = tmp_path / "a"
    data.mkdir()
    tls.init_ca(tmp_path / "ca")
    ident = tls.issue(tmp_path / "ca", "a", ["127.0.0.1"], out_dir=tmp_path / "issued")
    for src, name in ((ident.cert, "agent.crt"), (ident.key, "agent.key"), (ident.ca, "ca.crt")):
        (data / name).write_bytes(src.read_bytes())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = AgentConfig(data_dir=data, name="a", server_url="https://127.0.0.1:1", site="s", server="m", cloud="c",
                      host="h", listen=f"127.0.0.1:{port}")

    def no_hypervisor() -> Any:
        raise RemoteError("no hypervisor in this test")

    cp = ControlPlane(cfg, client_factory=lambda: ApiClient(api.url, timeout=5))
    return AgentRuntime(cfg, control_plane=cp, stop_grace=grace, driver_factory=no_hypervisor).start()


@pytest.mark.parametrize("grace", [10.0, 0.3])
def test_stop_waits_for_a_running_task_up_to_its_grace(tmp_path: Path, api: _Api, grace: float,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from standby.agent import tasks as tasks_mod

    monkeypatch.setitem(tasks_mod.DISPATCH, "slow", _slow)
    caplog.set_level(logging.INFO, logger="standby.agent")
    api.claims.append({"id": 7, "kind": "slow", "params": {}, "attempt": 1, "created_at": "2026-01-01T00:00:00Z"})
    rt = _started_runtime(tmp_path, api, grace)
    try:
        deadline = time.monotonic() + 10
        while not any(p.endswith("/tasks/7/progress") for _, p, _ in api.got):
            assert time.monotonic() < deadline, api.got
            time.sleep(0.05)
    finally:
        rt.stop()
    results = [b for _, p, b in api.got if p.endswith("/tasks/7/result")]
    if grace > 3:  # the task (2.5 s) ends within the grace: its result is in
        assert results == [{"ok": True, "result": {"done": True, "cancel_seen": False}}]
        assert not any("unfinished" in r.getMessage() for r in caplog.records)
    else:  # left unfinished, said so, and never reported (the next start gets it again)
        assert results == []
        assert any("1 task(s) unfinished (7 slow)" in r.getMessage() for r in caplog.records)
        time.sleep(3)
        assert not [p for _, p, _ in api.got if p.endswith("/tasks/7/result")]
    assert any(p.endswith("/agent/heartbeat") for _, p, _ in api.got)
    with socket.socket() as sock:  # the receiver is gone: its port is free again
        sock.bind(("127.0.0.1", rt.cfg.listen_port))
