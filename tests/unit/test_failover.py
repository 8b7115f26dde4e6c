"""Failover workflows and the runner model (domain/failover.py).

The core of this file is a model of the two sites (which VM runs, is defined, which
overlays, test VMs and networks exist) and of the runner loop the orchestration runs.
Every workflow is driven through it with the control plane killed at every point (before
a step acts, after it acted but before it was persisted as done), twice, three times in a
row, with every step failing, with an operator's cancel at every step boundary; after
every recorded event the lifecycle invariants must hold, and at every moment the VM must
not run on both sites, nor on a site its state does not allow, nor be written to by a
cycle while it runs there.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import pytest

from standby.domain import lifecycle as lc
from standby.domain.failover import (
    MAX_ATTEMPTS,
    Action,
    ActionKind,
    Done,
    Fact,
    FailoverOptions,
    Kind,
    OnError,
    Op,
    Outcome,
    RunState,
    Status,
    Step,
    TestNetwork,
    Undo,
    Workflow,
    begin,
    check_start,
    describe,
    fail,
    failback_sequence,
    finish,
    next_action,
    request_cancel,
    retry,
    reverse_sync_methods,
    workflow,
)
from standby.errors import BadInput

P, S = lc.Site.PRIMARY, lc.Site.SECONDARY
St = lc.State


class OpFailed(Exception):
    pass


class Violation(AssertionError):
    pass


@dataclass
class World:
    """The sites as the workflows' operations would leave them."""

    state: lc.State
    running: set[lc.Site]
    defined: set[lc.Site]
    reachable: set[lc.Site] = field(default_factory=lambda: {P, S})
    overlay: bool = False
    test_overlay: bool = False
    test_vm_defined: bool = False
    test_vm_running: bool = False
    test_network: bool = False
    test_record: bool = False      # a test failover exists in the store
    reverse_in_sync: bool = False
    events: list[lc.Event] = field(default_factory=list)

    def physical(self) -> tuple[object, ...]:
        return (frozenset(self.running), frozenset(self.defined), self.overlay, self.test_overlay,
                self.test_vm_defined, self.test_vm_running, self.test_network)

    def ctx(self) -> lc.ItemContext:
        return lc.ItemContext(vm="web01", initial_replication_complete=True, has_recovery_point=True,
                              test_failover_active=self.test_record, reverse_in_sync=self.reverse_in_sync)

    def check(self, where: str) -> None:
        if len(self.running) > 1:
            raise Violation(f"{where}: the VM runs on both sites")
        if not self.running <= lc.runs_on(self.state):
            raise Violation(f"{where}: the VM runs on {sorted(self.running)} in state {self.state}")

    def record(self, events: tuple[lc.Event, ...], where: str) -> None:
        for ev in events:
            before = self.state
            after = lc.transition(before, ev, self.ctx())
            if not lc.invariant_holds(after) or not lc.step_invariant_holds(before, ev, after):
                raise Violation(f"{where}: {before} --{ev}--> {after} breaks the lifecycle invariants")
            self.state = after
            self.events.append(ev)
            if ev is lc.Event.TEST_FAILOVER_STARTED:
                self.test_record = True
            elif ev is lc.Event.TEST_FAILOVER_CLEANED_UP:
                self.test_record = False
            elif ev is lc.Event.REVERSE_REPLICATION_COMPLETED:
                self.reverse_in_sync = True
            self.check(where)

    def perform(self, op: Op | None, site: lc.Site | None, where: str) -> None:
        other = None if site is None else (S if site is P else P)
        if site is not None and site not in self.reachable and op is not Op.FENCE_SOURCE:
            raise OpFailed(f"{site} does not answer")
        if op in (Op.SHUT_DOWN_VM, Op.STOP_VM, Op.FENCE_SOURCE):  # fencing a lost site declares it lost
            self.running.discard(site)
        elif op is Op.START_VM:
            if site not in self.defined:
                raise Violation(f"{where}: start of an undefined VM on {site}")
            self.running.add(site)
        elif op in (Op.FINAL_SYNC, Op.RESYNC):
            if other in self.running:
                raise Violation(f"{where}: a cycle writes to {other} where the VM runs")
        elif op is Op.MATERIALIZE_OVERLAY:
            self.overlay = True
        elif op is Op.DELETE_OVERLAY:
            if site in self.running or site in self.defined:
                raise Violation(f"{where}: the overlay is deleted under a defined VM")
            self.overlay = False
        elif op is Op.DEFINE_VM:
            if site is S and not self.overlay:
                raise Violation(f"{where}: the replica is defined without its overlay")
            self.defined.add(site)
        elif op is Op.UNDEFINE_VM:
            if site in self.running:
                raise Violation(f"{where}: a running VM is undefined")
            self.defined.discard(site)
        elif op is Op.MATERIALIZE_TEST_OVERLAY:
            self.test_overlay = True
        elif op is Op.DELETE_TEST_OVERLAY:
            if self.test_vm_defined:
                raise Violation(f"{where}: the test overlay is deleted under the test VM")
            self.test_overlay = False
        elif op is Op.CREATE_TEST_NETWORK:
            self.test_network = True
        elif op is Op.DELETE_TEST_NETWORK:
            if self.test_vm_defined:
                raise Violation(f"{where}: the test network is deleted under the test VM")
            self.test_network = False
        elif op is Op.DEFINE_TEST_VM:
            if not self.test_overlay:
                raise Violation(f"{where}: the test VM is defined without its overlay")
            self.test_vm_defined = True
        elif op is Op.UNDEFINE_TEST_VM:
            if self.test_vm_running:
                raise Violation(f"{where}: a running test VM is undefined")
            self.test_vm_defined = False
        elif op is Op.START_TEST_VM:
            if not self.test_vm_defined:
                raise Violation(f"{where}: start of an undefined test VM")
            self.test_vm_running = True
        elif op is Op.STOP_TEST_VM:
            self.test_vm_running = False
        elif op in (Op.PREPARE_REVERSE_REPLICA, Op.PREPARE_FORWARD_REPLICA):
            if site in self.running:
                raise Violation(f"{where}: the replica is prepared on {site} where the VM runs")
        self.check(where)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: Kind
    options: FailoverOptions
    world: World
    completed_state: lc.State
    completed_running: frozenset[lc.Site]
    rolled_back_state: lc.State | None = None   # after a rollback of a started workflow


def _world(state: lc.State, running: set[lc.Site], defined: set[lc.Site], **kw: object) -> World:
    return World(state, set(running), set(defined), **kw)  # type: ignore[arg-type]


def scenarios() -> list[Scenario]:
    after_test = dict(test_overlay=True, test_vm_defined=True, test_vm_running=True, test_network=True,
                      test_record=True)
    failed_over = dict(overlay=True)
    return [
        Scenario("test failover, isolated network", Kind.TEST_FAILOVER, FailoverOptions(),
                 _world(St.PROTECTED, {P}, {P}), St.TEST_FAILOVER, frozenset({P}), St.PROTECTED),
        Scenario("test failover, existing network", Kind.TEST_FAILOVER,
                 FailoverOptions(network=TestNetwork.EXISTING, network_name="lab"),
                 _world(St.PROTECTED, {P}, {P}), St.TEST_FAILOVER, frozenset({P}), St.PROTECTED),
        Scenario("test failover, no network", Kind.TEST_FAILOVER, FailoverOptions(network=TestNetwork.NONE),
                 _world(St.PROTECTED, {P}, {P}), St.TEST_FAILOVER, frozenset({P}), St.PROTECTED),
        Scenario("test failover cleanup", Kind.TEST_CLEANUP, FailoverOptions(notes="drill ok"),
                 _world(St.TEST_FAILOVER, {P}, {P}, **after_test), St.PROTECTED, frozenset({P})),
        Scenario("test failover cleanup after the item degraded", Kind.TEST_CLEANUP, FailoverOptions(),
                 _world(St.RESYNC_REQUIRED, {P}, {P}, **after_test), St.RESYNC_REQUIRED, frozenset({P})),
        Scenario("planned failover", Kind.PLANNED_FAILOVER, FailoverOptions(),
                 _world(St.PROTECTED, {P}, {P}), St.COMMIT_PENDING, frozenset({S}), St.ERROR),
        Scenario("unplanned failover", Kind.UNPLANNED_FAILOVER, FailoverOptions(point="latest_processed"),
                 _world(St.PROTECTED, {P}, {P}), St.COMMIT_PENDING, frozenset({S}), St.ERROR),
        Scenario("unplanned failover, shut down and sync", Kind.UNPLANNED_FAILOVER,
                 FailoverOptions(shutdown_and_sync=True), _world(St.PROTECTED, {P}, {P}),
                 St.COMMIT_PENDING, frozenset({S}), St.ERROR),
        Scenario("unplanned failover, primary lost, shut down and sync tried", Kind.UNPLANNED_FAILOVER,
                 FailoverOptions(shutdown_and_sync=True),
                 _world(St.RESYNC_REQUIRED, set(), {P}, reachable={S}), St.COMMIT_PENDING, frozenset({S}),
                 St.ERROR),
        Scenario("commit", Kind.COMMIT, FailoverOptions(), _world(St.COMMIT_PENDING, {S}, {P, S}, **failed_over),
                 St.FAILED_OVER, frozenset({S})),
        Scenario("cancel", Kind.CANCEL, FailoverOptions(), _world(St.COMMIT_PENDING, {S}, {P, S}, **failed_over),
                 St.PAUSED, frozenset({P})),
        Scenario("cancel, primary lost", Kind.CANCEL, FailoverOptions(),
                 _world(St.COMMIT_PENDING, {S}, {P, S}, reachable={S}, **failed_over), St.PAUSED, frozenset()),
        Scenario("reverse replication", Kind.REVERSE_REPLICATION, FailoverOptions(),
                 _world(St.FAILED_OVER, {S}, {P, S}, **failed_over), St.REVERSE_REPLICATING, frozenset({S})),
        Scenario("failback", Kind.FAILBACK, FailoverOptions(),
                 _world(St.REVERSE_REPLICATING, {S}, {P, S}, reverse_in_sync=True, **failed_over),
                 St.PROTECTED, frozenset({P}), St.REVERSE_REPLICATING),
    ]


SCENARIOS = {sc.name: sc for sc in scenarios()}


@dataclass
class Faults:
    kills: frozenset[tuple[int, str]] = frozenset()   # (action number, "before" | "after")
    fail_steps: frozenset[tuple[ActionKind, int]] = frozenset()  # each fails once
    cancel_at: int | None = None                      # cancel requested before this action number
    failed_once: set[tuple[ActionKind, int]] = field(default_factory=set)


@dataclass
class Run:
    done: Done
    state: RunState
    world: World
    actions: int
    log: list[Action] = field(default_factory=list)


def persist(s: RunState) -> RunState:
    """What a restarted control plane reads back from the job's rows."""
    return RunState.from_json(json.loads(json.dumps(s.to_json())))


def run(sc: Scenario, faults: Faults | None = None, *, world: World | None = None,
        rs: RunState | None = None, limit: int = 200) -> Run:
    """The orchestration's runner loop against the model; a kill drops the process (the
    persisted RunState is all the next call of next_action sees)."""
    f = faults or Faults()
    w = world or _copy(sc.world)
    s = rs or RunState.start(workflow(sc.kind, sc.options))
    n = 0
    log: list[Action] = []
    while True:
        if f.cancel_at is not None and n == f.cancel_at:
            s = request_cancel(s)
        a = next_action(s)
        if isinstance(a, Done):
            w.check("end")
            return Run(a, s, w, n, log)
        n += 1
        log.append(a)
        assert n < limit, "runner loops"
        where = f"{sc.name}: action {n} ({a.kind} {a.label})"
        if a.kind is ActionKind.SKIP:
            s = finish(s, a)
            continue
        s = persist(begin(s, a))
        if (n, "before") in f.kills:
            continue
        try:
            if (a.kind, a.index) in f.fail_steps and (a.kind, a.index) not in f.failed_once:
                f.failed_once.add((a.kind, a.index))
                raise OpFailed("injected")
            w.perform(a.op, a.site, where)
        except OpFailed as e:
            s = persist(fail(s, a, str(e)))
            continue
        if (n, "after") in f.kills:
            continue
        w.record(a.events, where)      # with the step's "done", in one transaction
        s = persist(finish(s, a))


def _copy(w: World) -> World:
    return World(w.state, set(w.running), set(w.defined), set(w.reachable), w.overlay, w.test_overlay,
                 w.test_vm_defined, w.test_vm_running, w.test_network, w.test_record, w.reverse_in_sync)


def expect_completed(sc: Scenario, r: Run, *, optional_failed: bool = False) -> None:
    assert r.done.outcome is Outcome.COMPLETED, (sc.name, r.done)
    assert r.world.state is sc.completed_state, (sc.name, r.world.state)
    if optional_failed:  # e.g. cancel's "start the source VM" failed: the VM runs nowhere
        assert r.world.running <= sc.completed_running
    else:
        assert r.world.running == sc.completed_running


def expect_rolled_back(sc: Scenario, r: Run, base: Run) -> None:
    """Back where it started: same VMs, overlays, test objects; the state the rollback records."""
    assert r.world.physical() == sc.world.physical(), (sc.name, r.done)
    started = r.state.records[0].done
    if sc.kind is Kind.TEST_FAILOVER or not started:
        expected = sc.world.state
    elif r.done.outcome is Outcome.CANCELLED and sc.kind is not Kind.FAILBACK:
        expected = St.PAUSED                       # a cancelled failover leaves the VM non-replicating
    else:
        expected = sc.rolled_back_state
    assert r.world.state is expected, (sc.name, r.done, r.world.events)
    assert not r.world.test_record or sc.world.test_record


def baseline(sc: Scenario) -> Run:
    return run(sc)


# ---- each workflow, no faults ---------------------------------------------------------------

@pytest.mark.parametrize("name", SCENARIOS)
def test_every_workflow_completes_and_ends_where_it_should(name: str) -> None:
    sc = SCENARIOS[name]
    check_start(workflow(sc.kind, sc.options), sc.world.state, sc.world.ctx())
    r = baseline(sc)
    expect_completed(sc, r)
    if sc.kind is Kind.TEST_FAILOVER:   # replication untouched: production still on the primary
        assert (r.world.test_vm_running, r.world.test_overlay) == (True, True)
        assert r.world.test_network is (sc.options.network is TestNetwork.ISOLATED)
        assert lc.is_replicating(r.world.state)
    if sc.kind is Kind.TEST_CLEANUP:
        assert not (r.world.test_vm_defined or r.world.test_overlay or r.world.test_network or r.world.test_record)


# ---- kills --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCENARIOS)
def test_a_kill_at_any_point_resumes_to_the_same_end(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    for n in range(1, base.actions + 1):
        for phase in ("before", "after"):
            r = run(sc, Faults(kills=frozenset({(n, phase)})))
            expect_completed(sc, r)
            assert r.world.physical() == base.world.physical()
            assert r.world.events == base.world.events       # each event recorded exactly once


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_kills_anywhere_resume_to_the_same_end(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    points = [(n, ph) for n in range(1, base.actions + 3) for ph in ("before", "after")]
    for k1, k2 in itertools.combinations(points, 2):
        r = run(sc, Faults(kills=frozenset({k1, k2})))
        if r.done.outcome is Outcome.COMPLETED:
            assert r.world.physical() == base.world.physical()
            assert r.world.events == base.world.events
        else:  # the same step interrupted MAX_ATTEMPTS times is not possible with two kills
            raise AssertionError((sc.name, k1, k2, r.done))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_step_interrupted_every_time_counts_as_failed(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    for n in range(1, base.actions + 1):
        kills = frozenset((n + k, "after") for k in range(MAX_ATTEMPTS))
        r = run(sc, Faults(kills=kills))
        a = r.state
        interrupted = [i for i, rec in enumerate(a.records) if rec.attempts >= MAX_ATTEMPTS and not rec.done]
        if base.log[n - 1].kind is ActionKind.SKIP or base.state.records[base.log[n - 1].index].error:
            expect_completed(sc, r)   # nothing to interrupt there: skipped, or it fails before the kill
            continue
        assert interrupted == [base.log[n - 1].index], (sc.name, n, r.done)
        step = a.workflow.steps[interrupted[0]]
        assert step.name in r.done.failed
        if step.on_error is OnError.ROLLBACK:
            assert r.done.outcome is Outcome.ROLLED_BACK
            expect_rolled_back(sc, r, base)
        elif step.on_error is OnError.STOP:
            assert r.done.outcome is Outcome.FAILED
            again = run(sc, world=r.world, rs=retry(r.state))
            expect_completed(sc, again)
        else:
            expect_completed(sc, r)


# ---- failures -----------------------------------------------------------------------------

def _fail_each_step(sc: Scenario) -> list[tuple[int, Step]]:
    return list(enumerate(workflow(sc.kind, sc.options).steps))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_failing_step_follows_its_error_policy_even_with_a_kill_anywhere(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    for i, step in _fail_each_step(sc):
        fails = frozenset({(ActionKind.DO, i)})
        plain = run(sc, Faults(fail_steps=fails))
        if plain.state.records[i].status in (Status.PENDING, Status.SKIPPED):   # never attempted
            continue
        for kill in [None, *((n, ph) for n in range(1, plain.actions + 1) for ph in ("before", "after"))]:
            r = run(sc, Faults(fail_steps=fails, kills=frozenset({kill}) if kill else frozenset()))
            if step.on_error is OnError.ROLLBACK:
                assert r.done.outcome is Outcome.ROLLED_BACK, (sc.name, step.name, kill, r.done)
                assert step.name in r.done.failed
                expect_rolled_back(sc, r, base)
            elif step.on_error is OnError.STOP:
                assert r.done.outcome is Outcome.FAILED, (sc.name, step.name, kill, r.done)
                expect_completed(sc, run(sc, world=r.world, rs=retry(r.state)))
            else:
                expect_completed(sc, r, optional_failed=True)
                assert step.name in r.done.failed   # reported, not fatal


@pytest.mark.parametrize("name", [n for n, sc in SCENARIOS.items() if workflow(sc.kind, sc.options).can_roll_back])
def test_a_failing_undo_stops_the_rollback_safely_and_a_retry_finishes_it(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    wf = workflow(sc.kind, sc.options)
    last = max(i for i, s in enumerate(wf.steps) if s.on_error is OnError.ROLLBACK)
    for j, step in enumerate(wf.steps[:last]):
        if step.undo is None:
            continue
        r = run(sc, Faults(fail_steps=frozenset({(ActionKind.DO, last), (ActionKind.UNDO, j)})))
        if step.undo.required:
            assert r.done.outcome is Outcome.ROLLBACK_FAILED, (sc.name, step.name, r.done)
            assert step.undo.name in r.done.failed and step.undo.name in r.done.message
            assert lc.is_switching(r.world.state) or r.world.state is St.TEST_FAILOVER
            r = run(sc, world=r.world, rs=retry(r.state))
        assert r.done.outcome is Outcome.ROLLED_BACK, (sc.name, step.name, r.done)
        if step.undo.required:
            expect_rolled_back(sc, r, base)


# ---- cancel -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCENARIOS)
def test_cancel_at_any_step_boundary(name: str) -> None:
    sc = SCENARIOS[name]
    base = baseline(sc)
    wf = workflow(sc.kind, sc.options)
    for n in range(0, base.actions + 1):
        for kill in (None, (n + 1, "after")):
            r = run(sc, Faults(cancel_at=n, kills=frozenset({kill}) if kill else frozenset()))
            past_no_return = wf.can_roll_back and all(
                rec.done for s, rec in zip(wf.steps, r.state.records, strict=True) if s.on_error is OnError.ROLLBACK)
            if r.done.outcome is Outcome.COMPLETED:
                # Only once every step that can roll back is done does a cancel come too late.
                assert past_no_return or n >= base.actions, (sc.name, n)
                expect_completed(sc, r)
            elif past_no_return:      # failback's forward steps: stopped between them, VM home
                assert r.done.outcome is Outcome.CANCELLED
                assert r.world.running == sc.completed_running
            elif wf.can_roll_back:
                assert r.done.outcome is Outcome.CANCELLED, (sc.name, n, r.done)
                expect_rolled_back(sc, r, base)
                if sc.kind in (Kind.PLANNED_FAILOVER, Kind.UNPLANNED_FAILOVER) and r.state.records[0].done:
                    assert r.world.events[-1] is lc.Event.CANCEL_FAILOVER
            else:
                assert r.done.outcome is Outcome.CANCELLED, (sc.name, n, r.done)   # stopped between steps


# ---- rules --------------------------------------------------------------------------------

def test_planned_failover_is_refused_until_initial_replication_is_complete() -> None:
    wf = workflow(Kind.PLANNED_FAILOVER)
    with pytest.raises(lc.TransitionRefused, match="initial replication is not complete"):
        check_start(wf, St.PROTECTED, lc.ItemContext(vm="web01", has_recovery_point=True))
    with pytest.raises(lc.TransitionRefused, match="paused"):
        check_start(wf, St.PAUSED, lc.ItemContext(initial_replication_complete=True))
    assert check_start(wf, St.PROTECTED, lc.ItemContext(initial_replication_complete=True)) is St.FAILOVER_IN_PROGRESS


def test_one_test_failover_per_vm_at_a_time() -> None:
    wf = workflow(Kind.TEST_FAILOVER)
    ctx = lc.ItemContext(initial_replication_complete=True, has_recovery_point=True, test_failover_active=True)
    with pytest.raises(lc.TransitionRefused, match="one test failover per VM at a time"):
        check_start(wf, St.TEST_FAILOVER, ctx)
    with pytest.raises(lc.TransitionRefused, match="clean it up first"):
        check_start(wf, St.PROTECTED, ctx)


def test_unplanned_failover_keeps_going_when_the_source_cannot_be_shut_down() -> None:
    sc = SCENARIOS["unplanned failover, primary lost, shut down and sync tried"]
    r = run(sc)
    assert r.done.outcome is Outcome.COMPLETED
    assert r.done.failed == ("try to shut down the source VM",)
    recs = {s.name: rec.status for s, rec in zip(r.state.workflow.steps, r.state.records, strict=True)}
    assert recs["try to replicate the last changes"] is Status.SKIPPED


def test_planned_failover_syncs_the_last_changes_after_the_source_stopped() -> None:
    wf = workflow(Kind.PLANNED_FAILOVER)
    names = [s.name for s in wf.steps]
    assert names.index("shut down the source VM") < names.index("replicate the last changes") \
        < names.index("choose recovery point") < names.index("start the replica VM")
    assert Fact.LAST_CHANGES_SYNCED in wf.steps[wf.index("choose recovery point")].needs


def test_options_are_checked_naming_the_field() -> None:
    with pytest.raises(BadInput, match="^point: a planned failover"):
        workflow(Kind.PLANNED_FAILOVER, FailoverOptions(point="latest_app_consistent"))
    with pytest.raises(BadInput, match="^network_name"):
        workflow(Kind.TEST_FAILOVER, FailoverOptions(network=TestNetwork.EXISTING))
    with pytest.raises(BadInput, match="^network: 'wifi'"):
        workflow(Kind.TEST_FAILOVER, FailoverOptions(network="wifi"))  # type: ignore[arg-type]
    assert workflow(Kind.UNPLANNED_FAILOVER, FailoverOptions(point="0000000007")).options.point == "0000000007"


def test_a_workflow_definition_is_checked() -> None:
    with pytest.raises(ValueError, match="needs .*which no earlier required step provides"):
        Workflow(Kind.COMMIT, P, S, (Step("start", Op.START_VM, needs=frozenset({Fact.SOURCE_STOPPED})),))
    with pytest.raises(ValueError, match="rolls back after the point of no return"):
        Workflow(Kind.COMMIT, P, S, (Step("a", Op.RECORD, on_error=OnError.STOP), Step("b", Op.RECORD)))
    with pytest.raises(ValueError, match="optional step 'a' records events"):
        Workflow(Kind.COMMIT, P, S, (Step("a", Op.RECORD, events=(lc.Event.COMMIT,), on_error=OnError.CONTINUE),))
    with pytest.raises(ValueError, match="repeat"):
        Workflow(Kind.COMMIT, P, S, (Step("a", Op.RECORD), Step("a", Op.RECORD)))


def test_every_workflow_starts_its_vm_on_the_target_only_after_the_source_stopped() -> None:
    for kind in Kind:
        wf = workflow(kind, FailoverOptions(shutdown_and_sync=True))
        for s in wf.steps:
            if s.op is Op.START_VM and wf.site(s.site) == wf.target:
                assert Fact.SOURCE_STOPPED in s.needs, (kind, s.name)
            if s.undo and s.undo.op is Op.START_VM:
                # a source restarted by a rollback: every target start before it is undone first
                assert s.undo.site is not None and wf.site(s.undo.site) == wf.source


def test_reverse_replication_never_copies_a_disk_the_old_primary_still_has() -> None:
    assert reverse_sync_methods({"web-vda": True, "web-vdb": False}) == {"web-vda": "hash_scan", "web-vdb": "seed"}


def test_failback_sequence() -> None:
    ctx = lc.ItemContext(reverse_in_sync=False)
    assert failback_sequence(St.COMMIT_PENDING, ctx) == (Kind.COMMIT, Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    assert failback_sequence(St.FAILED_OVER, ctx) == (Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    assert failback_sequence(St.REVERSE_REPLICATING, ctx) == (Kind.REVERSE_REPLICATION, Kind.FAILBACK)
    assert failback_sequence(St.REVERSE_REPLICATING, lc.ItemContext(reverse_in_sync=True)) == (Kind.FAILBACK,)
    with pytest.raises(lc.TransitionRefused):
        failback_sequence(St.PROTECTED, ctx)


def test_next_action_resumes_an_interrupted_step_and_skips_nothing_twice() -> None:
    s = RunState.start(workflow(Kind.COMMIT))
    a = next_action(s)
    assert isinstance(a, Action) and (a.step, a.events, a.resumed) == ("record commit", (lc.Event.COMMIT,), False)
    s = begin(s, a)                      # persisted running, then the process died
    b = next_action(s)
    assert isinstance(b, Action) and (b.step, b.resumed) == ("record commit", True)
    s = finish(begin(s, b), b)
    assert s.record("record commit") == s.records[0] and s.records[0].attempts == 2


def test_an_undo_records_its_events_only_if_the_step_had_recorded_its_own() -> None:
    wf = Workflow(Kind.PLANNED_FAILOVER, P, S, (
        Step("begin", Op.RECORD, events=(lc.Event.PLANNED_FAILOVER_STARTED,),
             undo=Undo("end", Op.RECORD, events=(lc.Event.FAILOVER_FAILED,))),))
    s = RunState.start(wf)
    a = next_action(s)
    assert isinstance(a, Action)
    s = fail(begin(s, a), a, "database gone")
    u = next_action(s)
    assert isinstance(u, Action) and u.kind is ActionKind.UNDO and u.events == ()


def test_describe_lists_every_step_with_its_policy() -> None:
    text = describe(workflow(Kind.UNPLANNED_FAILOVER, FailoverOptions(shutdown_and_sync=True)))
    assert text.splitlines()[0] == "unplanned_failover (primary -> secondary)"
    assert " 2. try to shut down the source VM [primary]  (optional; undo: start the source VM if it answers)" in text
    assert "records failover_completed" in text


def test_a_persisted_run_state_round_trips_and_a_foreign_one_is_refused() -> None:
    wf = workflow(Kind.TEST_FAILOVER, FailoverOptions(network=TestNetwork.EXISTING, network_name="lab", notes="n"))
    s = RunState.start(wf)
    a = next_action(s)
    assert isinstance(a, Action)
    s = request_cancel(fail(begin(s, a), a, "boom"))
    d = json.loads(json.dumps(s.to_json()))
    assert RunState.from_json(d) == s
    d["steps"] = d["steps"][:-1]
    with pytest.raises(BadInput, match="not this version's"):
        RunState.from_json(d)


def test_the_recovery_page_lists_every_workflow_as_defined() -> None:
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "recovery.md").read_text()
    for kind in Kind:
        assert describe(workflow(kind, FailoverOptions(shutdown_and_sync=True))) in page, kind
