"""Jobs: created in one transaction, handed to a runner only after it commits; moved
through their states under a row lock; found again when the control plane restarts.

    with store.transaction() as s:
        job = jobs.create(s, kind="protect", target="item:7", steps=["check", "seed"],
                          payload={"item": 7}, resumable=True, on_commit=runner.submit)

    # in the runner, each call in its own short transaction:
    jobs.start(s, job_id, runner="cp-1:4242")
    jobs.start_step(s, job_id, 0)
    jobs.finish_step(s, job_id, 0, StepState.SUCCEEDED)
    jobs.report(s, job_id, progress=50, message="seeding")
    jobs.finish(s, job_id, JobState.FAILED, error="readiness: 2 errors")

Every state change checks `states.JOB_TRANSITIONS`: a terminal job never moves again,
and a refused move raises `Refused` naming both states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.errors import BadInput, Refused
from standby.store import db
from standby.store.models import Job, JobStep
from standby.store.repo._common import get as _get
from standby.store.repo._common import now_or
from standby.store.states import (
    JOB_TERMINAL,
    STEP_TERMINAL,
    JobState,
    StepState,
    job_can_move,
    step_can_move,
)

NON_TERMINAL = tuple(s.value for s in JobState if s not in JOB_TERMINAL)


def create(
    session: Session,
    *,
    kind: str,
    target: str = "",
    created_by: str | None = None,
    payload: dict[str, Any] | None = None,
    steps: Sequence[str] = (),
    resumable: bool = False,
    on_commit: Callable[[int], Any] | None = None,
    now: datetime | None = None,
) -> Job:
    """A queued job with its steps (pending). `on_commit(job_id)` runs once the
    transaction commits: that is where the job goes to a runner."""
    now = now_or(now)
    job = Job(
        kind=kind,
        target=target,
        created_by=created_by,
        payload=dict(payload or {}),
        resumable=resumable,
        state=JobState.QUEUED.value,
        progress=0,
        message="",
        created_at=now,
        updated_at=now,
        steps=[
            JobStep(position=i, name=name, state=StepState.PENDING.value, progress=0) for i, name in enumerate(steps)
        ],
    )
    session.add(job)
    session.flush()
    if on_commit is not None:
        job_id = job.id
        db.on_commit(session, lambda: on_commit(job_id))
    return job


def submit(store: db.Store, dispatch: Callable[[int], Any], **create_kw: Any) -> Job:
    """Create a job in its own transaction, then `dispatch(job.id)` after the commit."""
    with store.transaction() as s:
        job = create(s, on_commit=dispatch, **create_kw)
    return job


def get(session: Session, job_id: int, *, lock: bool = False) -> Job:
    return _get(session, Job, job_id, "job", lock=lock)


def list_jobs(
    session: Session,
    *,
    states: Iterable[str] | None = None,
    kind: str | None = None,
    target: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Job]:
    """Newest first; page with `before_id` (the smallest id of the previous page)."""
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if states is not None:
        q = q.where(Job.state.in_([JobState(s).value for s in states]))
    if kind is not None:
        q = q.where(Job.kind == kind)
    if target is not None:
        q = q.where(Job.target == target)
    if before_id is not None:
        q = q.where(Job.id < before_id)
    return list(session.scalars(q))


def unfinished(session: Session) -> list[Job]:
    """Every job not in a terminal state, oldest first."""
    return list(session.scalars(select(Job).where(Job.state.in_(NON_TERMINAL)).order_by(Job.id)))


def _move(job: Job, new: JobState) -> None:
    if not job_can_move(job.state, new):
        if JobState(job.state) in JOB_TERMINAL:
            raise Refused(f"job {job.id} has ended ({job.state}); it cannot become {new.value}")
        raise Refused(f"job {job.id} cannot go from {job.state} to {new.value}")
    job.state = new.value


def start(session: Session, job_id: int, *, runner: str | None = None, now: datetime | None = None) -> Job:
    """queued -> running. `started_at` keeps the first start; `attempts` counts starts."""
    now = now_or(now)
    job = get(session, job_id, lock=True)
    _move(job, JobState.RUNNING)
    job.started_at = job.started_at or now
    job.attempts += 1
    job.runner = runner
    job.updated_at = now
    session.flush()
    return job


def _check_progress(progress: int) -> int:
    if not 0 <= progress <= 100:
        raise BadInput(f"progress {progress} is not between 0 and 100")
    return progress


def report(
    session: Session,
    job_id: int,
    *,
    progress: int | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> Job:
    """Progress and message of a running job."""
    job = get(session, job_id, lock=True)
    if job.state != JobState.RUNNING:
        raise Refused(f"job {job.id} is {job.state}, not running: no progress to report")
    if progress is not None:
        job.progress = _check_progress(progress)
    if message is not None:
        job.message = message
    job.updated_at = now_or(now)
    session.flush()
    return job


def _step(job: Job, position: int) -> JobStep:
    for step in job.steps:
        if step.position == position:
            return step
    raise BadInput(f"job {job.id} has no step {position}")


def _move_step(job: Job, step: JobStep, new: StepState) -> None:
    if not step_can_move(step.state, new):
        raise Refused(f"step {step.position} ({step.name}) of job {job.id} cannot go from {step.state} to {new.value}")
    step.state = new.value


def _running_job(session: Session, job_id: int) -> Job:
    job = get(session, job_id, lock=True)
    if job.state != JobState.RUNNING:
        raise Refused(f"job {job.id} is {job.state}, not running: its steps cannot change")
    return job


def start_step(
    session: Session, job_id: int, position: int, *, message: str | None = None, now: datetime | None = None
) -> JobStep:
    now = now_or(now)
    job = _running_job(session, job_id)
    step = _step(job, position)
    _move_step(job, step, StepState.RUNNING)
    step.started_at = now
    step.ended_at = None
    if message is not None:
        step.message = message
    job.updated_at = now
    session.flush()
    return step


def update_step(
    session: Session,
    job_id: int,
    position: int,
    *,
    progress: int | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> JobStep:
    job = _running_job(session, job_id)
    step = _step(job, position)
    if step.state != StepState.RUNNING:
        raise Refused(f"step {step.position} ({step.name}) of job {job.id} is {step.state}, not running")
    if progress is not None:
        step.progress = _check_progress(progress)
    if message is not None:
        step.message = message
    job.updated_at = now_or(now)
    session.flush()
    return step


def finish_step(
    session: Session,
    job_id: int,
    position: int,
    state: StepState | str,
    *,
    message: str | None = None,
    now: datetime | None = None,
) -> JobStep:
    """End a step (succeeded, failed, errored, skipped or cancelled)."""
    now = now_or(now)
    new = StepState(state)
    if new not in STEP_TERMINAL:
        raise BadInput(f"{new.value} is not a final step state")
    job = _running_job(session, job_id)
    step = _step(job, position)
    _move_step(job, step, new)
    step.ended_at = now
    if new == StepState.SUCCEEDED:
        step.progress = 100
    if message is not None:
        step.message = message
    job.updated_at = now
    session.flush()
    return step


# What an ending job does to its unfinished steps: (running step -> , pending step -> ).
_STEP_OUTCOME: dict[JobState, tuple[StepState, StepState]] = {
    JobState.SUCCEEDED: (StepState.SUCCEEDED, StepState.SKIPPED),
    JobState.FAILED: (StepState.FAILED, StepState.SKIPPED),
    JobState.ERRORED: (StepState.ERRORED, StepState.SKIPPED),
    JobState.CANCELLED: (StepState.CANCELLED, StepState.CANCELLED),
}


def finish(
    session: Session,
    job_id: int,
    state: JobState | str,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> Job:
    """End a job: succeeded, failed (the work said no), errored (the code broke) or
    cancelled. Failed and errored jobs need an `error` saying why. Unfinished steps end
    with the job (a running step takes its outcome; pending ones are skipped)."""
    now = now_or(now)
    new = JobState(state)
    if new not in JOB_TERMINAL:
        raise BadInput(f"{new.value} is not a final job state")
    if new in (JobState.FAILED, JobState.ERRORED) and not error:
        raise BadInput(f"a {new.value} job needs an error message")
    job = get(session, job_id, lock=True)
    _move(job, new)
    running_to, pending_to = _STEP_OUTCOME[new]
    for step in job.steps:
        if step.state == StepState.RUNNING:
            step.state = running_to.value
            step.ended_at = now
            if running_to == StepState.SUCCEEDED:
                step.progress = 100
        elif step.state == StepState.PENDING:
            step.state = pending_to.value
    job.ended_at = now
    job.updated_at = now
    job.error = error
    if result is not None:
        job.result = dict(result)
    if message is not None:
        job.message = message
    if new == JobState.SUCCEEDED:
        job.progress = 100
    session.flush()
    return job


def request_cancel(session: Session, job_id: int, *, now: datetime | None = None) -> Job:
    """Cancel a queued job at once; ask a running one to stop (its runner sees
    `cancel_requested_at` and ends it as cancelled). A job that has ended is refused."""
    now = now_or(now)
    job = get(session, job_id, lock=True)
    if JobState(job.state) in JOB_TERMINAL:
        raise Refused(f"job {job.id} has ended ({job.state}); there is nothing to cancel")
    job.cancel_requested_at = job.cancel_requested_at or now
    session.flush()
    if job.state == JobState.QUEUED:
        return finish(session, job.id, JobState.CANCELLED, message="cancelled before it started", now=now)
    return job


def requeue(session: Session, job_id: int, *, message: str, now: datetime | None = None) -> Job:
    """running -> queued, to be resumed from its payload; running steps become pending."""
    now = now_or(now)
    job = get(session, job_id, lock=True)
    _move(job, JobState.QUEUED)
    for step in job.steps:
        if step.state == StepState.RUNNING:
            _move_step(job, step, StepState.PENDING)
            step.started_at = None
    job.runner = None
    job.message = message
    job.updated_at = now
    session.flush()
    return job


@dataclass
class Recovery:
    """What `recover_at_startup` did, by job id."""

    queued: list[int] = field(default_factory=list)  # were queued: dispatch them again
    requeued: list[int] = field(default_factory=list)  # were running, resumable: dispatch them again
    errored: list[int] = field(default_factory=list)  # were running, not resumable: ended as errored
    cancelled: list[int] = field(default_factory=list)  # were running with a cancel request: ended as cancelled

    @property
    def to_dispatch(self) -> list[int]:
        return sorted(self.queued + self.requeued)


def recover_at_startup(session: Session, *, now: datetime | None = None) -> Recovery:
    """At control-plane start-up, before the runner takes new work: no job is forgotten.

    Queued jobs stay queued; running jobs were orphaned by the previous process: a
    resumable one goes back to the queue, one with a cancel request is cancelled, any
    other ends as errored with a message saying why. Dispatch `Recovery.to_dispatch`
    after this transaction commits. (One control plane per store: a second, live
    control plane's running jobs would be treated as orphans too.)"""
    now = now_or(now)
    rec = Recovery()
    for job in unfinished(session):
        job = get(session, job.id, lock=True)
        if job.state == JobState.QUEUED:
            rec.queued.append(job.id)
        elif job.cancel_requested_at is not None:
            finish(session, job.id, JobState.CANCELLED, message="cancelled: the control plane restarted", now=now)
            rec.cancelled.append(job.id)
        elif job.resumable:
            requeue(
                session, job.id, message=f"resuming after a control-plane restart (attempt {job.attempts + 1})", now=now
            )
            rec.requeued.append(job.id)
        else:
            was = f" (runner {job.runner})" if job.runner else ""
            finish(
                session,
                job.id,
                JobState.ERRORED,
                error=f"the control plane stopped while this job was running{was}; it cannot be resumed",
                now=now,
            )
            rec.errored.append(job.id)
    return rec
