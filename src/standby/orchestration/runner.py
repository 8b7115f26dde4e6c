"""The job runner: runs persisted jobs step by step on a small thread pool.

    runner = JobRunner(store, settings, {"protect": PROTECT, ...})
    runner.start()                       # recovers jobs a previous control plane left
    with store.transaction() as s:
        job = runner.create_job(s, kind="protect", target="item:7", payload={...})
    # after the commit the job is dispatched (on_commit=runner.submit)
    runner.stop()

A `JobHandler` is an ordered list of named steps, each a function of a `StepContext`. The
job row is the source of truth: a step is persisted as running (`jobs.start_step`) before
it acts and as succeeded after; a job resumed after a restart starts at its first step
that has not ended, so every step must be idempotent (check what is done before doing
it). Outcomes:

- a step raises a `StandbyError` -> the job is `failed` with the error's message (the work
  said no) and a `job_failed` alert is raised;
- a step raises anything else -> `errored` (a bug), logged with its traceback, alerted too;
- an operator's cancel request, seen between steps and while a step waits
  (`ctx.wait_until`) -> `cancelled`;
- the runner stops while a step runs (`stop()`): the job is left `running`, as a crash
  would leave it; the next runner's `start()` resumes it (resumable) or ends it `errored`
  ("control plane restarted"), through `jobs.recover_at_startup`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from standby.errors import RemoteError, StandbyError
from standby.orchestration.settings import ServerSettings
from standby.store import Store
from standby.store.models import Job, ProtectedItem
from standby.store.repo import alerts, jobs
from standby.store.states import JOB_TERMINAL, STEP_TERMINAL, JobState, StepState

log = logging.getLogger("standby.runner")

T = TypeVar("T")
StepFn = Callable[["StepContext"], None]


class JobCancelled(Exception):
    """Raised inside a step when the operator asked the job to stop."""


class RunnerStopping(Exception):
    """Raised inside a step when the runner stops: the job is left for the next runner."""


class WaitTimeout(RemoteError):
    """`wait_until` gave up: what it waited for did not happen in time."""


@dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn


@dataclass(frozen=True)
class JobHandler:
    """How to run one kind of job. `on_end(ctx, state, error)` runs (in its own
    transactions) when the job ends failed, errored or cancelled: undo or record what
    the steps left half done. It must not raise; what it raises is logged."""

    steps: Sequence[Step]
    resumable: bool = True
    on_end: Callable[[StepContext, JobState, str], None] | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a job handler needs steps with distinct names, not {names}")

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]


@dataclass
class StepContext:
    """What a step sees: the job's payload, the store, and ways to report and wait."""

    runner: JobRunner
    job_id: int
    kind: str
    payload: dict[str, Any]
    step_position: int = 0
    step_name: str = ""
    steps_total: int = 1
    result: dict[str, Any] = field(default_factory=dict)  # merged into the job's result when it succeeds

    @property
    def store(self) -> Store:
        return self.runner.store

    @property
    def settings(self) -> ServerSettings:
        return self.runner.settings

    def report(self, progress: int, message: str) -> None:
        """The running step's progress (0..100) and message; the job's progress follows."""
        progress = max(0, min(100, int(progress)))
        overall = int((self.step_position + progress / 100) * 100 / max(self.steps_total, 1))
        with self.store.transaction() as s:
            jobs.update_step(s, self.job_id, self.step_position, progress=progress, message=message)
            jobs.report(s, self.job_id, progress=min(overall, 99), message=message)

    def cancel_requested(self) -> bool:
        with self.store.read() as s:
            return jobs.get(s, self.job_id).cancel_requested_at is not None

    def check(self) -> None:
        """Raise if the job should stop now (cancel requested, runner stopping)."""
        if self.runner.stopping:
            raise RunnerStopping()
        if self.cancel_requested():
            raise JobCancelled()

    def wait_until(self, predicate: Callable[[Session], T | None], timeout: float, poll: float = 1.0,
                   what: str = "the condition", on_poll: Callable[[], None] | None = None) -> T:
        """Poll `predicate(session)` (a read session) until it returns a truthy value, which
        is returned. Stops early on a cancel request or a stopping runner; `WaitTimeout`
        (a failure) after `timeout` seconds. A predicate may raise `StandbyError` to fail
        the job (what it waited for went wrong). `on_poll()` runs after each unsuccessful
        poll, outside the read session (a place to `report` what the wait is on). Return
        plain values, not ORM objects: the read session expires its objects when it ends."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                with self.store.read() as s:
                    value = predicate(s)
            except StandbyError:
                # What went wrong may be the operator's cancel itself (disabling protection
                # cancels the item's jobs in the same transaction): that is a cancel.
                if self.cancel_requested():
                    raise JobCancelled() from None
                raise
            if value:
                return value
            if on_poll is not None:
                on_poll()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"gave up waiting for {what} after {timeout:g} s")
            if self.runner.wait_stopping(min(poll, left)):
                raise RunnerStopping()


class JobRunner:
    def __init__(self, store: Store, settings: ServerSettings, handlers: Mapping[str, JobHandler],
                 *, name: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.handlers = dict(handlers)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[int] = []  # submitted before start()
        self._active: set[int] = set()  # dispatched in this runner and not yet returned
        self._started = False

    # ------------------------------------------------------------ lifecycle

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_stopping(self, seconds: float) -> bool:
        return self._stop.wait(seconds)

    def start(self) -> list[int]:
        """Recover what a previous control plane left (`jobs.recover_at_startup`), then
        dispatch those jobs and any submitted before now. Returns the dispatched ids."""
        with self._lock:
            if self._started:
                raise RuntimeError("the job runner is already started")
            self._started = True
            self._pool = ThreadPoolExecutor(max_workers=self.settings.runner_workers, thread_name_prefix="job")
        with self.store.transaction() as s:
            rec = jobs.recover_at_startup(s)
        for job_id in rec.errored:
            log.warning("job %d was running when the control plane stopped and cannot be resumed", job_id)
        if rec.requeued:
            log.info("resuming jobs %s after a restart", rec.requeued)
        with self._lock:
            todo = sorted(set(rec.to_dispatch) | set(self._pending))
            self._pending.clear()
        for job_id in todo:
            self.submit(job_id)
        return todo

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work; steps that wait notice at once and leave their job running for
        the next runner. Waits for the worker threads. Safe to call twice."""
        self._stop.set()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------ jobs

    def create_job(self, session: Session, *, kind: str, target: str = "", payload: dict[str, Any] | None = None,
                   created_by: str | None = None, now: datetime | None = None) -> Job:
        """A queued job of a kind this runner handles (its steps and resumability from the
        handler), dispatched once `session`'s transaction commits."""
        handler = self.handlers.get(kind)
        if handler is None:
            raise ValueError(f"no handler for job kind {kind!r}")
        return jobs.create(session, kind=kind, target=target, created_by=created_by, payload=payload,
                           steps=handler.step_names, resumable=handler.resumable, on_commit=self.submit, now=now)

    def submit(self, job_id: int) -> None:
        """Run job `job_id` (queued in the store) on a worker; a job already running in this
        runner is not started twice, and one that is no longer queued is left alone."""
        with self._lock:
            if self._stop.is_set():
                return  # stays queued in the store: the next start() dispatches it
            if self._pool is None:
                self._pending.append(job_id)
                return
            if job_id in self._active:
                return
            self._active.add(job_id)
            self._pool.submit(self._run_guarded, job_id)

    def poll(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Dispatch queued jobs found in the store every `interval` seconds: jobs another
        worker of this control plane created (`server run --workers N`: only the leader's
        runner runs jobs), and any whose dispatch at commit was missed."""
        from sqlalchemy import select

        while not stop.wait(interval) and not self._stop.is_set():
            try:
                with self.store.read() as s:
                    ids = list(s.scalars(select(Job.id).where(Job.state == JobState.QUEUED.value)
                                        .order_by(Job.id).limit(100)))
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("looking for queued jobs failed", exc_info=True)
                continue
            for job_id in ids:
                self.submit(job_id)

    def _run_guarded(self, job_id: int) -> None:
        try:
            self._run(job_id)
        except Exception:  # the runner's own bookkeeping failed (the store went away ...)
            log.exception("job %d: the runner failed while running it", job_id)
        finally:
            with self._lock:
                self._active.discard(job_id)

    def _claim(self, job_id: int) -> tuple[JobHandler, StepContext, list[tuple[int, str, str]]] | None:
        """queued -> running, or None when the job is not ours to run."""
        with self.store.transaction() as s:
            job = jobs.get(s, job_id, lock=True)
            if job.state != JobState.QUEUED:
                return None
            handler = self.handlers.get(job.kind)
            if handler is None:
                jobs.finish(s, job_id, JobState.ERRORED, error=f"no handler for job kind {job.kind!r}")
                return None
            if job.cancel_requested_at is not None:
                jobs.finish(s, job_id, JobState.CANCELLED, message="cancelled before it started")
                return None
            jobs.start(s, job_id, runner=self.name)
            steps = [(st.position, st.name, st.state) for st in job.steps]
            ctx = StepContext(self, job_id, job.kind, dict(job.payload or {}), steps_total=len(steps))
        return handler, ctx, steps

    def _run(self, job_id: int) -> None:
        claimed = self._claim(job_id)
        if claimed is None:
            return
        handler, ctx, steps = claimed
        fns = {st.name: st.fn for st in handler.steps}
        position = -1
        try:
            for position, name, state in steps:
                if StepState(state) in STEP_TERMINAL:
                    continue  # done before a restart
                fn = fns.get(name)
                if fn is None:
                    raise RuntimeError(f"the {ctx.kind} handler has no step {name!r}")
                ctx.check()
                ctx.step_position, ctx.step_name = position, name
                with self.store.transaction() as s:
                    jobs.start_step(s, job_id, position)
                    jobs.report(s, job_id, message=name)
                log.info("job %d (%s): %s", job_id, ctx.kind, name)
                fn(ctx)
                with self.store.transaction() as s:
                    jobs.finish_step(s, job_id, position, StepState.SUCCEEDED)
                    jobs.report(s, job_id, progress=min(99, int((position + 1) * 100 / len(steps))))
            with self.store.transaction() as s:
                jobs.finish(s, job_id, JobState.SUCCEEDED, result=ctx.result or None, message="done")
            log.info("job %d (%s) succeeded", job_id, ctx.kind)
        except RunnerStopping:
            log.info("job %d (%s): left running at step %d for the next runner", job_id, ctx.kind, position)
        except JobCancelled:
            self._end(handler, ctx, JobState.CANCELLED, "cancelled by request")
        except StandbyError as e:
            self._end(handler, ctx, JobState.FAILED, e.message or type(e).__name__)
        except Exception as e:
            log.exception("job %d (%s) errored in step %r", job_id, ctx.kind, ctx.step_name)
            self._end(handler, ctx, JobState.ERRORED, f"{type(e).__name__}: {e}")

    def _end(self, handler: JobHandler, ctx: StepContext, state: JobState, error: str) -> None:
        if handler.on_end is not None:
            try:
                handler.on_end(ctx, state, error)
            except Exception:
                log.exception("job %d (%s): its end hook failed", ctx.job_id, ctx.kind)
        with self.store.transaction() as s:
            job = jobs.get(s, ctx.job_id, lock=True)
            if JobState(job.state) in JOB_TERMINAL:
                return
            if state == JobState.CANCELLED:
                jobs.finish(s, ctx.job_id, state, message=error)
                return
            where = f" (step {ctx.step_name!r})" if ctx.step_name else ""
            jobs.finish(s, ctx.job_id, state, error=error, message=f"{state.value}{where}")
            item_id = ctx.payload.get("item_id")
            if not isinstance(item_id, int) or s.get(ProtectedItem, item_id) is None:
                item_id = None  # the alert outlives a removed item
            alerts.raise_alert(
                s,
                kind="job_failed",
                severity="warning",
                subject=f"job:{ctx.job_id}",
                message=f"{ctx.kind} job {ctx.job_id} {state.value}{where}: {error}",
                item_id=item_id,
            )
        log.warning("job %d (%s) %s%s: %s", ctx.job_id, ctx.kind, state.value, where, error)
