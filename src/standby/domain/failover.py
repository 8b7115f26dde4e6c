"""Failover workflows as data, and the pure runner model that resumes or rolls them back.

Each operation of the failover family is a `Workflow`: ordered `Step`s, each naming the
operation it performs (`Op`, on a site), the facts it needs and provides (`Fact`), the
lifecycle events recorded when it is done (`lifecycle.Event`), how its effect is undone
(`Undo`: the compensation) and what a failure of it means (`OnError`). The workflows of
the next layer implement the `Op`s; this module decides the order, never acts.

Persisting and resuming. A job persists a `RunState` (one `StepRecord` per step). The
runner loop is:

    while not isinstance(a := next_action(s), Done):
        s = begin(s, a); persist(s)             # the step is running before it acts
        try: perform(a)                          # idempotent: checks what is done first
        except StandbyError as e: s = fail(s, a, str(e)); persist(s); continue
        s = finish(s, a); persist(s, record=a.events)  # one transaction: step done + events

(`RunState.to_json()` is what the job's rows hold, `RunState.from_json()` reads them back.)
A control-plane kill leaves at most one step `running` (or `undoing`). `next_action` on
the persisted state decides, with no memory of the process that died:

- resume forward: an interrupted step is performed again (each `Op` is idempotent), up to
  `MAX_ATTEMPTS` times; a step interrupted that often counts as failed;
- roll back: once a step with `OnError.ROLLBACK` failed (or the operator cancelled a job
  that can roll back), every attempted step with an `Undo` is undone in reverse order,
  the interrupted and failed ones included (an undo is idempotent too, and a failed step
  may have half acted). An undo's events are recorded only if the step's own events
  were (it was done). A failed required undo stops the rollback (`ROLLBACK_FAILED`):
  going on could start the source while the target still runs;
- `OnError.CONTINUE`: an optional step (unplanned failover's "shut down and sync"); its
  failure is kept and the workflow goes on; optional steps whose needs a failure left
  unmet are skipped;
- `OnError.STOP`: past the point of no return, or where the state as it stands is safe
  (reverse replication, cleanup, commit): the job ends `FAILED` and is run again later.

Never running on both sites. Sites are named by role: `SOURCE` is the site production
leaves (or, for reverse replication, the site it runs on), `TARGET` the other. Every
workflow that moves production records its `*_started` event first (a switching state,
where `lifecycle.invariant_holds` allows both), stops the source before the target's VM
starts (`START_VM` on the target needs `SOURCE_STOPPED`), and records its completion only
once the target runs; rolled back, the target's VM is stopped before the source starts.
The unit tests run every workflow against a model of the sites and kill the runner at
every point (and fail every step), checking the lifecycle invariants after each recorded
event and that the VM never runs on both sites.

In an unplanned failover the source may be unreachable: `FENCE_SOURCE` powers it off if
it answers and otherwise records it as lost (the operator's declaration, as in the
reference: a partitioned, still running source is what fencing at the site level is for).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from standby.domain.lifecycle import Event, ItemContext, Site, State, transition
from standby.domain.recovery_points import PointChoice, parse_choice
from standby.errors import BadInput

__all__ = [
    "MAX_ATTEMPTS",
    "Action",
    "ActionKind",
    "Done",
    "Fact",
    "FailoverOptions",
    "Kind",
    "OnError",
    "Op",
    "Outcome",
    "Role",
    "RunState",
    "Status",
    "Step",
    "StepRecord",
    "TestNetwork",
    "Undo",
    "Workflow",
    "begin",
    "check_start",
    "describe",
    "fail",
    "failback_sequence",
    "finish",
    "next_action",
    "request_cancel",
    "retry",
    "reverse_sync_methods",
    "workflow",
]

MAX_ATTEMPTS = 3
"""Times a step is started before an interrupted one counts as failed (a step that kills
the control plane every time must not loop forever)."""

E = Event


class Kind(StrEnum):
    TEST_FAILOVER = "test_failover"
    TEST_CLEANUP = "test_failover_cleanup"
    PLANNED_FAILOVER = "planned_failover"
    UNPLANNED_FAILOVER = "unplanned_failover"
    COMMIT = "commit"
    CANCEL = "cancel_failover"
    REVERSE_REPLICATION = "reverse_replication"
    FAILBACK = "failback"


class Role(StrEnum):
    SOURCE = "source"
    TARGET = "target"


class Op(StrEnum):
    """What a step asks the workflow to do (each implementation is idempotent)."""

    RECORD = "record"                            # nothing but the step's events
    CHOOSE_POINT = "choose_point"                # choose_point(options.point) and pin it; after a final
    #                                              sync: point_of_cycle(its committed points): zero loss
    SHUT_DOWN_VM = "shut_down_vm"                # guest shutdown (power off after a timeout)
    FENCE_SOURCE = "fence_source"                # power off if reachable, else record the site as lost
    START_VM = "start_vm"
    STOP_VM = "stop_vm"                          # power off
    FINAL_SYNC = "final_sync"                    # a delta cycle from the (stopped) site to the other
    RESYNC = "resync"                            # a hash-scan cycle against the other site's disk
    MATERIALIZE_OVERLAY = "materialize_overlay"  # qcow2 overlay over the chosen point (pinned)
    DELETE_OVERLAY = "delete_overlay"            # and unpin the point
    DEFINE_VM = "define_vm"                      # the VM on this site's disks, networks from the mapping
    UNDEFINE_VM = "undefine_vm"
    MATERIALIZE_TEST_OVERLAY = "materialize_test_overlay"
    DELETE_TEST_OVERLAY = "delete_test_overlay"
    CREATE_TEST_NETWORK = "create_test_network"  # an isolated network, named after the job
    CHECK_TEST_NETWORK = "check_test_network"    # the operator's network exists on the target
    DELETE_TEST_NETWORK = "delete_test_network"
    DEFINE_TEST_VM = "define_test_vm"
    UNDEFINE_TEST_VM = "undefine_test_vm"
    START_TEST_VM = "start_test_vm"
    STOP_TEST_VM = "stop_test_vm"
    RECORD_NOTES = "record_notes"                # the operator's cleanup notes, with the events
    RELEASE_POINTS = "release_points"            # prune the points a committed failover no longer needs
    PREPARE_REVERSE_REPLICA = "prepare_reverse_replica"  # the old disks as the replica (reverse_sync_methods)
    PREPARE_FORWARD_REPLICA = "prepare_forward_replica"  # the failed-over disks as the forward replica


class Fact(StrEnum):
    SOURCE_STOPPED = "source stopped"
    TARGET_STOPPED = "target stopped"
    LAST_CHANGES_SYNCED = "last changes synced"
    POINT_CHOSEN = "recovery point chosen"
    OVERLAY_READY = "overlay ready"
    NETWORK_READY = "test network ready"
    VM_DEFINED = "VM defined"
    TARGET_RUNNING = "target running"
    TEST_VM_RUNNING = "test VM running"
    TEST_VM_STOPPED = "test VM stopped"
    TEST_VM_REMOVED = "test VM removed"
    TEST_NETWORK_REMOVED = "test network removed"
    OVERLAY_REMOVED = "overlay removed"
    VM_REMOVED = "VM removed"
    REPLICA_READY = "replica ready"
    FAILOVER_RECORDED = "failover recorded"


class OnError(StrEnum):
    ROLLBACK = "rollback"
    CONTINUE = "continue"
    STOP = "stop"


class TestNetwork(StrEnum):
    __test__ = False  # not a pytest class
    ISOLATED = "isolated"   # created for the test, removed by its cleanup
    EXISTING = "existing"   # the operator's network (an isolated one is advised); left alone
    NONE = "none"           # no NIC connected


@dataclass(frozen=True)
class Undo:
    """The compensation of a step. `events` are recorded when done (only if the step's own
    were); `cancel_events` instead when the rollback is an operator's cancel. A failed
    non-`required` undo is noted and the rollback goes on (restarting a source that may
    be gone)."""

    name: str
    op: Op
    site: Role | None = None
    events: tuple[Event, ...] = ()
    cancel_events: tuple[Event, ...] | None = None
    required: bool = True


@dataclass(frozen=True)
class Step:
    name: str
    op: Op
    site: Role | None = None
    needs: frozenset[Fact] = frozenset()
    provides: frozenset[Fact] = frozenset()
    events: tuple[Event, ...] = ()
    undo: Undo | None = None
    on_error: OnError = OnError.ROLLBACK
    inputs: tuple[str, ...] = ()   # FailoverOptions fields the op reads


@dataclass(frozen=True)
class FailoverOptions:
    """What the operator chose. `point`: a `PointChoice` value or a point id (planned
    failover always takes the point of its final sync)."""

    point: str = PointChoice.LATEST.value
    shutdown_and_sync: bool = False
    network: TestNetwork = TestNetwork.ISOLATED
    network_name: str | None = None
    notes: str = ""


@dataclass(frozen=True)
class Workflow:
    kind: Kind
    source: Site
    target: Site
    steps: tuple[Step, ...]
    options: FailoverOptions = field(default_factory=FailoverOptions)

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind}: step names repeat")
        required: set[Fact] = set()
        maybe: set[Fact] = set()
        seen_stop = False
        for s in self.steps:
            if s.on_error is OnError.CONTINUE:
                if s.events:
                    raise ValueError(f"{self.kind}: optional step {s.name!r} records events")
                if not s.needs <= required | maybe:
                    raise ValueError(f"{self.kind}: {s.name!r} needs {sorted(s.needs - required - maybe)}")
                maybe |= s.provides
            else:
                # A step that must run needs facts that steps that must run provide.
                if not s.needs <= required:
                    raise ValueError(f"{self.kind}: {s.name!r} needs {sorted(s.needs - required)} "
                                     "which no earlier required step provides")
                required |= s.provides
            if s.on_error is OnError.ROLLBACK and seen_stop:
                raise ValueError(f"{self.kind}: {s.name!r} rolls back after the point of no return")
            seen_stop = seen_stop or s.on_error is OnError.STOP

    def site(self, role: Role | None) -> Site | None:
        return None if role is None else (self.source if role is Role.SOURCE else self.target)

    def index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == name)

    @property
    def can_roll_back(self) -> bool:
        return any(s.on_error is OnError.ROLLBACK for s in self.steps)


F = Fact
_P, _S = Site.PRIMARY, Site.SECONDARY
SRC, TGT = Role.SOURCE, Role.TARGET


def _fs(*facts: Fact) -> frozenset[Fact]:
    return frozenset(facts)


def _replica_start(point_needs: frozenset[Fact]) -> tuple[Step, ...]:
    """Materialize the chosen point, define and start the replica (failover's second half)."""
    return (
        Step("choose recovery point", Op.CHOOSE_POINT, TGT, needs=point_needs, provides=_fs(F.POINT_CHOSEN),
             inputs=("point",)),
        Step("materialize the point as an overlay", Op.MATERIALIZE_OVERLAY, TGT, needs=_fs(F.POINT_CHOSEN),
             provides=_fs(F.OVERLAY_READY), undo=Undo("delete the overlay", Op.DELETE_OVERLAY, TGT)),
        Step("define the replica VM", Op.DEFINE_VM, TGT, needs=_fs(F.OVERLAY_READY), provides=_fs(F.VM_DEFINED),
             undo=Undo("undefine the replica VM", Op.UNDEFINE_VM, TGT)),
        Step("start the replica VM", Op.START_VM, TGT, needs=_fs(F.VM_DEFINED, F.SOURCE_STOPPED),
             provides=_fs(F.TARGET_RUNNING), undo=Undo("stop the replica VM", Op.STOP_VM, TGT)),
        Step("record failover completed", Op.RECORD, needs=_fs(F.TARGET_RUNNING, F.SOURCE_STOPPED),
             provides=_fs(F.FAILOVER_RECORDED), events=(E.FAILOVER_COMPLETED,)),
    )


def _failover_begin(event: Event) -> Step:
    return Step(f"record {event.value.replace('_', ' ')}", Op.RECORD, events=(event,),
                undo=Undo("record failover failed", Op.RECORD, events=(E.FAILOVER_FAILED,),
                          cancel_events=(E.CANCEL_FAILOVER,)))


def _test_failover(o: FailoverOptions) -> tuple[Step, ...]:
    network: tuple[Step, ...] = ()
    if o.network is TestNetwork.ISOLATED:
        network = (Step("create an isolated test network", Op.CREATE_TEST_NETWORK, TGT,
                        provides=_fs(F.NETWORK_READY),
                        undo=Undo("delete the test network", Op.DELETE_TEST_NETWORK, TGT)),)
    elif o.network is TestNetwork.EXISTING:
        network = (Step(f"check test network {o.network_name}", Op.CHECK_TEST_NETWORK, TGT,
                        provides=_fs(F.NETWORK_READY), inputs=("network_name",)),)
    vm_needs = _fs(F.OVERLAY_READY, F.NETWORK_READY) if network else _fs(F.OVERLAY_READY)
    return (
        Step("record test failover started", Op.RECORD, events=(E.TEST_FAILOVER_STARTED,),
             undo=Undo("record test failover cleaned up", Op.RECORD, events=(E.TEST_FAILOVER_CLEANED_UP,))),
        Step("choose recovery point", Op.CHOOSE_POINT, TGT, provides=_fs(F.POINT_CHOSEN), inputs=("point",)),
        Step("materialize the point as a test overlay", Op.MATERIALIZE_TEST_OVERLAY, TGT,
             needs=_fs(F.POINT_CHOSEN), provides=_fs(F.OVERLAY_READY),
             undo=Undo("delete the test overlay", Op.DELETE_TEST_OVERLAY, TGT)),
        *network,
        Step("define the test VM", Op.DEFINE_TEST_VM, TGT, needs=vm_needs, provides=_fs(F.VM_DEFINED),
             inputs=("network", "network_name"), undo=Undo("undefine the test VM", Op.UNDEFINE_TEST_VM, TGT)),
        Step("start the test VM", Op.START_TEST_VM, TGT, needs=_fs(F.VM_DEFINED), provides=_fs(F.TEST_VM_RUNNING),
             undo=Undo("stop the test VM", Op.STOP_TEST_VM, TGT)),
    )


def _test_cleanup(o: FailoverOptions) -> tuple[Step, ...]:
    st = OnError.STOP
    network = ((Step("delete the test network", Op.DELETE_TEST_NETWORK, TGT, provides=_fs(F.TEST_NETWORK_REMOVED),
                     needs=_fs(F.TEST_VM_REMOVED), on_error=st),)
               if o.network is TestNetwork.ISOLATED else ())
    return (
        Step("stop the test VM", Op.STOP_TEST_VM, TGT, provides=_fs(F.TEST_VM_STOPPED), on_error=st),
        Step("undefine the test VM", Op.UNDEFINE_TEST_VM, TGT, needs=_fs(F.TEST_VM_STOPPED),
             provides=_fs(F.TEST_VM_REMOVED), on_error=st),
        *network,
        Step("delete the test overlay", Op.DELETE_TEST_OVERLAY, TGT, needs=_fs(F.TEST_VM_REMOVED),
             provides=_fs(F.OVERLAY_REMOVED), on_error=st),
        Step("record notes and test failover cleaned up", Op.RECORD_NOTES, needs=_fs(F.OVERLAY_REMOVED),
             events=(E.TEST_FAILOVER_CLEANED_UP,), inputs=("notes",), on_error=st),
    )


def _planned(o: FailoverOptions) -> tuple[Step, ...]:
    return (
        _failover_begin(E.PLANNED_FAILOVER_STARTED),
        Step("shut down the source VM", Op.SHUT_DOWN_VM, SRC, provides=_fs(F.SOURCE_STOPPED),
             undo=Undo("start the source VM", Op.START_VM, SRC)),
        Step("replicate the last changes", Op.FINAL_SYNC, SRC, needs=_fs(F.SOURCE_STOPPED),
             provides=_fs(F.LAST_CHANGES_SYNCED)),
        *_replica_start(_fs(F.LAST_CHANGES_SYNCED)),
    )


def _unplanned(o: FailoverOptions) -> tuple[Step, ...]:
    cont = OnError.CONTINUE
    start_source = Undo("start the source VM if it answers", Op.START_VM, SRC, required=False)
    sync: tuple[Step, ...] = ()
    if o.shutdown_and_sync:
        sync = (Step("try to shut down the source VM", Op.SHUT_DOWN_VM, SRC, provides=_fs(F.SOURCE_STOPPED),
                     undo=start_source, on_error=cont),
                Step("try to replicate the last changes", Op.FINAL_SYNC, SRC, needs=_fs(F.SOURCE_STOPPED),
                     provides=_fs(F.LAST_CHANGES_SYNCED), on_error=cont))
    return (
        _failover_begin(E.UNPLANNED_FAILOVER_STARTED),
        *sync,
        Step("power off the source VM or declare it lost", Op.FENCE_SOURCE, SRC, provides=_fs(F.SOURCE_STOPPED),
             undo=start_source),
        *_replica_start(frozenset()),
    )


def _commit(o: FailoverOptions) -> tuple[Step, ...]:
    return (
        Step("record commit", Op.RECORD, events=(E.COMMIT,), provides=_fs(F.FAILOVER_RECORDED),
             on_error=OnError.STOP),
        Step("release older recovery points", Op.RELEASE_POINTS, TGT, needs=_fs(F.FAILOVER_RECORDED),
             on_error=OnError.STOP),
    )


def _cancel(o: FailoverOptions) -> tuple[Step, ...]:
    st = OnError.STOP
    return (
        Step("stop the replica VM", Op.STOP_VM, TGT, provides=_fs(F.TARGET_STOPPED), on_error=st),
        Step("undefine the replica VM", Op.UNDEFINE_VM, TGT, needs=_fs(F.TARGET_STOPPED),
             provides=_fs(F.VM_REMOVED), on_error=st),
        Step("delete the overlay", Op.DELETE_OVERLAY, TGT, needs=_fs(F.VM_REMOVED),
             provides=_fs(F.OVERLAY_REMOVED), on_error=st),
        Step("record failover cancelled", Op.RECORD, needs=_fs(F.TARGET_STOPPED, F.OVERLAY_REMOVED),
             events=(E.CANCEL_FAILOVER,), provides=_fs(F.FAILOVER_RECORDED), on_error=st),
        # After an unplanned failover the source may be gone: the cancel stands anyway.
        Step("start the source VM", Op.START_VM, SRC, needs=_fs(F.FAILOVER_RECORDED), on_error=OnError.CONTINUE),
    )


def _reverse(o: FailoverOptions) -> tuple[Step, ...]:
    st = OnError.STOP
    return (
        # After an unplanned failover the old primary may have come back with its VM
        # running (autostart): it must be off before anything writes to its disks.
        Step("stop the VM on the old primary", Op.STOP_VM, TGT, provides=_fs(F.TARGET_STOPPED), on_error=st),
        Step("record reverse replication started", Op.RECORD, needs=_fs(F.TARGET_STOPPED),
             events=(E.REVERSE_REPLICATION_STARTED,), on_error=st),
        Step("prepare the reverse replica from the old disks", Op.PREPARE_REVERSE_REPLICA, TGT,
             needs=_fs(F.TARGET_STOPPED), provides=_fs(F.REPLICA_READY), on_error=st),
        Step("resynchronize to the old primary", Op.RESYNC, SRC, needs=_fs(F.REPLICA_READY),
             provides=_fs(F.LAST_CHANGES_SYNCED), events=(E.REVERSE_REPLICATION_COMPLETED,), on_error=st),
    )


def _failback(o: FailoverOptions) -> tuple[Step, ...]:
    st = OnError.STOP
    return (
        Step("record failback started", Op.RECORD, events=(E.FAILBACK_STARTED,),
             undo=Undo("record failback failed", Op.RECORD, events=(E.FAILBACK_FAILED,))),
        Step("shut down the VM on the secondary", Op.SHUT_DOWN_VM, SRC, provides=_fs(F.SOURCE_STOPPED),
             undo=Undo("start the VM on the secondary", Op.START_VM, SRC)),
        Step("replicate the last changes to the primary", Op.FINAL_SYNC, SRC, needs=_fs(F.SOURCE_STOPPED),
             provides=_fs(F.LAST_CHANGES_SYNCED)),
        # The primary keeps the VM's own definition; defining it again is harmless, so
        # there is nothing to undo.
        Step("define the VM on the primary", Op.DEFINE_VM, TGT, needs=_fs(F.LAST_CHANGES_SYNCED),
             provides=_fs(F.VM_DEFINED)),
        Step("start the VM on the primary", Op.START_VM, TGT,
             needs=_fs(F.VM_DEFINED, F.SOURCE_STOPPED, F.LAST_CHANGES_SYNCED),
             provides=_fs(F.TARGET_RUNNING), undo=Undo("stop the VM on the primary", Op.STOP_VM, TGT)),
        Step("record failback completed", Op.RECORD, needs=_fs(F.TARGET_RUNNING), events=(E.FAILBACK_COMPLETED,),
             provides=_fs(F.FAILOVER_RECORDED)),
        Step("undefine the VM on the secondary", Op.UNDEFINE_VM, SRC, needs=_fs(F.FAILOVER_RECORDED),
             provides=_fs(F.VM_REMOVED), on_error=st),
        Step("prepare the forward replica from the secondary's disks", Op.PREPARE_FORWARD_REPLICA, SRC,
             needs=_fs(F.VM_REMOVED), provides=_fs(F.REPLICA_READY), on_error=st),
        Step("resynchronize forward to the secondary", Op.RESYNC, TGT, needs=_fs(F.REPLICA_READY),
             events=(E.RESYNC_COMPLETED,), on_error=st),
    )


_BUILD = {
    Kind.TEST_FAILOVER: (_P, _S, _test_failover),
    Kind.TEST_CLEANUP: (_P, _S, _test_cleanup),
    Kind.PLANNED_FAILOVER: (_P, _S, _planned),
    Kind.UNPLANNED_FAILOVER: (_P, _S, _unplanned),
    Kind.COMMIT: (_P, _S, _commit),
    Kind.CANCEL: (_P, _S, _cancel),
    Kind.REVERSE_REPLICATION: (_S, _P, _reverse),
    Kind.FAILBACK: (_S, _P, _failback),
}


def workflow(kind: Kind | str, options: FailoverOptions | None = None) -> Workflow:
    """The steps of `kind` for these options (`BadInput` naming the option when invalid)."""
    kind = Kind(kind)
    o = options or FailoverOptions()
    if isinstance(o.network, str):
        try:
            o = replace(o, network=TestNetwork(o.network))
        except ValueError:
            raise BadInput(f"network: {o.network!r} is not one of isolated, existing, none") from None
    parse_choice(o.point)
    if kind is Kind.PLANNED_FAILOVER and o.point != PointChoice.LATEST.value:
        raise BadInput(f"point: a planned failover fails over to the point of its final sync, not {o.point!r} "
                       "(use an unplanned failover to choose a point)")
    if kind in (Kind.TEST_FAILOVER, Kind.TEST_CLEANUP) and o.network is TestNetwork.EXISTING \
            and not (o.network_name or "").strip():
        raise BadInput("network_name: an existing network must be named for the test VM")
    return _workflow(kind, o)


@functools.lru_cache(maxsize=256)
def _workflow(kind: Kind, o: FailoverOptions) -> Workflow:
    # Frozen all the way down, so one instance serves every job (a runner rebuilds the
    # workflow from the job's rows at every step).
    source, target, build = _BUILD[kind]
    return Workflow(kind, source, target, build(o), o)


def check_start(wf: Workflow, state: State, ctx: ItemContext | None = None) -> State:
    """Refuse (lifecycle.TransitionRefused) a workflow whose first event the item's state
    does not allow, before anything acts. Returns the state that event leads to."""
    first = next(ev for s in wf.steps for ev in s.events)
    return transition(state, first, ctx)


def failback_sequence(state: State, ctx: ItemContext) -> tuple[Kind, ...]:
    """Failback = reverse replicate, planned failover back, replicate forward: the
    workflows still to run from this state (commit first, reverse replication until in sync)."""
    if state is State.COMMIT_PENDING:
        return (Kind.COMMIT, Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    if state is State.FAILED_OVER:
        return (Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    if state is State.REVERSE_REPLICATING:
        return (Kind.FAILBACK,) if ctx.reverse_in_sync else (Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    transition(state, Event.FAILBACK_STARTED, ctx)  # raises the lifecycle's reason
    return (Kind.FAILBACK,)


def reverse_sync_methods(old_disks: Mapping[str, bool]) -> dict[str, str]:
    """Per disk (id -> does the old primary still hold it), how reverse replication
    brings it in sync: `hash_scan` against the old disk (only differing blocks move)
    whenever it exists, whatever its size (cycles handle a grown disk); `seed` (a full
    copy) only for a disk the old primary lost."""
    return {d: ("hash_scan" if exists else "seed") for d, exists in old_disks.items()}


# ---- the runner model -----------------------------------------------------------------

class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNDOING = "undoing"
    UNDONE = "undone"
    UNDO_FAILED = "undo_failed"


@dataclass(frozen=True)
class StepRecord:
    status: Status = Status.PENDING
    attempts: int = 0
    done: bool = False          # its events were recorded (so its undo's are due)
    error: str | None = None    # why the step failed
    undo_error: str | None = None


@dataclass(frozen=True)
class RunState:
    workflow: Workflow
    records: tuple[StepRecord, ...]
    cancel_requested: bool = False

    @classmethod
    def start(cls, wf: Workflow) -> RunState:
        return cls(wf, tuple(StepRecord() for _ in wf.steps))

    def record(self, name: str) -> StepRecord:
        return self.records[self.workflow.index(name)]

    def to_json(self) -> dict[str, Any]:
        """What a job persists: the workflow's kind and options, and one row per step."""
        o = self.workflow.options
        return {"kind": self.workflow.kind.value, "cancel_requested": self.cancel_requested,
                "options": {"point": o.point, "shutdown_and_sync": o.shutdown_and_sync, "network": o.network.value,
                            "network_name": o.network_name, "notes": o.notes},
                "steps": [{"name": st.name, "status": r.status.value, "attempts": r.attempts, "done": r.done,
                           "error": r.error, "undo_error": r.undo_error}
                          for st, r in zip(self.workflow.steps, self.records, strict=True)]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunState:
        """The persisted state back; the steps must be those this version defines for the
        kind and options (a job persisted by another version is refused, not guessed at)."""
        wf = workflow(d["kind"], FailoverOptions(**d["options"]))
        rows = list(d["steps"])
        if [r["name"] for r in rows] != [st.name for st in wf.steps]:
            raise BadInput(f"{wf.kind}: the persisted steps are not this version's "
                           f"({', '.join(r['name'] for r in rows)})")
        recs = tuple(StepRecord(Status(r["status"]), int(r["attempts"]), bool(r["done"]), r.get("error"),
                                r.get("undo_error")) for r in rows)
        return cls(wf, recs, bool(d.get("cancel_requested")))


class ActionKind(StrEnum):
    DO = "do"
    UNDO = "undo"
    SKIP = "skip"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    index: int
    step: str                    # the step's name (an undo's own name in `label`)
    label: str
    op: Op | None
    site: Site | None
    events: tuple[Event, ...]    # to record with finishing it
    resumed: bool = False        # it was interrupted: performed again
    reason: str = ""


class Outcome(StrEnum):
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    FAILED = "failed"
    ROLLBACK_FAILED = "rollback_failed"


@dataclass(frozen=True)
class Done:
    outcome: Outcome
    message: str
    failed: tuple[str, ...] = ()     # steps (and undos) that failed, in order


_ATTEMPTED = (Status.RUNNING, Status.DONE, Status.FAILED, Status.UNDOING, Status.UNDONE, Status.UNDO_FAILED)


def _effective(rec: StepRecord) -> Status:
    if rec.status is Status.RUNNING and rec.attempts >= MAX_ATTEMPTS:
        return Status.FAILED
    return rec.status


def _step_failed(rec: StepRecord) -> bool:
    """It failed, or was interrupted MAX_ATTEMPTS times (also once rolled back)."""
    return rec.error is not None or (rec.attempts >= MAX_ATTEMPTS and not rec.done
                                     and rec.status is not Status.PENDING)


def _failures(s: RunState) -> tuple[str, ...]:
    out = []
    for step, rec in zip(s.workflow.steps, s.records, strict=True):
        if _step_failed(rec):
            out.append(step.name)
        if rec.status is Status.UNDO_FAILED and step.undo:
            out.append(step.undo.name)
    return tuple(out)


def _cancelled(s: RunState) -> bool:
    """An operator's cancel rolls this back, not a failure of a step that rolls back."""
    return s.cancel_requested and not any(
        _step_failed(rec) and step.on_error is OnError.ROLLBACK
        for step, rec in zip(s.workflow.steps, s.records, strict=True))


def _rolling_back(s: RunState) -> bool:
    for step, rec in zip(s.workflow.steps, s.records, strict=True):
        if rec.status in (Status.UNDOING, Status.UNDONE, Status.UNDO_FAILED):
            return True
        if _effective(rec) is Status.FAILED and step.on_error is OnError.ROLLBACK:
            return True
    if s.cancel_requested and s.workflow.can_roll_back:
        # Cancel rolls back until the last step that can roll back is done.
        return any(rec.status is not Status.DONE for step, rec in zip(s.workflow.steps, s.records, strict=True)
                   if step.on_error is OnError.ROLLBACK)
    return False


def _rollback(s: RunState) -> Action | Done:
    wf = s.workflow
    for i in range(len(wf.steps) - 1, -1, -1):
        step, rec = wf.steps[i], s.records[i]
        if step.undo is None or rec.status not in _ATTEMPTED or rec.status is Status.UNDONE:
            continue
        if rec.status is Status.UNDO_FAILED:
            if step.undo.required:
                return Done(Outcome.ROLLBACK_FAILED,
                            f"{wf.kind}: rollback stopped: {step.undo.name} failed ({rec.undo_error}); "
                            "nothing after it was undone", _failures(s))
            continue
        u = step.undo
        events = () if not rec.done else (u.cancel_events if _cancelled(s) and u.cancel_events is not None
                                          else u.events)
        return Action(ActionKind.UNDO, i, step.name, u.name, u.op, wf.site(u.site), events,
                      resumed=rec.status is Status.UNDOING)
    failed = _failures(s)
    if _cancelled(s):
        return Done(Outcome.CANCELLED, f"{wf.kind}: cancelled and rolled back", failed)
    return Done(Outcome.ROLLED_BACK, f"{wf.kind}: rolled back after: {', '.join(failed)}", failed)


def next_action(s: RunState) -> Action | Done:
    """What to do next given the persisted step records (see the module docstring)."""
    wf = s.workflow
    if _rolling_back(s):
        return _rollback(s)
    facts: set[Fact] = set()
    for i, (step, rec) in enumerate(zip(wf.steps, s.records, strict=True)):
        status = _effective(rec)
        if status in (Status.DONE, Status.SKIPPED):
            if status is Status.DONE:
                facts |= step.provides
            continue
        if status is Status.FAILED:
            if step.on_error is OnError.STOP:
                return Done(Outcome.FAILED, f"{wf.kind}: {step.name} failed ({rec.error or 'interrupted too often'})",
                            _failures(s))
            continue  # CONTINUE (ROLLBACK failures roll back above)
        if s.cancel_requested:
            return Done(Outcome.CANCELLED, f"{wf.kind}: cancelled before {step.name}", _failures(s))
        if status is Status.RUNNING:
            return Action(ActionKind.DO, i, step.name, step.name, step.op, wf.site(step.site), step.events,
                          resumed=True)
        missing = step.needs - facts
        if missing:
            if step.on_error is not OnError.CONTINUE:  # Workflow.__post_init__ rules this out
                raise AssertionError(f"{wf.kind}: {step.name} needs {sorted(missing)}")
            return Action(ActionKind.SKIP, i, step.name, step.name, None, None, (),
                          reason=f"skipped: {', '.join(sorted(missing))} not established")
        return Action(ActionKind.DO, i, step.name, step.name, step.op, wf.site(step.site), step.events)
    return Done(Outcome.COMPLETED, f"{wf.kind}: completed", _failures(s))


def _set(s: RunState, i: int, rec: StepRecord) -> RunState:
    return replace(s, records=s.records[:i] + (rec,) + s.records[i + 1:])


def begin(s: RunState, a: Action) -> RunState:
    """The state to persist before `a` acts."""
    rec = s.records[a.index]
    if a.kind is ActionKind.DO:
        return _set(s, a.index, replace(rec, status=Status.RUNNING, attempts=rec.attempts + 1))
    if a.kind is ActionKind.UNDO:
        return _set(s, a.index, replace(rec, status=Status.UNDOING))
    return s


def finish(s: RunState, a: Action) -> RunState:
    """The state to persist, with `a.events` recorded, once `a` is done."""
    rec = s.records[a.index]
    if a.kind is ActionKind.DO:
        return _set(s, a.index, replace(rec, status=Status.DONE, done=True))
    if a.kind is ActionKind.UNDO:
        return _set(s, a.index, replace(rec, status=Status.UNDONE))
    return _set(s, a.index, replace(rec, status=Status.SKIPPED))


def fail(s: RunState, a: Action, error: str) -> RunState:
    rec = s.records[a.index]
    if a.kind is ActionKind.DO:
        return _set(s, a.index, replace(rec, status=Status.FAILED, error=error))
    return _set(s, a.index, replace(rec, status=Status.UNDO_FAILED, undo_error=error))


def retry(s: RunState) -> RunState:
    """Run a job that ended `FAILED` or `ROLLBACK_FAILED` again (the operator fixed the
    cause): failed stop-on-error steps start over, a failed required undo is resumed."""
    recs = []
    for step, rec in zip(s.workflow.steps, s.records, strict=True):
        if rec.status is Status.FAILED and step.on_error is OnError.STOP:
            rec = replace(rec, status=Status.PENDING, attempts=0, error=None)
        elif rec.status is Status.RUNNING and rec.attempts >= MAX_ATTEMPTS and step.on_error is OnError.STOP:
            rec = replace(rec, attempts=0)
        elif rec.status is Status.UNDO_FAILED and step.undo is not None and step.undo.required:
            rec = replace(rec, status=Status.UNDOING, undo_error=None)
        recs.append(rec)
    return replace(s, records=tuple(recs))


def request_cancel(s: RunState) -> RunState:
    """The operator cancels: a workflow that can roll back does (cancelling a failover
    records `cancel_failover`); the others stop before their next step."""
    return replace(s, cancel_requested=True)


def describe(wf: Workflow) -> str:
    """The steps, one a line, as a job shows them before it runs."""
    lines = [f"{wf.kind} ({wf.source} -> {wf.target})"]
    for n, s in enumerate(wf.steps, 1):
        where = f" [{wf.site(s.site)}]" if s.site else ""
        extra = []
        if s.events:
            extra.append("records " + ", ".join(e.value for e in s.events))
        if s.on_error is not OnError.ROLLBACK:
            extra.append({OnError.CONTINUE: "optional", OnError.STOP: "stops on error"}[s.on_error])
        if s.undo:
            extra.append(f"undo: {s.undo.name}")
        lines.append(f"{n:>2}. {s.name}{where}" + (f"  ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)
