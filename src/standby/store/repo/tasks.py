"""Agent tasks: work the control plane hands to one agent, which pulls it.

A task is queued for an agent (`enqueue`), claimed by it (`claim`: queued tasks become
claimed, and tasks it claimed earlier but never finished are handed back, so a restarted
agent picks its work up again), reported on (`progress`) and finished once (`finish`,
idempotent: a repeated or late result changes nothing). A task still open at its
`deadline_at` expires (`expire`, run by the scheduler). Cancelling a queued task ends it;
cancelling a claimed one asks the agent to stop (`cancel_requested`).

States: queued -> claimed -> succeeded | failed | cancelled; queued | claimed -> expired;
queued -> cancelled. Finished states are final.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from standby.errors import BadInput, NotFound
from standby.store.models import TASK_OPEN_STATES, TASK_STATES, AgentTask
from standby.store.repo._common import get as _get
from standby.store.repo._common import now_or

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
DEADLINE_EXPIRED = "the task was not finished by its deadline"


def enqueue(
    session: Session,
    *,
    agent_id: int,
    kind: str,
    params: dict[str, Any],
    item_id: int | None = None,
    job_id: int | None = None,
    deadline_seconds: float,
    now: datetime | None = None,
) -> AgentTask:
    """Queue a task for an agent; it expires unless finished within `deadline_seconds`."""
    _check(kind, deadline_seconds)
    now = now_or(now)
    task = AgentTask(**_row(NewTask(agent_id, kind, params, item_id, job_id), now, deadline_seconds))
    session.add(task)
    session.flush()
    return task


def _check(kind: str, deadline_seconds: float) -> None:
    if not _KIND.match(kind):
        raise BadInput(f"task kind {kind!r} is not a lower-case identifier of up to 40 characters")
    if not deadline_seconds > 0:
        raise BadInput(f"a task's deadline must be in the future, not {deadline_seconds!r} s away")


@dataclass(frozen=True)
class NewTask:
    """One task for `enqueue_many`."""

    agent_id: int
    kind: str
    params: dict[str, Any]
    item_id: int | None = None
    job_id: int | None = None


def _row(t: NewTask, now: datetime, deadline_seconds: float) -> dict[str, Any]:
    return {
        "agent_id": t.agent_id,
        "kind": t.kind,
        "params": dict(t.params),
        "state": "queued",
        "attempt": 0,
        "progress": 0,
        "message": "",
        "item_id": t.item_id,
        "job_id": t.job_id,
        "created_at": now,
        "deadline_at": now + timedelta(seconds=deadline_seconds),
    }


def enqueue_many(
    session: Session, new: Sequence[NewTask], *, deadline_seconds: float, now: datetime | None = None
) -> int:
    """`enqueue` for many tasks in one executemany (the scheduler queues hundreds a tick;
    ORM inserts go one statement per row). Returns how many were queued; the rows are
    not loaded into the session."""
    for t in new:
        _check(t.kind, deadline_seconds)
    if not new:
        return 0
    now = now_or(now)
    session.execute(insert(AgentTask), [_row(t, now, deadline_seconds) for t in new])
    return len(new)


def get(session: Session, task_id: int, *, lock: bool = False) -> AgentTask:
    return _get(session, AgentTask, task_id, "task", lock=lock)


def _own(session: Session, agent_id: int, task_id: int) -> AgentTask:
    """The task, locked, if it belongs to `agent_id`; another agent's task is reported as
    missing (an agent learns nothing about other agents' work)."""
    task = session.get(AgentTask, task_id, with_for_update=True, populate_existing=True)
    if task is None or task.agent_id != agent_id:
        raise NotFound(f"task {task_id} does not exist")
    return task


def claim(session: Session, agent_id: int, *, max: int, now: datetime | None = None) -> list[AgentTask]:  # noqa: A002
    """Up to `max` tasks for the agent, oldest first: those it claimed and has not finished
    (handed back as they are), then queued ones, which become claimed (attempt + 1)."""
    if max < 1:
        raise BadInput(f"claim at least one task, not {max}")
    now = now_or(now)
    base = select(AgentTask).where(AgentTask.agent_id == agent_id).order_by(AgentTask.id).limit(max)
    held = list(session.scalars(base.where(AgentTask.state == "claimed")))
    room = max - len(held)
    if room <= 0:
        return held
    # SKIP LOCKED (PostgreSQL): two concurrent claims of one agent never get the same task.
    queued = list(
        session.scalars(
            base.where(AgentTask.state == "queued").limit(room).with_for_update(skip_locked=True)
        )
    )
    for task in queued:
        task.state = "claimed"
        task.attempt += 1
        task.claimed_at = now
    session.flush()
    return held + queued


def cancel_requested(task: AgentTask) -> bool:
    """Whether the agent should stop working on the task (asked to, or already ended)."""
    return task.cancel_requested_at is not None or not task.is_open


def progress(
    session: Session,
    agent_id: int,
    task_id: int,
    progress: int,
    message: str = "",
    *,
    bytes_done: int | None = None,
    now: datetime | None = None,
) -> AgentTask:
    """Record the agent's progress on its task. A finished task is returned unchanged
    (the agent learns from `cancel_requested` that it should stop)."""
    if isinstance(progress, bool) or not 0 <= progress <= 100:
        raise BadInput(f"progress {progress!r} is not between 0 and 100")
    if bytes_done is not None and bytes_done < 0:
        raise BadInput("bytes_done cannot be negative")
    task = _own(session, agent_id, task_id)
    if not task.is_open:
        return task
    if task.state == "queued":  # a progress report means the agent has it
        task.state = "claimed"
        task.attempt += 1
        task.claimed_at = now_or(now)
    task.progress = progress
    task.message = message
    if bytes_done is not None:
        task.bytes_done = bytes_done
    session.flush()
    return task


def finish(
    session: Session,
    agent_id: int,
    task_id: int,
    *,
    ok: bool,
    result: dict[str, Any] | None,
    error: str | None = None,
    error_type: str | None = None,
    now: datetime | None = None,
) -> tuple[AgentTask, bool]:
    """(task, changed). Record the agent's result: succeeded when `ok`, otherwise failed
    (cancelled when a cancel had been requested). A task that already ended (finished,
    expired, cancelled) is returned unchanged with changed=False: results are idempotent."""
    task = _own(session, agent_id, task_id)
    if not task.is_open:
        return task, False
    now = now_or(now)
    if ok:
        task.state = "succeeded"
        task.progress = 100
    else:
        task.state = "cancelled" if task.cancel_requested_at is not None else "failed"
    task.result = dict(result) if result is not None else None
    task.error = None if ok else (error or "the agent reported a failure without a message")
    task.error_type = None if ok else (error_type or None)
    if task.claimed_at is None:
        task.claimed_at = now
        task.attempt = max(task.attempt, 1)
    task.finished_at = now
    session.flush()
    return task, True


def open_task_for_item(session: Session, item_id: int, kind: str) -> AgentTask | None:
    """The item's newest queued or claimed task of this kind, if any."""
    return session.scalars(
        select(AgentTask)
        .where(AgentTask.item_id == item_id, AgentTask.kind == kind, AgentTask.state.in_(TASK_OPEN_STATES))
        .order_by(AgentTask.id.desc())
        .limit(1)
    ).first()


def items_with_open_tasks(session: Session, kind: str) -> set[int]:
    """Ids of items that have an open task of this kind (one query, for the scheduler)."""
    return set(
        session.scalars(
            select(AgentTask.item_id).where(
                AgentTask.kind == kind, AgentTask.state.in_(TASK_OPEN_STATES), AgentTask.item_id.is_not(None)
            )
        )
    )


def any_overdue(session: Session, now: datetime | None = None) -> bool:
    """Whether some open task is past its deadline (a cheap check before `expire`)."""
    q = select(AgentTask.id).where(AgentTask.state.in_(TASK_OPEN_STATES), AgentTask.deadline_at <= now_or(now))
    return session.scalars(q.limit(1)).first() is not None


def expire(session: Session, now: datetime | None = None, *, limit: int = 1000) -> list[AgentTask]:
    """Open tasks past their deadline become expired (the caller handles what they were for)."""
    now = now_or(now)
    overdue = list(
        session.scalars(
            select(AgentTask)
            .where(AgentTask.state.in_(TASK_OPEN_STATES), AgentTask.deadline_at <= now)
            .order_by(AgentTask.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    for task in overdue:
        task.state = "expired"
        task.error = DEADLINE_EXPIRED
        task.error_type = "Timeout"
        task.finished_at = now
    session.flush()
    return overdue


def cancel(session: Session, task_id: int, *, now: datetime | None = None) -> AgentTask:
    """Cancel a task: a queued one ends now; a claimed one is asked to stop (the agent's
    result then ends it, or its deadline does). An ended task is returned unchanged."""
    now = now_or(now)
    task = get(session, task_id, lock=True)
    if task.state == "queued":
        task.state = "cancelled"
        task.finished_at = now
        task.cancel_requested_at = now
    elif task.state == "claimed" and task.cancel_requested_at is None:
        task.cancel_requested_at = now
    session.flush()
    return task


def list_tasks(
    session: Session,
    *,
    agent_id: int | None = None,
    item_id: int | None = None,
    job_id: int | None = None,
    kind: str | None = None,
    states: Iterable[str] | None = None,
    limit: int = 200,
) -> list[AgentTask]:
    """Newest first."""
    q = select(AgentTask).order_by(AgentTask.id.desc()).limit(limit)
    if agent_id is not None:
        q = q.where(AgentTask.agent_id == agent_id)
    if item_id is not None:
        q = q.where(AgentTask.item_id == item_id)
    if job_id is not None:
        q = q.where(AgentTask.job_id == job_id)
    if kind is not None:
        q = q.where(AgentTask.kind == kind)
    if states is not None:
        wanted = list(states)
        unknown = set(wanted) - set(TASK_STATES)
        if unknown:
            raise BadInput(f"unknown task states: {', '.join(sorted(unknown))}")
        q = q.where(AgentTask.state.in_(wanted))
    return list(session.scalars(q))


def purge_finished(session: Session, *, before: datetime) -> int:
    """Delete tasks that ended before `before` (their effect is on the item by then)."""
    res = session.execute(
        delete(AgentTask).where(AgentTask.finished_at.is_not(None), AgentTask.finished_at < before)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
