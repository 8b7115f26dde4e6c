"""Job and step states as data: the values, the terminal sets and the allowed transitions.

Pure data and functions, no I/O (it could live in `domain/`; it sits here because the
store's CHECK constraints and the repository enforce it).

A job's final state says why it ended:

- `succeeded`: the work was done.
- `failed`: the work said no (a readiness finding, a refused transition, a remote side
  that answered with an error). The operator can act on the message.
- `errored`: the code broke (an unexpected exception, or the control plane stopped
  while the job ran and the job could not be resumed). A bug or an outage.
- `cancelled`: an operator asked for it to stop, and it stopped.

Terminal states are final: no transition leaves them.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERRORED = "errored"
    CANCELLED = "cancelled"


JOB_TERMINAL: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.ERRORED, JobState.CANCELLED}
)

# from -> allowed next states. running -> queued is a requeue: a restarted control plane
# hands a resumable job back to the runner.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.ERRORED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.ERRORED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.ERRORED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERRORED = "errored"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


STEP_TERMINAL: frozenset[StepState] = frozenset(
    {StepState.SUCCEEDED, StepState.FAILED, StepState.ERRORED, StepState.SKIPPED, StepState.CANCELLED}
)

STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
    StepState.PENDING: frozenset(
        {
            StepState.RUNNING,
            StepState.SUCCEEDED,
            StepState.SKIPPED,
            StepState.CANCELLED,
            StepState.FAILED,
            StepState.ERRORED,
        }
    ),
    # running -> pending: the step is run again when its job is resumed.
    StepState.RUNNING: frozenset(
        {StepState.PENDING, StepState.SUCCEEDED, StepState.FAILED, StepState.ERRORED, StepState.CANCELLED}
    ),
    **{s: frozenset() for s in STEP_TERMINAL},
}


def job_can_move(current: str, new: str) -> bool:
    return JobState(new) in JOB_TRANSITIONS[JobState(current)]


def step_can_move(current: str, new: str) -> bool:
    return StepState(new) in STEP_TRANSITIONS[StepState(current)]


def in_clause(values: frozenset[str] | tuple[str, ...] | type[StrEnum]) -> str:
    """SQL text `'a', 'b'` for a CHECK constraint over string values (sorted: stable DDL)."""
    items = sorted(str(v) for v in values)
    for v in items:
        if "'" in v:
            raise ValueError(f"quote in constraint value {v!r}")
    return ", ".join(f"'{v}'" for v in items)
