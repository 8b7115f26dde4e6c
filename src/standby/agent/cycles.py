"""The agent's own replication cycles: it runs them on its timers, under the last desired
state the control plane gave it, and reports them in batches (issue 11).

Three parts, each on a thread of `agent run`:

- `DesiredFollower`: long-polls GET /agent/desired (the version it has, 25 s): a change
  arrives within a second. Each new state is written to `A/desired.json` before it is
  used, so an agent restarted while the control plane is away replicates under the last
  state it saw (and says so in its log).
- `CycleScheduler`: per desired VM, a timer (`domain/cycles.py`: one copy interval after
  the last cycle started, continuous as soon as it ended, a failed one again after
  min(interval, 30 s), at once when "replicate now" bumps `run_now`), and a pool of
  `workers` cycles at a time. A cycle is the `cycle` task's own code (`tasks.run_cycle`,
  with the VM's lock: a job's final sync of the same VM waits for it), with the bandwidth
  every cycle of the agent shares (the desired state's schedule, one token bucket).
  App-consistent points follow the policy's interval, timed here (`A/state/cycles.json`
  keeps when the last one was taken). Every `PRUNE_SECONDS` it prunes the replicas it
  holds as a secondary by their policy's retention.
- `ReportSpool` + the reporter: each finished cycle becomes a `CycleReport`, appended to
  `A/reports.jsonl` (fsynced) and posted in batches (POST /agent/reports) every
  `REPORT_SECONDS` or as soon as `REPORT_BATCH` are waiting. A batch the control plane did
  not take stays on disk and is sent again when it answers (each report is applied once).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from standby.contract import (MAX_REPORTS_PER_BATCH, CycleReport, DesiredReplica, DesiredState, DesiredVm, ReportBatch,
                              prune_params)
from standby.domain.cycles import consistency_for, retry_at
from standby.errors import StandbyError

log = logging.getLogger("standby.agent")

DESIRED_FILE = "desired.json"
REPORTS_FILE = "reports.jsonl"
CYCLES_STATE = "cycles.json"
LONG_POLL_SECONDS = 25.0
REPORT_SECONDS = 2.0
REPORT_BATCH = 50
PRUNE_SECONDS = 60.0
CONTINUOUS_GAP = 1.0  # continuous replication: at most one cycle start per second per VM


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- desired state


def load_desired(data_dir: Path) -> DesiredState | None:
    try:
        return DesiredState.model_validate_json((data_dir / DESIRED_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        log.warning("%s unreadable (%s): waiting for the control plane's desired state", data_dir / DESIRED_FILE, exc)
        return None


def save_desired(data_dir: Path, state: DesiredState) -> None:
    _write_json(data_dir / DESIRED_FILE, state.model_dump(mode="json"))


# ---------------------------------------------------------------------------- reports


class ReportSpool:
    """Cycle reports no control plane has taken yet, in order, in memory and on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._reports: list[CycleReport] = []
        self.ready = threading.Event()
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                self._reports.append(CycleReport.model_validate_json(line))
            except (ValidationError, ValueError):
                continue  # a line torn by a crash: that cycle's report is lost, its point is not
        if self._reports:
            log.info("%d cycle report(s) from before the restart wait for the control plane", len(self._reports))
            self.ready.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)

    def add(self, report: CycleReport) -> None:
        with self._lock:
            self._reports.append(report)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(report.model_dump_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
            if len(self._reports) >= REPORT_BATCH:
                self.ready.set()

    def batch(self, limit: int = MAX_REPORTS_PER_BATCH) -> list[CycleReport]:
        with self._lock:
            return list(self._reports[:limit])

    def taken(self, n: int) -> None:
        """The first `n` reports were taken: off the spool (the file rewritten)."""
        with self._lock:
            self._reports = self._reports[n:]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(r.model_dump_json() + "\n" for r in self._reports)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


# ---------------------------------------------------------------------------- cycles


@dataclass
class _Timer:
    next_due: float = 0.0  # now: a new VM gets its first cycle at once
    running: bool = False
    run_now_seen: int | None = None
    last_app: float | None = None


@dataclass
class CycleScheduler:
    """Runs the desired VMs' cycles on their timers (see the module doc)."""

    env: Any  # agent.tasks.TaskEnv
    state_dir: Path
    spool: ReportSpool
    workers: int = 2
    clock: Callable[[], float] = time.time
    run_cycle: Callable[..., dict[str, Any]] | None = None  # tasks.run_cycle (tests give their own)
    state: DesiredState | None = None
    timers: dict[int, _Timer] = field(default_factory=dict)
    wake: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None
    _last_prune: float = 0.0
    _futures: set[Future[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        try:
            saved = json.loads((self.state_dir / CYCLES_STATE).read_text())
        except (FileNotFoundError, ValueError):
            saved = {}
        for item_id, last_app in (saved.get("last_app") or {}).items():
            self.timers[int(item_id)] = _Timer(last_app=float(last_app))

    # ------------------------------------------------------------------ the desired state

    def update(self, state: DesiredState) -> None:
        """Follow a new desired state: new VMs get a cycle at once, removed ones no more."""
        from standby.domain.bandwidth import Schedule

        with self._lock:
            old = {v.item_id for v in (self.state.vms if self.state else [])}
            self.state = state
            for v in state.vms:
                t = self.timers.setdefault(v.item_id, _Timer(next_due=v.start_at or 0.0))
                if t.run_now_seen is None:
                    t.run_now_seen = v.run_now
                elif v.run_now != t.run_now_seen:
                    t.run_now_seen = v.run_now
                    t.next_due = 0.0  # "replicate now"
            gone = old - {v.item_id for v in state.vms}
        limiter = getattr(self.env, "limiter", None)
        if limiter is not None:
            try:
                limiter.set_schedule(Schedule.parse(state.bandwidth) if state.bandwidth else None)
            except (StandbyError, ValueError) as exc:
                log.warning("bandwidth schedule %r not understood (%s): no limit", state.bandwidth, exc)
                limiter.set_schedule(None)
        if gone:
            log.info("no longer replicating item(s) %s (desired state %s)", sorted(gone), state.version)
        self.wake.set()

    def active(self) -> list[int]:
        with self._lock:
            return [v.item_id for v in (self.state.vms if self.state else [])]

    def running(self) -> list[int]:
        with self._lock:
            return [i for i, t in self.timers.items() if t.running]

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="agent-cycle")
        try:
            while not stop.is_set():
                wait = self.tick()
                self.wake.wait(max(0.05, min(wait, 5.0)))
                self.wake.clear()
        finally:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False, cancel_futures=True)

    def tick(self) -> float:
        """Start the cycles that are due (as many as the pool takes); seconds until the next."""
        now = self.clock()
        soonest = 5.0
        with self._lock:
            state = self.state
            vms = list(state.vms) if state else []
            busy = sum(1 for t in self.timers.values() if t.running)
        for v in vms:
            t = self.timers.setdefault(v.item_id, _Timer(next_due=v.start_at or 0.0, run_now_seen=v.run_now))
            if t.running:
                continue
            if t.next_due > now:
                soonest = min(soonest, t.next_due - now)
                continue
            if busy >= self.workers or self._pool is None:
                soonest = min(soonest, 0.2)
                continue
            busy += 1
            with self._lock:
                t.running = True
            fut = self._pool.submit(self._cycle, v)
            self._futures.add(fut)
            fut.add_done_callback(self._futures.discard)
        if state is not None and state.replicas and now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            self.prune(state.replicas)
        return soonest

    def _cycle(self, vm: DesiredVm) -> None:
        from standby.agent.tasks import TaskProgress
        from standby.agent.tasks import run_cycle as task_cycle

        t = self.timers[vm.item_id]
        started = self.clock()
        params = vm.cycle.model_dump(mode="json")
        params["consistency"] = consistency_for(
            vm.app_consistent_interval_hours,
            datetime.fromtimestamp(t.last_app, UTC) if t.last_app else None, datetime.fromtimestamp(started, UTC))
        run = self.run_cycle or task_cycle
        report: CycleReport
        try:
            result = run(self.env, params, TaskProgress())
            consistency = str(result.get("consistency") or params["consistency"])
            report = CycleReport(cycle_id=uuid.uuid4().hex, item_id=vm.item_id, vm=vm.cycle.vm, ok=True,
                                 started_at=started, finished_at=self.clock(), scanned=vm.cycle.force_hash_scan,
                                 consistency="app" if consistency == "app" else "crash", result=result)
            if report.consistency == "app":
                t.last_app = started
                self._save()
            t.next_due = _next_after(vm, started, self.clock())
        except StandbyError as exc:
            partial = getattr(exc, "partial", None)
            report = CycleReport(cycle_id=uuid.uuid4().hex, item_id=vm.item_id, vm=vm.cycle.vm, ok=False,
                                 started_at=started, finished_at=self.clock(), scanned=vm.cycle.force_hash_scan,
                                 result=partial if isinstance(partial, dict) else {}, error=exc.message[:20000],
                                 error_type=type(exc).__name__)  # as a cycle task's result says it
            log.warning("cycle of %s (item %d) failed: %s", vm.cycle.vm, vm.item_id, exc.message)
            t.next_due = retry_at(vm.copy_frequency_seconds, datetime.fromtimestamp(self.clock(), UTC)).timestamp()
        except Exception as exc:  # noqa: BLE001 - a bug must not stop this VM's cycles
            log.exception("cycle of %s (item %d) failed", vm.cycle.vm, vm.item_id)
            report = CycleReport(cycle_id=uuid.uuid4().hex, item_id=vm.item_id, vm=vm.cycle.vm, ok=False,
                                 started_at=started, finished_at=self.clock(), error=f"{type(exc).__name__}: {exc}"[:20000],
                                 error_type=type(exc).__name__)
            t.next_due = retry_at(vm.copy_frequency_seconds, datetime.fromtimestamp(self.clock(), UTC)).timestamp()
        try:
            self.spool.add(report)
        except OSError as exc:  # a full disk: the point is made, its report is lost
            log.warning("cannot keep the report of the cycle of %s: %s", vm.cycle.vm, exc)
        finally:
            with self._lock:
                t.running = False  # after the report: an idle scheduler has reported all it ran
            self.wake.set()

    def _save(self) -> None:
        with self._lock:
            data = {"last_app": {str(i): t.last_app for i, t in self.timers.items() if t.last_app}}
        try:
            _write_json(self.state_dir / CYCLES_STATE, data)
        except OSError as exc:
            log.warning("cannot record the last app-consistent points: %s", exc)

    def prune(self, replicas: list[DesiredReplica]) -> None:
        """The replicas this agent holds, by their policy's retention (the prune task's code)."""
        from standby.agent.tasks import TaskProgress, run_prune

        for r in replicas:
            try:
                run_prune(self.env, prune_params(r.disk_ids, r.retention_hours, r.app_consistent_interval_hours,
                                                 r.keep_all_points_minutes), TaskProgress())
            except StandbyError as exc:
                log.warning("pruning the replica of item %d failed: %s", r.item_id, exc.message)

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the cycles in flight (at a stop); True when none is left."""
        end = time.monotonic() + timeout
        while self.running() and time.monotonic() < end:
            time.sleep(0.1)
        return not self.running()


def _next_after(vm: DesiredVm, started: float, now: float) -> float:
    if vm.copy_frequency_seconds <= 0:
        return max(now, started + CONTINUOUS_GAP)
    return max(started + vm.copy_frequency_seconds, now)


def report_batch(spool: ReportSpool, scheduler: CycleScheduler) -> ReportBatch:
    state = scheduler.state
    return ReportBatch(desired_version=state.version if state else None, active=scheduler.active(),
                       running=scheduler.running(), cycles=spool.batch())
