"""The lifecycle of a replicated item (one protected VM) as a pure state machine.

Data plus pure functions: a table maps (state, event) to the next state, with guards
that are pure predicates over a small `ItemContext` of facts the caller reads from the
store. `transition()` returns the next state or raises `TransitionRefused` (a `Refused`:
exit code 1, HTTP 409) naming the VM, the event, the state and why. Nothing here does
I/O or knows about jobs; the orchestration persists the state a transition returns.

Sites. The *primary* is the site where protection was enabled (the item's home), the
*secondary* the site that holds the replica. Re-enabling protection of a disabled item
makes the site where its VM then runs the new primary.

Events and when they are recorded. `*_started` events are recorded before the work acts
(a failover job persists `failover in progress` before it touches a VM). Every other
event is a fact recorded after the work is done; in particular an event that takes
production away from a site (`failover_completed`, `failover_failed`, `cancel_failover`,
`failback_completed`, `failback_failed`) is recorded only after the VM on the site it
leaves has been stopped (or, in an unplanned failover, the source declared lost).

Where each operation of issues 5 and 6 lands:

- enable protection: creates the item in `INITIAL_STATE` (ready); `enable_protection`
  re-enables a disabled item. Initial replication now, scheduled or offline:
  `initial_replication_started` when it begins, then `..._completed` or `..._failed`.
- replication cycles run in the states where `is_replicating()`; a cycle that finds the
  change tracking broken (or a resync pass that fails) reports `cycle_failed_needs_resync`;
  the resync window decides when `resync_started` follows. An operator may resynchronize
  a protected VM at any time (verification). `pause`, `resume`.
- test failover: `test_failover_started` (only from protected, needs a recovery point,
  one test per VM at a time), `test_failover_cleaned_up`. Replication keeps running
  during a test; if the item degrades meanwhile, the test VM lingers in whatever state
  follows and can still be cleaned up (`test_failover_active` in the context).
- planned failover: refused until initial replication is complete; only from protected
  (it syncs the last delta, so replication must be healthy and no test may exist).
- unplanned failover: from any state of the primary side that has a recovery point
  (protected, resync required, resynchronizing, paused, error, test failover); the
  primary may be gone, that is the point.
- a failover ends with `failover_completed` (commit pending), `failover_failed` (error:
  the replica is not running; a planned failover stops at its first error and restarts
  the source) or `cancel_failover` (paused: "cancelling a failover leaves the VM
  non-replicating"). `commit` (older recovery points may go), or `cancel_failover` from
  commit pending.
- reverse replication after a committed failover: `reverse_replication_started`, and
  `reverse_replication_completed` when the primary holds a complete point again (the
  state stays reverse replicating; the caller records `reverse_in_sync`).
- failback (= reverse replicate, planned failover back, replicate forward again):
  `failback_started` once reverse replication is in sync, then `failback_completed`
  (resynchronizing forward, by hash scan: only differing blocks) or `failback_failed`
  (rolled back: the VM runs on the secondary, reverse replication resumes).
- `disable_protection` (deleting the replica or not is the job's choice), `error_raised`
  and `error_cleared` (back to protected, or to ready if initial replication never
  completed; a cycle that then finds resync necessary says so).

The invariant "never a VM running on both sites", precisely. Each state declares
`runs_on(state)`, the sites where the production VM may be running, and
`replicates_to(state)`, the site replication cycles write to (None: no cycles):

  I1  replication never writes to a site where the production VM may run:
      `replicates_to(s) not in runs_on(s)`;
  I2  outside the two switching states (failover in progress, failback in progress), the
      production VM may run on at most one site; a disabled item runs nowhere under
      Standby's control (empty);
  I3  switching states run no replication cycles (the job sends the last delta itself)
      and their job stops the source before it starts the target;
  I4  no single transition moves production from one site to the other (both ends
      non-empty and disjoint), except those in `ONE_STEP_HANDOVERS` (cancelling a
      failover that waits for commit, recorded after the replica is stopped). Every other
      move between sites passes through a switching state.

A test failover's VM is not production: it runs on the secondary from a copy-on-write
overlay, attached to an isolated network (or none, or one the operator chose), and
replication keeps running. Recovery points are never pruned while a failover is in
progress or waiting for commit (`may_prune_recovery_points`).

Diagram (generated by `mermaid_diagram()`; a test keeps it equal; the self-loop
`test_failover_cleaned_up [test failover exists]` that every state but test failover in
progress has is left out):

```mermaid
stateDiagram-v2
    [*] --> ready
    ready --> initial_replication_in_progress: initial_replication_started
    ready --> paused: pause
    ready --> disabled: disable_protection [no test failover]
    ready --> error: error_raised
    initial_replication_in_progress --> protected: initial_replication_completed
    initial_replication_in_progress --> error: initial_replication_failed
    initial_replication_in_progress --> paused: pause
    initial_replication_in_progress --> disabled: disable_protection [no test failover]
    initial_replication_in_progress --> error: error_raised
    protected --> resynchronization_required: cycle_failed_needs_resync
    protected --> resynchronizing: resync_started
    protected --> paused: pause
    protected --> test_failover_in_progress: test_failover_started [recovery point, no test failover]
    protected --> failover_in_progress: planned_failover_started [initial replication complete, no test failover]
    protected --> failover_in_progress: unplanned_failover_started [recovery point]
    protected --> disabled: disable_protection [no test failover]
    protected --> error: error_raised
    resynchronization_required --> resynchronization_required: cycle_failed_needs_resync
    resynchronization_required --> resynchronizing: resync_started
    resynchronization_required --> paused: pause
    resynchronization_required --> failover_in_progress: unplanned_failover_started [recovery point]
    resynchronization_required --> disabled: disable_protection [no test failover]
    resynchronization_required --> error: error_raised
    resynchronizing --> protected: resync_completed
    resynchronizing --> resynchronization_required: cycle_failed_needs_resync
    resynchronizing --> paused: pause
    resynchronizing --> failover_in_progress: unplanned_failover_started [recovery point]
    resynchronizing --> disabled: disable_protection [no test failover]
    resynchronizing --> error: error_raised
    paused --> protected: resume [initial replication complete]
    paused --> ready: resume [initial replication not complete]
    paused --> failover_in_progress: unplanned_failover_started [recovery point]
    paused --> disabled: disable_protection [no test failover]
    paused --> error: error_raised
    test_failover_in_progress --> protected: test_failover_cleaned_up
    test_failover_in_progress --> resynchronization_required: cycle_failed_needs_resync
    test_failover_in_progress --> resynchronizing: resync_started
    test_failover_in_progress --> paused: pause
    test_failover_in_progress --> failover_in_progress: unplanned_failover_started [recovery point]
    test_failover_in_progress --> error: error_raised
    failover_in_progress --> commit_pending: failover_completed
    failover_in_progress --> error: failover_failed
    failover_in_progress --> paused: cancel_failover
    commit_pending --> failed_over: commit
    commit_pending --> paused: cancel_failover
    failed_over --> reverse_replicating: reverse_replication_started
    failed_over --> disabled: disable_protection [no test failover]
    reverse_replicating --> reverse_replicating: reverse_replication_completed
    reverse_replicating --> reverse_replicating: cycle_failed_needs_resync
    reverse_replicating --> failback_in_progress: failback_started [reverse replication in sync]
    reverse_replicating --> disabled: disable_protection [no test failover]
    failback_in_progress --> resynchronizing: failback_completed
    failback_in_progress --> reverse_replicating: failback_failed
    disabled --> ready: enable_protection
    error --> error: error_raised
    error --> protected: error_cleared [initial replication complete]
    error --> ready: error_cleared [initial replication not complete]
    error --> failover_in_progress: unplanned_failover_started [recovery point]
    error --> disabled: disable_protection [no test failover]
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from standby.errors import Refused

__all__ = [
    "INITIAL_STATE",
    "ONE_STEP_HANDOVERS",
    "STATES",
    "SWITCHING_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Event",
    "Guard",
    "Health",
    "ItemContext",
    "Rule",
    "Site",
    "State",
    "StateInfo",
    "TransitionRefused",
    "allowed_events",
    "can_be_removed",
    "health",
    "health_reason",
    "invariant_holds",
    "is_replicating",
    "is_switching",
    "is_terminal",
    "label",
    "may_prune_recovery_points",
    "may_run_on_primary",
    "may_run_on_secondary",
    "mermaid_diagram",
    "replicates_to",
    "runs_on",
    "step_invariant_holds",
    "transition",
]


class State(StrEnum):
    READY = "ready"
    INITIAL_REPLICATION = "initial_replication_in_progress"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resynchronization_required"
    RESYNCHRONIZING = "resynchronizing"
    PAUSED = "paused"
    TEST_FAILOVER = "test_failover_in_progress"
    FAILOVER_IN_PROGRESS = "failover_in_progress"
    COMMIT_PENDING = "commit_pending"
    FAILED_OVER = "failed_over"
    REVERSE_REPLICATING = "reverse_replicating"
    FAILBACK_IN_PROGRESS = "failback_in_progress"
    DISABLED = "disabled"
    ERROR = "error"


class Event(StrEnum):
    ENABLE_PROTECTION = "enable_protection"
    INITIAL_REPLICATION_STARTED = "initial_replication_started"
    INITIAL_REPLICATION_COMPLETED = "initial_replication_completed"
    INITIAL_REPLICATION_FAILED = "initial_replication_failed"
    CYCLE_FAILED_NEEDS_RESYNC = "cycle_failed_needs_resync"
    RESYNC_STARTED = "resync_started"
    RESYNC_COMPLETED = "resync_completed"
    PAUSE = "pause"
    RESUME = "resume"
    TEST_FAILOVER_STARTED = "test_failover_started"
    TEST_FAILOVER_CLEANED_UP = "test_failover_cleaned_up"
    PLANNED_FAILOVER_STARTED = "planned_failover_started"
    UNPLANNED_FAILOVER_STARTED = "unplanned_failover_started"
    FAILOVER_COMPLETED = "failover_completed"
    FAILOVER_FAILED = "failover_failed"
    COMMIT = "commit"
    CANCEL_FAILOVER = "cancel_failover"
    REVERSE_REPLICATION_STARTED = "reverse_replication_started"
    REVERSE_REPLICATION_COMPLETED = "reverse_replication_completed"
    FAILBACK_STARTED = "failback_started"
    FAILBACK_COMPLETED = "failback_completed"
    FAILBACK_FAILED = "failback_failed"
    DISABLE_PROTECTION = "disable_protection"
    ERROR_RAISED = "error_raised"
    ERROR_CLEARED = "error_cleared"


class Health(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


class Site(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


INITIAL_STATE = State.READY
"""Enabling protection creates the item in this state."""


@dataclass(frozen=True)
class ItemContext:
    """Facts about the item that guards read (the caller takes them from the store).

    - `initial_replication_complete`: a complete initial copy reached the secondary;
    - `has_recovery_point`: the secondary holds at least one complete recovery point;
    - `test_failover_active`: a test failover's VM or network still exists;
    - `reverse_in_sync`: reverse replication has put a complete point on the primary.
    """

    vm: str = ""
    initial_replication_complete: bool = False
    has_recovery_point: bool = False
    test_failover_active: bool = False
    reverse_in_sync: bool = False


@dataclass(frozen=True)
class Guard:
    """A pure predicate over the context, with the reason given when it does not hold."""

    name: str
    test: Callable[[ItemContext], bool]
    reason: str

    def __call__(self, ctx: ItemContext) -> bool:
        return self.test(ctx)


INITIAL_COMPLETE = Guard("initial replication complete",
                         lambda c: c.initial_replication_complete,
                         "initial replication is not complete")
INITIAL_NOT_COMPLETE = Guard("initial replication not complete",
                             lambda c: not c.initial_replication_complete,
                             "initial replication is already complete")
HAS_RECOVERY_POINT = Guard("recovery point",
                           lambda c: c.has_recovery_point,
                           "the secondary holds no complete recovery point")
NO_TEST_FAILOVER = Guard("no test failover",
                         lambda c: not c.test_failover_active,
                         "a test failover still exists (clean it up first)")
TEST_FAILOVER_EXISTS = Guard("test failover exists",
                             lambda c: c.test_failover_active,
                             "no test failover exists")
REVERSE_IN_SYNC = Guard("reverse replication in sync",
                        lambda c: c.reverse_in_sync,
                        "reverse replication has not completed (the primary holds no complete copy yet)")


@dataclass(frozen=True)
class Rule:
    """Go to `target` if every guard holds. Rules of one pair are tried in order."""

    target: State
    guards: tuple[Guard, ...] = ()


def _r(target: State, *guards: Guard) -> tuple[Rule, ...]:
    return (Rule(target, guards),)


S, E = State, Event

_TABLE: dict[State, dict[Event, tuple[Rule, ...]]] = {
    S.READY: {
        E.INITIAL_REPLICATION_STARTED: _r(S.INITIAL_REPLICATION),
        E.PAUSE: _r(S.PAUSED),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.INITIAL_REPLICATION: {
        E.INITIAL_REPLICATION_COMPLETED: _r(S.PROTECTED),
        E.INITIAL_REPLICATION_FAILED: _r(S.ERROR),
        E.PAUSE: _r(S.PAUSED),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.PROTECTED: {
        E.CYCLE_FAILED_NEEDS_RESYNC: _r(S.RESYNC_REQUIRED),
        E.RESYNC_STARTED: _r(S.RESYNCHRONIZING),
        E.PAUSE: _r(S.PAUSED),
        E.TEST_FAILOVER_STARTED: _r(S.TEST_FAILOVER, HAS_RECOVERY_POINT, NO_TEST_FAILOVER),
        E.PLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, INITIAL_COMPLETE, NO_TEST_FAILOVER),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.RESYNC_REQUIRED: {
        E.CYCLE_FAILED_NEEDS_RESYNC: _r(S.RESYNC_REQUIRED),
        E.RESYNC_STARTED: _r(S.RESYNCHRONIZING),
        E.PAUSE: _r(S.PAUSED),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.RESYNCHRONIZING: {
        E.RESYNC_COMPLETED: _r(S.PROTECTED),
        E.CYCLE_FAILED_NEEDS_RESYNC: _r(S.RESYNC_REQUIRED),
        E.PAUSE: _r(S.PAUSED),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.PAUSED: {
        E.RESUME: (Rule(S.PROTECTED, (INITIAL_COMPLETE,)), Rule(S.READY, (INITIAL_NOT_COMPLETE,))),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.TEST_FAILOVER: {
        E.TEST_FAILOVER_CLEANED_UP: _r(S.PROTECTED),
        E.CYCLE_FAILED_NEEDS_RESYNC: _r(S.RESYNC_REQUIRED),
        E.RESYNC_STARTED: _r(S.RESYNCHRONIZING),
        E.PAUSE: _r(S.PAUSED),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.ERROR_RAISED: _r(S.ERROR),
    },
    S.FAILOVER_IN_PROGRESS: {
        E.FAILOVER_COMPLETED: _r(S.COMMIT_PENDING),
        E.FAILOVER_FAILED: _r(S.ERROR),
        E.CANCEL_FAILOVER: _r(S.PAUSED),
    },
    S.COMMIT_PENDING: {
        E.COMMIT: _r(S.FAILED_OVER),
        E.CANCEL_FAILOVER: _r(S.PAUSED),
    },
    S.FAILED_OVER: {
        E.REVERSE_REPLICATION_STARTED: _r(S.REVERSE_REPLICATING),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
    },
    S.REVERSE_REPLICATING: {
        E.REVERSE_REPLICATION_COMPLETED: _r(S.REVERSE_REPLICATING),
        E.CYCLE_FAILED_NEEDS_RESYNC: _r(S.REVERSE_REPLICATING),
        E.FAILBACK_STARTED: _r(S.FAILBACK_IN_PROGRESS, REVERSE_IN_SYNC),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
    },
    S.FAILBACK_IN_PROGRESS: {
        E.FAILBACK_COMPLETED: _r(S.RESYNCHRONIZING),
        E.FAILBACK_FAILED: _r(S.REVERSE_REPLICATING),
    },
    S.DISABLED: {
        E.ENABLE_PROTECTION: _r(S.READY),
    },
    S.ERROR: {
        E.ERROR_RAISED: _r(S.ERROR),
        E.ERROR_CLEARED: (Rule(S.PROTECTED, (INITIAL_COMPLETE,)), Rule(S.READY, (INITIAL_NOT_COMPLETE,))),
        E.UNPLANNED_FAILOVER_STARTED: _r(S.FAILOVER_IN_PROGRESS, HAS_RECOVERY_POINT),
        E.DISABLE_PROTECTION: _r(S.DISABLED, NO_TEST_FAILOVER),
    },
}

# A lingering test failover (the item degraded while it ran) can be cleaned up anywhere.
for _state, _row in _TABLE.items():
    if _state is not S.TEST_FAILOVER:
        _row[E.TEST_FAILOVER_CLEANED_UP] = _r(_state, TEST_FAILOVER_EXISTS)

TRANSITIONS: Mapping[tuple[State, Event], tuple[Rule, ...]] = MappingProxyType(
    {(s, e): rules for s, row in _TABLE.items() for e, rules in row.items()}
)
"""Every allowed (state, event) pair and its rules; any pair not here is refused."""


# ---- what each state means -------------------------------------------------------

_P, _S = frozenset({Site.PRIMARY}), frozenset({Site.SECONDARY})
_BOTH, _NONE = frozenset({Site.PRIMARY, Site.SECONDARY}), frozenset[Site]()


@dataclass(frozen=True)
class StateInfo:
    label: str
    health: Health
    health_reason: str
    runs_on: frozenset[Site]       # where the production VM may be running
    replicates_to: Site | None     # where replication cycles write (None: no cycles)
    busy: str | None               # why most operations are refused here (None: no general reason)


N, W, C = Health.NORMAL, Health.WARNING, Health.CRITICAL
_SEC, _PRI = Site.SECONDARY, Site.PRIMARY

STATES: Mapping[State, StateInfo] = MappingProxyType({
    S.READY: StateInfo("ready", W, "protection enabled; nothing replicated yet, no recovery point",
                       _P, None, "initial replication has not started"),
    S.INITIAL_REPLICATION: StateInfo("initial replication in progress", N, "initial replication in progress",
                                     _P, _SEC, "initial replication is not complete"),
    S.PROTECTED: StateInfo("protected", N, "protected", _P, _SEC, None),
    S.RESYNC_REQUIRED: StateInfo("resynchronization required", C,
                                 "resynchronization required, replication has stopped", _P, None,
                                 "the replica needs resynchronization"),
    S.RESYNCHRONIZING: StateInfo("resynchronizing", W, "resynchronizing, recovery points are not advancing",
                                 _P, _SEC, "a resynchronization is in progress"),
    S.PAUSED: StateInfo("paused", W, "replication paused", _P, None, "replication is paused (resume it first)"),
    S.TEST_FAILOVER: StateInfo("test failover in progress", N, "test failover in progress; replication continues",
                               _P, _SEC, "a test failover is in progress (clean it up first)"),
    S.FAILOVER_IN_PROGRESS: StateInfo("failover in progress", W, "failover in progress", _BOTH, None,
                                      "a failover is in progress"),
    S.COMMIT_PENDING: StateInfo("commit pending", W, "failed over, waiting for commit or cancel", _S, None,
                                "the failover is waiting to be committed or cancelled"),
    S.FAILED_OVER: StateInfo("failed over", W, "running on the secondary, not protected (start reverse replication)",
                             _S, None, "the VM runs on the secondary after a failover and nothing replicates"),
    S.REVERSE_REPLICATING: StateInfo("reverse replicating", N, "running on the secondary, replicating to the primary",
                                     _S, _PRI, "the VM runs on the secondary, replicating back to the primary"),
    S.FAILBACK_IN_PROGRESS: StateInfo("failback in progress", W, "failback in progress", _BOTH, None,
                                      "a failback is in progress"),
    S.DISABLED: StateInfo("disabled", N, "protection disabled", _NONE, None, "protection is disabled"),
    S.ERROR: StateInfo("error", C, "replication in error", _P, None, "the item is in error (clear the error first)"),
})

SWITCHING_STATES = frozenset({S.FAILOVER_IN_PROGRESS, S.FAILBACK_IN_PROGRESS})
"""States in which production moves between sites (their job stops before it starts)."""

TERMINAL_STATES = frozenset({S.DISABLED})
"""No cycle runs, no job acts, no VM is managed; only re-enabling protection leaves it."""

ONE_STEP_HANDOVERS = frozenset({(S.COMMIT_PENDING, E.CANCEL_FAILOVER)})
"""The only transitions that move production between sites without a switching state."""

_NO_PRUNE = frozenset({S.FAILOVER_IN_PROGRESS, S.COMMIT_PENDING})


def label(state: State) -> str:
    return STATES[state].label


def health(state: State) -> Health:
    """This state's contribution to the item's health (the scheduler adds RPO and the like)."""
    return STATES[state].health


def health_reason(state: State) -> str:
    return STATES[state].health_reason


def runs_on(state: State) -> frozenset[Site]:
    """Sites where the production VM may be running in this state."""
    return STATES[state].runs_on


def replicates_to(state: State) -> Site | None:
    """The site replication cycles write to in this state, or None if no cycle runs."""
    return STATES[state].replicates_to


def is_replicating(state: State) -> bool:
    """Whether the scheduler should run replication cycles for an item in this state."""
    return STATES[state].replicates_to is not None


def may_run_on_primary(state: State) -> bool:
    return Site.PRIMARY in STATES[state].runs_on


def may_run_on_secondary(state: State) -> bool:
    """Whether the production VM may be running on the secondary (not a test VM)."""
    return Site.SECONDARY in STATES[state].runs_on


def is_switching(state: State) -> bool:
    return state in SWITCHING_STATES


def is_terminal(state: State) -> bool:
    return state in TERMINAL_STATES


def can_be_removed(state: State) -> bool:
    """Whether the item's record may be deleted (disable protection first)."""
    return state is State.DISABLED


def may_prune_recovery_points(state: State) -> bool:
    """False while a failover is in progress or waiting for commit: its points stay."""
    return state not in _NO_PRUNE


def invariant_holds(state: State) -> bool:
    """I1-I3 of the module docstring, for one state."""
    info = STATES[state]
    if info.replicates_to is not None and info.replicates_to in info.runs_on:
        return False                                         # I1
    if state in SWITCHING_STATES:
        return info.replicates_to is None                    # I3
    return len(info.runs_on) <= 1                            # I2


def step_invariant_holds(source: State, event: Event, target: State) -> bool:
    """I4 of the module docstring, for one transition."""
    before, after = runs_on(source), runs_on(target)
    if before and after and before.isdisjoint(after):
        return (source, event) in ONE_STEP_HANDOVERS
    return True


# ---- refusals ----------------------------------------------------------------------

_ACTIONS: Mapping[Event, str] = MappingProxyType({
    E.ENABLE_PROTECTION: "enable protection of {vm}",
    E.INITIAL_REPLICATION_STARTED: "start the initial replication of {vm}",
    E.INITIAL_REPLICATION_COMPLETED: "complete the initial replication of {vm}",
    E.INITIAL_REPLICATION_FAILED: "record a failed initial replication of {vm}",
    E.CYCLE_FAILED_NEEDS_RESYNC: "mark {vm} as needing resynchronization",
    E.RESYNC_STARTED: "start resynchronizing {vm}",
    E.RESYNC_COMPLETED: "complete the resynchronization of {vm}",
    E.PAUSE: "pause replication of {vm}",
    E.RESUME: "resume replication of {vm}",
    E.TEST_FAILOVER_STARTED: "start a test failover of {vm}",
    E.TEST_FAILOVER_CLEANED_UP: "clean up the test failover of {vm}",
    E.PLANNED_FAILOVER_STARTED: "start a planned failover of {vm}",
    E.UNPLANNED_FAILOVER_STARTED: "start an unplanned failover of {vm}",
    E.FAILOVER_COMPLETED: "complete the failover of {vm}",
    E.FAILOVER_FAILED: "record a failed failover of {vm}",
    E.COMMIT: "commit the failover of {vm}",
    E.CANCEL_FAILOVER: "cancel the failover of {vm}",
    E.REVERSE_REPLICATION_STARTED: "start reverse replication of {vm}",
    E.REVERSE_REPLICATION_COMPLETED: "complete the reverse replication of {vm}",
    E.FAILBACK_STARTED: "start a failback of {vm}",
    E.FAILBACK_COMPLETED: "complete the failback of {vm}",
    E.FAILBACK_FAILED: "record a failed failback of {vm}",
    E.DISABLE_PROTECTION: "disable protection of {vm}",
    E.ERROR_RAISED: "put {vm} in error",
    E.ERROR_CLEARED: "clear the error of {vm}",
})

# Operations whose refusal is best explained by what the state is busy with; for the
# others (facts that belong to one phase) the event's own reason explains it better.
_STATE_FIRST = frozenset({
    E.INITIAL_REPLICATION_STARTED, E.RESYNC_STARTED, E.PAUSE, E.TEST_FAILOVER_STARTED,
    E.PLANNED_FAILOVER_STARTED, E.UNPLANNED_FAILOVER_STARTED, E.DISABLE_PROTECTION,
})

_EVENT_REASONS: Mapping[Event, str] = MappingProxyType({
    E.ENABLE_PROTECTION: "protection is already enabled",
    E.INITIAL_REPLICATION_STARTED: "initial replication is already complete",
    E.INITIAL_REPLICATION_COMPLETED: "no initial replication is in progress",
    E.INITIAL_REPLICATION_FAILED: "no initial replication is in progress",
    E.CYCLE_FAILED_NEEDS_RESYNC: "no replication cycle runs in this state",
    E.RESYNC_STARTED: "only a protected VM or one that needs resynchronization can be resynchronized",
    E.RESYNC_COMPLETED: "no resynchronization is in progress",
    E.PAUSE: "nothing replicates that could be paused",
    E.RESUME: "replication is not paused",
    E.TEST_FAILOVER_STARTED: "a test failover starts only from a protected VM",
    E.TEST_FAILOVER_CLEANED_UP: "no test failover exists",
    E.PLANNED_FAILOVER_STARTED: "a planned failover starts only from a protected VM",
    E.UNPLANNED_FAILOVER_STARTED: "an unplanned failover starts only from the primary side",
    E.FAILOVER_COMPLETED: "no failover is in progress",
    E.FAILOVER_FAILED: "no failover is in progress",
    E.COMMIT: "no failover is waiting to be committed",
    E.CANCEL_FAILOVER: "no failover is in progress or waiting to be committed",
    E.REVERSE_REPLICATION_STARTED: "reverse replication starts only after a committed failover",
    E.REVERSE_REPLICATION_COMPLETED: "reverse replication is not running",
    E.FAILBACK_STARTED: "a failback starts only while reverse replication runs",
    E.FAILBACK_COMPLETED: "no failback is in progress",
    E.FAILBACK_FAILED: "no failback is in progress",
    E.DISABLE_PROTECTION: "protection cannot be disabled now",
    E.ERROR_RAISED: "only an item whose VM runs on the primary can be put in error",
    E.ERROR_CLEARED: "the item is not in error",
})

_PAIR_REASONS: Mapping[tuple[State, Event], str] = MappingProxyType({
    (S.INITIAL_REPLICATION, E.INITIAL_REPLICATION_STARTED): "initial replication is already in progress",
    (S.INITIAL_REPLICATION, E.CYCLE_FAILED_NEEDS_RESYNC):
        "initial replication is in progress (a failed initial copy is recorded as such)",
    (S.RESYNCHRONIZING, E.RESYNC_STARTED): "a resynchronization is already in progress",
    (S.PAUSED, E.PAUSE): "replication is already paused",
    (S.TEST_FAILOVER, E.TEST_FAILOVER_STARTED):
        "a test failover is already in progress (one test failover per VM at a time)",
    (S.RESYNC_REQUIRED, E.PLANNED_FAILOVER_STARTED):
        "the replica needs resynchronization, so the last changes cannot be synced "
        "(resynchronize first, or use an unplanned failover)",
    (S.RESYNCHRONIZING, E.PLANNED_FAILOVER_STARTED):
        "a resynchronization is in progress (wait for it, or use an unplanned failover)",
    (S.PAUSED, E.PLANNED_FAILOVER_STARTED):
        "replication is paused (resume it first, or use an unplanned failover)",
    (S.ERROR, E.PLANNED_FAILOVER_STARTED):
        "the item is in error (clear the error first, or use an unplanned failover)",
    (S.FAILOVER_IN_PROGRESS, E.PLANNED_FAILOVER_STARTED): "a failover is already in progress",
    (S.FAILOVER_IN_PROGRESS, E.UNPLANNED_FAILOVER_STARTED): "a failover is already in progress",
    (S.COMMIT_PENDING, E.REVERSE_REPLICATION_STARTED): "commit the failover first",
    (S.COMMIT_PENDING, E.DISABLE_PROTECTION): "commit or cancel the failover first",
    (S.REVERSE_REPLICATING, E.REVERSE_REPLICATION_STARTED): "reverse replication is already running",
    (S.REVERSE_REPLICATING, E.PLANNED_FAILOVER_STARTED):
        "the VM already runs on the secondary (start a failback to return to the primary)",
    (S.FAILED_OVER, E.FAILBACK_STARTED): "start reverse replication first",
    (S.FAILBACK_IN_PROGRESS, E.FAILBACK_STARTED): "a failback is already in progress",
    (S.DISABLED, E.DISABLE_PROTECTION): "protection is already disabled",
    (S.DISABLED, E.ERROR_RAISED): "protection is disabled",
})


class TransitionRefused(Refused):
    """A lifecycle transition not allowed in the item's state (exit code 1, HTTP 409).

    `state`, `event`, `vm`, `reason` and `allowed` (the events allowed now) are kept as
    attributes for the API to return as fields.
    """

    def __init__(self, state: State, event: Event, ctx: ItemContext, reason: str) -> None:
        self.state, self.event, self.vm, self.reason = state, event, ctx.vm, reason
        self.allowed = allowed_events(state, ctx)
        action = _ACTIONS[event].format(vm=f"VM {ctx.vm}" if ctx.vm else "the VM")
        super().__init__(f"cannot {action}: {reason} (state: {STATES[state].label})",
                         state=str(state), event=str(event), vm=ctx.vm, reason=reason,
                         allowed=[str(e) for e in self.allowed])


def _reason(state: State, event: Event) -> str:
    pair = _PAIR_REASONS.get((state, event))
    if pair is not None:
        return pair
    busy = STATES[state].busy
    if event in _STATE_FIRST and busy is not None:
        return busy
    return _EVENT_REASONS[event]


def _resolve(state: State, event: Event, ctx: ItemContext) -> State | str:
    """The next state, or the reason for refusing."""
    rules = TRANSITIONS.get((state, event))
    if rules is None:
        return _reason(state, event)
    first_failure: str | None = None
    for rule in rules:
        failed = [g for g in rule.guards if not g(ctx)]
        if not failed:
            return rule.target
        if first_failure is None:
            first_failure = failed[0].reason
    assert first_failure is not None
    return first_failure


def transition(state: State, event: Event, ctx: ItemContext | None = None) -> State:
    """The state after `event`, or `TransitionRefused` naming the VM, event, state and why."""
    state, event = State(state), Event(event)
    ctx = ctx if ctx is not None else ItemContext()
    result = _resolve(state, event, ctx)
    if isinstance(result, State):
        return result
    raise TransitionRefused(state, event, ctx, result)


def allowed_events(state: State, ctx: ItemContext | None = None) -> tuple[Event, ...]:
    """Events `transition` would accept now, in `Event` order."""
    ctx = ctx if ctx is not None else ItemContext()
    return tuple(e for e in Event if isinstance(_resolve(State(state), e, ctx), State))


def mermaid_diagram() -> str:
    """The lifecycle as a Mermaid state diagram (test failover cleanup self-loops left out)."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL_STATE}"]
    for (state, event), rules in TRANSITIONS.items():
        if event is Event.TEST_FAILOVER_CLEANED_UP and state is not State.TEST_FAILOVER:
            continue
        for rule in rules:
            guards = f" [{', '.join(g.name for g in rule.guards)}]" if rule.guards else ""
            lines.append(f"    {state} --> {rule.target}: {event}{guards}")
    return "\n".join(lines)


del _state, _row, S, E, N, W, C
