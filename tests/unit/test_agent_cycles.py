"""The agent's own cycle timers and its report spool (agent/cycles.py), without a network:
the cycle itself is a function the test gives, the clock is the test's."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from standby.agent.cycles import (
    CONTINUOUS_GAP,
    CycleScheduler,
    ReportSpool,
    load_desired,
    report_batch,
    save_desired,
)
from standby.contract import CycleParams, CycleReport, DesiredState, DesiredVm, Peer
from standby.errors import StandbyError


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Cycles:
    """The cycle function: records what it ran; fails when told to."""

    def __init__(self) -> None:
        self.ran: list[dict[str, Any]] = []
        self.fail: set[str] = set()
        self.gate: threading.Event | None = None

    def __call__(self, env: Any, params: dict[str, Any], progress: Any) -> dict[str, Any]:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.ran.append(params)
        if params["vm"] in self.fail:
            raise StandbyError(f"{params['vm']}: the peer refused")
        return {"completed": True, "consistency": params["consistency"], "points": {"d": "p1"}}


def vm(item_id: int, name: str, freq: int = 300, **kw: Any) -> DesiredVm:
    return DesiredVm(item_id=item_id, state="protected", copy_frequency_seconds=freq,
                     cycle=CycleParams(item_id=item_id, vm=name, peer=Peer(name="b", address="10.0.0.2:7443")), **kw)


def state(*vms: DesiredVm, run: int = 0) -> DesiredState:
    return DesiredState(agent="host-a", vms=list(vms)).with_version()


@pytest.fixture
def sched(tmp_path: Path) -> tuple[CycleScheduler, Clock, Cycles]:
    clock, cycles = Clock(), Cycles()
    s = CycleScheduler(env=object(), state_dir=tmp_path / "state", spool=ReportSpool(tmp_path / "reports.jsonl"),
                       workers=2, clock=clock, run_cycle=cycles)
    return s, clock, cycles


def _run_due(s: CycleScheduler) -> float:
    """One tick with the pool started, then wait for the cycles it started."""
    from concurrent.futures import ThreadPoolExecutor

    if s._pool is None:
        s._pool = ThreadPoolExecutor(max_workers=s.workers)
    wait = s.tick()
    assert s.wait_idle(10)
    return wait


def test_a_new_vm_replicates_at_once_then_one_interval_after_the_last_start(sched: Any) -> None:
    s, clock, cycles = sched
    s.update(state(vm(1, "web", freq=300)))
    _run_due(s)
    assert [p["vm"] for p in cycles.ran] == ["web"]
    clock.t += 299
    _run_due(s)
    assert len(cycles.ran) == 1
    clock.t += 1
    _run_due(s)
    assert len(cycles.ran) == 2
    assert [r.ok for r in s.spool.batch()] == [True, True]
    assert {r.item_id for r in s.spool.batch()} == {1}


def test_continuous_replication_starts_again_as_soon_as_a_cycle_ends(sched: Any) -> None:
    s, clock, cycles = sched
    s.update(state(vm(1, "db", freq=0)))
    _run_due(s)
    clock.t += CONTINUOUS_GAP
    _run_due(s)
    assert len(cycles.ran) == 2


def test_a_failed_cycle_is_tried_again_after_the_backoff_and_reported(sched: Any) -> None:
    s, clock, cycles = sched
    cycles.fail.add("web")
    s.update(state(vm(1, "web", freq=900)))
    _run_due(s)
    (report,) = s.spool.batch()
    assert not report.ok and "refused" in (report.error or "") and report.error_type == "StandbyError"
    clock.t += 29
    _run_due(s)
    assert len(cycles.ran) == 1
    clock.t += 1  # min(interval, 30 s)
    _run_due(s)
    assert len(cycles.ran) == 2


def test_replicate_now_runs_a_cycle_at_once_and_a_removed_vm_no_more(sched: Any) -> None:
    s, clock, cycles = sched
    s.update(state(vm(1, "web"), vm(2, "db")))
    _run_due(s)
    assert len(cycles.ran) == 2
    clock.t += 10
    s.update(state(vm(1, "web", run_now=1), vm(2, "db")))
    _run_due(s)
    assert [p["vm"] for p in cycles.ran[2:]] == ["web"]
    s.update(state(vm(1, "web", run_now=1)))
    clock.t += 1000
    _run_due(s)
    assert [p["vm"] for p in cycles.ran[3:]] == ["web"] and s.active() == [1]


def test_a_scheduled_initial_replication_waits_for_its_start(sched: Any) -> None:
    s, clock, cycles = sched
    s.update(state(vm(1, "web", start_at=clock.t + 60)))
    wait = _run_due(s)
    assert not cycles.ran and 0 < wait <= 5
    clock.t += 60
    _run_due(s)
    assert len(cycles.ran) == 1


def test_no_more_cycles_at_once_than_workers(sched: Any) -> None:
    s, clock, cycles = sched
    cycles.gate = threading.Event()
    s.update(state(*(vm(i, f"vm{i}") for i in range(1, 6))))
    from concurrent.futures import ThreadPoolExecutor

    s._pool = ThreadPoolExecutor(max_workers=5)  # the cap is the scheduler's, not the pool's
    s.tick()
    assert len(s.running()) == 2
    s.tick()
    assert len(s.running()) == 2
    cycles.gate.set()
    assert s.wait_idle(10)
    for _ in range(3):
        s.tick()
        assert s.wait_idle(10)
    assert sorted(p["vm"] for p in cycles.ran) == [f"vm{i}" for i in range(1, 6)]


def test_app_consistent_points_follow_the_policy_across_a_restart(tmp_path: Path) -> None:
    clock, cycles = Clock(), Cycles()

    def make() -> CycleScheduler:
        return CycleScheduler(env=object(), state_dir=tmp_path / "state", spool=ReportSpool(tmp_path / "r.jsonl"),
                              clock=clock, run_cycle=cycles)

    s = make()
    s.update(state(vm(1, "web", freq=300, app_consistent_interval_hours=1)))
    _run_due(s)
    assert cycles.ran[-1]["consistency"] == "app" and s.spool.batch()[-1].consistency == "app"
    clock.t += 300
    _run_due(s)
    assert cycles.ran[-1]["consistency"] == "crash"
    s2 = make()  # an agent restart keeps when the last app-consistent point was taken
    s2.update(state(vm(1, "web", freq=300, app_consistent_interval_hours=1)))
    _run_due(s2)
    assert cycles.ran[-1]["consistency"] == "crash"
    clock.t += 3600
    _run_due(s2)
    assert cycles.ran[-1]["consistency"] == "app"


def test_the_spool_keeps_reports_across_a_restart_and_drops_only_what_was_taken(tmp_path: Path) -> None:
    path = tmp_path / "reports.jsonl"
    spool = ReportSpool(path)
    for i in range(3):
        spool.add(CycleReport(cycle_id=f"c{i}", item_id=1, vm="web", ok=True, started_at=i, finished_at=i + 1))
    with open(path, "a") as f:
        f.write('{"cycle_id": "torn", "item_')  # a crash mid-append
    again = ReportSpool(path)
    assert [r.cycle_id for r in again.batch()] == ["c0", "c1", "c2"] and again.ready.is_set()
    again.taken(2)
    assert [r.cycle_id for r in ReportSpool(path).batch()] == ["c2"]
    assert [r.cycle_id for r in again.batch(limit=1)] == ["c2"]


def test_the_desired_state_survives_a_restart_and_a_torn_file_is_not_used(tmp_path: Path) -> None:
    st = state(vm(1, "web"))
    save_desired(tmp_path, st)
    assert load_desired(tmp_path) == st
    (tmp_path / "desired.json").write_text('{"agent": ')
    assert load_desired(tmp_path) is None
    assert load_desired(tmp_path / "nowhere") is None


def test_a_report_batch_names_the_desired_version_and_what_runs(sched: Any) -> None:
    s, clock, cycles = sched
    st = state(vm(1, "web"), vm(2, "db"))
    s.update(st)
    _run_due(s)
    batch = report_batch(s.spool, s)
    assert batch.desired_version == st.version and batch.active == [1, 2] and batch.running == []
    assert sorted(r.item_id for r in batch.cycles) == [1, 2]
