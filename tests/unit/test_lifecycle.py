"""The replicated item's lifecycle: every (state, event) pair against a golden table.

tests/golden/lifecycle/transitions.yaml lists the allowed transitions and the context
facts each needs; every pair is checked under every combination of those facts, and
everything the table does not allow must be refused with a message that names the VM,
the event and the state. Then guard cases, the helpers, and Hypothesis runs of random
event sequences for the "never running on both sites" invariant.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.domain import lifecycle
from standby.domain.lifecycle import (
    INITIAL_STATE,
    ONE_STEP_HANDOVERS,
    SWITCHING_STATES,
    TRANSITIONS,
    Event,
    Health,
    ItemContext,
    Site,
    State,
    TransitionRefused,
    allowed_events,
    can_be_removed,
    health,
    health_reason,
    invariant_holds,
    is_replicating,
    is_switching,
    is_terminal,
    label,
    may_prune_recovery_points,
    may_run_on_primary,
    may_run_on_secondary,
    mermaid_diagram,
    replicates_to,
    runs_on,
    step_invariant_holds,
    transition,
)
from standby.errors import Refused

GOLDEN = yaml.safe_load(
    (Path(__file__).parents[1] / "golden" / "lifecycle" / "transitions.yaml").read_text())
FACTS: list[str] = GOLDEN["facts"]
GUARD_REASONS: dict[str, dict[bool, str]] = GOLDEN["guard_reasons"]
VM = "web01"


def _rows(spec: Any) -> list[tuple[State, dict[str, bool]]]:
    if isinstance(spec, str):
        return [(State(spec), {})]
    if isinstance(spec, dict):
        return [(State(spec["to"]), dict(spec.get("requires", {})))]
    return [row for item in spec for row in _rows(item)]


EXPECTED: dict[tuple[State, Event], list[tuple[State, dict[str, bool]]]] = {
    (State(s), Event(e)): _rows(spec)
    for s, row in GOLDEN["transitions"].items() for e, spec in row.items()
}

ALL_CONTEXTS = [
    ItemContext(vm=VM, **dict(zip(FACTS, values, strict=True)))
    for values in itertools.product([False, True], repeat=len(FACTS))
]

# Words the refusal must use for each event (the part before the reason), so that a
# message always says which operation was refused.
EVENT_WORDS: dict[Event, str] = {
    Event.ENABLE_PROTECTION: "enable protection",
    Event.INITIAL_REPLICATION_STARTED: "start the initial replication",
    Event.INITIAL_REPLICATION_COMPLETED: "complete the initial replication",
    Event.INITIAL_REPLICATION_FAILED: "failed initial replication",
    Event.CYCLE_FAILED_NEEDS_RESYNC: "needing resynchronization",
    Event.RESYNC_STARTED: "start resynchronizing",
    Event.RESYNC_COMPLETED: "complete the resynchronization",
    Event.PAUSE: "pause replication",
    Event.RESUME: "resume replication",
    Event.TEST_FAILOVER_STARTED: "start a test failover",
    Event.TEST_FAILOVER_CLEANED_UP: "clean up the test failover",
    Event.PLANNED_FAILOVER_STARTED: "start a planned failover",
    Event.UNPLANNED_FAILOVER_STARTED: "start an unplanned failover",
    Event.FAILOVER_COMPLETED: "complete the failover",
    Event.FAILOVER_FAILED: "failed failover",
    Event.COMMIT: "commit the failover",
    Event.CANCEL_FAILOVER: "cancel the failover",
    Event.REVERSE_REPLICATION_STARTED: "start reverse replication",
    Event.REVERSE_REPLICATION_COMPLETED: "complete the reverse replication",
    Event.FAILBACK_STARTED: "start a failback",
    Event.FAILBACK_COMPLETED: "complete the failback",
    Event.FAILBACK_FAILED: "failed failback",
    Event.DISABLE_PROTECTION: "disable protection",
    Event.ERROR_RAISED: "in error",
    Event.ERROR_CLEARED: "clear the error",
}


def _applies(requires: dict[str, bool], ctx: ItemContext) -> bool:
    return all(getattr(ctx, fact) is value for fact, value in requires.items())


# ---- the golden table itself ----------------------------------------------------

def test_golden_names_only_known_states_events_and_facts() -> None:
    assert set(GOLDEN["transitions"]) == {s.value for s in State}
    assert set(FACTS) == {f for f in ItemContext.__dataclass_fields__ if f != "vm"}
    for (_s, _e), rows in EXPECTED.items():
        for _to, requires in rows:
            assert set(requires) <= set(FACTS)
    for fact, reasons in GUARD_REASONS.items():
        assert fact in FACTS and set(reasons) <= {True, False}


def test_golden_rows_of_a_pair_never_overlap() -> None:
    for pair, rows in EXPECTED.items():
        for ctx in ALL_CONTEXTS:
            assert sum(_applies(req, ctx) for _to, req in rows) <= 1, pair


def test_allowed_pairs_are_exactly_the_golden_ones() -> None:
    assert set(TRANSITIONS) == set(EXPECTED)
    assert len(EXPECTED) == 70


def test_every_event_is_allowed_somewhere_and_every_state_has_a_way_out() -> None:
    assert {e for _s, e in EXPECTED} == set(Event)
    assert {s for s, _e in EXPECTED} == set(State)


# ---- every (state, event) pair, under every context -------------------------------

@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)),
                         ids=lambda v: str(v))
def test_pair(state: State, event: Event) -> None:
    rows = EXPECTED.get((state, event), [])
    for ctx in ALL_CONTEXTS:
        matching = [to for to, req in rows if _applies(req, ctx)]
        if matching:
            assert transition(state, event, ctx) is matching[0], ctx
            assert event in allowed_events(state, ctx)
            continue
        with pytest.raises(TransitionRefused) as info:
            transition(state, event, ctx)
        exc = info.value
        assert isinstance(exc, Refused) and exc.exit_code == 1 and exc.http_status == 409
        assert (exc.state, exc.event, exc.vm) == (state, event, VM)
        msg = str(exc)
        action, _, rest = msg.partition(": ")
        assert action.startswith("cannot ") and f"VM {VM}" in action
        assert EVENT_WORDS[event] in action, msg
        assert msg.endswith(f"(state: {label(state)})"), msg
        assert exc.reason and exc.reason in rest
        assert event not in allowed_events(state, ctx)
        assert exc.fields["allowed"] == [str(e) for e in allowed_events(state, ctx)]
        if rows:  # refused by a guard: the reason names an unmet requirement
            unmet = {GUARD_REASONS[f][v] for _to, req in rows for f, v in req.items()
                     if getattr(ctx, f) is not v}
            assert any(reason in msg for reason in unmet), msg


def test_event_words_identify_the_event() -> None:
    actions = {}
    for event in Event:
        with pytest.raises(TransitionRefused) as info:
            transition(State.DISABLED if event is not Event.ENABLE_PROTECTION else State.READY,
                       event, ItemContext(vm=VM))
        actions[event] = str(info.value).partition(": ")[0]
    assert len(set(actions.values())) == len(Event)
    for event, action in actions.items():
        assert [e for e in Event if EVENT_WORDS[e] in action] == [event], action


# ---- guard cases and messages ------------------------------------------------------

READY_TO_FAIL_OVER = ItemContext(vm=VM, initial_replication_complete=True, has_recovery_point=True)


def refusal(state: State, event: Event, ctx: ItemContext) -> str:
    with pytest.raises(TransitionRefused) as info:
        transition(state, event, ctx)
    return str(info.value)


def test_planned_failover_refused_until_initial_replication_is_complete() -> None:
    assert refusal(State.INITIAL_REPLICATION, Event.PLANNED_FAILOVER_STARTED, ItemContext(vm=VM)) == (
        "cannot start a planned failover of VM web01: initial replication is not complete"
        " (state: initial replication in progress)")
    assert refusal(State.PROTECTED, Event.PLANNED_FAILOVER_STARTED,
                   replace(READY_TO_FAIL_OVER, initial_replication_complete=False)) == (
        "cannot start a planned failover of VM web01: initial replication is not complete"
        " (state: protected)")
    assert transition(State.PROTECTED, Event.PLANNED_FAILOVER_STARTED,
                      READY_TO_FAIL_OVER) is State.FAILOVER_IN_PROGRESS


def test_planned_failover_needs_healthy_replication_but_unplanned_does_not() -> None:
    for state in (State.RESYNC_REQUIRED, State.RESYNCHRONIZING, State.PAUSED, State.ERROR):
        msg = refusal(state, Event.PLANNED_FAILOVER_STARTED, READY_TO_FAIL_OVER)
        assert "unplanned failover" in msg, msg
        assert transition(state, Event.UNPLANNED_FAILOVER_STARTED,
                          READY_TO_FAIL_OVER) is State.FAILOVER_IN_PROGRESS


def test_one_test_failover_per_vm_at_a_time() -> None:
    assert refusal(State.TEST_FAILOVER, Event.TEST_FAILOVER_STARTED,
                   replace(READY_TO_FAIL_OVER, test_failover_active=True)) == (
        "cannot start a test failover of VM web01: a test failover is already in progress"
        " (one test failover per VM at a time) (state: test failover in progress)")
    # a test left over from before a resync still counts
    lingering = replace(READY_TO_FAIL_OVER, test_failover_active=True)
    assert refusal(State.PROTECTED, Event.TEST_FAILOVER_STARTED, lingering) == (
        "cannot start a test failover of VM web01: a test failover still exists"
        " (clean it up first) (state: protected)")
    assert transition(State.PROTECTED, Event.TEST_FAILOVER_CLEANED_UP, lingering) is State.PROTECTED
    assert transition(State.PROTECTED, Event.TEST_FAILOVER_STARTED,
                      READY_TO_FAIL_OVER) is State.TEST_FAILOVER


def test_a_test_failover_needs_a_recovery_point() -> None:
    msg = refusal(State.PROTECTED, Event.TEST_FAILOVER_STARTED,
                  replace(READY_TO_FAIL_OVER, has_recovery_point=False))
    assert "no complete recovery point" in msg


def test_unplanned_failover_needs_a_recovery_point() -> None:
    for state in (State.PROTECTED, State.ERROR, State.PAUSED):
        msg = refusal(state, Event.UNPLANNED_FAILOVER_STARTED, ItemContext(vm=VM))
        assert msg == ("cannot start an unplanned failover of VM web01: the secondary holds no"
                       f" complete recovery point (state: {label(state)})")


def test_nothing_to_fail_over_before_initial_replication() -> None:
    assert refusal(State.READY, Event.UNPLANNED_FAILOVER_STARTED, READY_TO_FAIL_OVER) == (
        "cannot start an unplanned failover of VM web01: initial replication has not started"
        " (state: ready)")


def test_disable_and_planned_failover_refused_while_a_test_exists() -> None:
    with_test = replace(READY_TO_FAIL_OVER, test_failover_active=True)
    for state, event in [(State.PROTECTED, Event.PLANNED_FAILOVER_STARTED),
                         (State.PROTECTED, Event.DISABLE_PROTECTION),
                         (State.ERROR, Event.DISABLE_PROTECTION),
                         (State.TEST_FAILOVER, Event.DISABLE_PROTECTION),
                         (State.TEST_FAILOVER, Event.PLANNED_FAILOVER_STARTED)]:
        assert "clean it up first" in refusal(state, event, with_test)


def test_failback_needs_reverse_replication_in_sync() -> None:
    assert refusal(State.REVERSE_REPLICATING, Event.FAILBACK_STARTED, READY_TO_FAIL_OVER) == (
        "cannot start a failback of VM web01: reverse replication has not completed"
        " (the primary holds no complete copy yet) (state: reverse replicating)")
    assert transition(State.REVERSE_REPLICATING, Event.FAILBACK_STARTED,
                      replace(READY_TO_FAIL_OVER, reverse_in_sync=True)) is State.FAILBACK_IN_PROGRESS
    assert refusal(State.FAILED_OVER, Event.FAILBACK_STARTED, READY_TO_FAIL_OVER) == (
        "cannot start a failback of VM web01: start reverse replication first (state: failed over)")


def test_resume_and_error_cleared_go_back_to_where_replication_stands() -> None:
    for state, event in [(State.PAUSED, Event.RESUME), (State.ERROR, Event.ERROR_CLEARED)]:
        assert transition(state, event, READY_TO_FAIL_OVER) is State.PROTECTED
        assert transition(state, event, ItemContext()) is State.READY


def test_commit_and_reverse_replication_order() -> None:
    assert refusal(State.COMMIT_PENDING, Event.REVERSE_REPLICATION_STARTED, ItemContext(vm=VM)) == (
        "cannot start reverse replication of VM web01: commit the failover first (state: commit pending)")
    assert refusal(State.PROTECTED, Event.COMMIT, ItemContext(vm=VM)) == (
        "cannot commit the failover of VM web01: no failover is waiting to be committed (state: protected)")


def test_unnamed_vm_and_string_arguments() -> None:
    assert transition("ready", "initial_replication_started") is State.INITIAL_REPLICATION  # type: ignore[arg-type]
    with pytest.raises(TransitionRefused, match=r"^cannot resume replication of the VM: "):
        transition(State.PROTECTED, Event.RESUME)
    with pytest.raises(ValueError):
        transition(State.PROTECTED, "reboot")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        transition("sleeping", Event.PAUSE)  # type: ignore[arg-type]


# ---- the helpers -----------------------------------------------------------------

def test_state_and_event_values_are_snake_case() -> None:
    for value in [*State, *Event]:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", value.value), value
    assert len(State) == 14 and len(Event) == 25


def test_replicating_states() -> None:
    assert {s for s in State if is_replicating(s)} == {
        State.INITIAL_REPLICATION, State.PROTECTED, State.RESYNCHRONIZING,
        State.TEST_FAILOVER, State.REVERSE_REPLICATING}
    assert replicates_to(State.PROTECTED) is Site.SECONDARY
    assert replicates_to(State.REVERSE_REPLICATING) is Site.PRIMARY


def test_health_of_each_state() -> None:
    expected = {
        State.READY: Health.WARNING, State.INITIAL_REPLICATION: Health.NORMAL,
        State.PROTECTED: Health.NORMAL, State.RESYNC_REQUIRED: Health.CRITICAL,
        State.RESYNCHRONIZING: Health.WARNING, State.PAUSED: Health.WARNING,
        State.TEST_FAILOVER: Health.NORMAL, State.FAILOVER_IN_PROGRESS: Health.WARNING,
        State.COMMIT_PENDING: Health.WARNING, State.FAILED_OVER: Health.WARNING,
        State.REVERSE_REPLICATING: Health.NORMAL, State.FAILBACK_IN_PROGRESS: Health.WARNING,
        State.DISABLED: Health.NORMAL, State.ERROR: Health.CRITICAL,
    }
    assert {s: health(s) for s in State} == expected
    assert all(health_reason(s) for s in State)
    assert len({label(s) for s in State}) == len(State)


def test_where_the_production_vm_may_run() -> None:
    assert {s for s in State if may_run_on_secondary(s)} == {
        State.FAILOVER_IN_PROGRESS, State.COMMIT_PENDING, State.FAILED_OVER,
        State.REVERSE_REPLICATING, State.FAILBACK_IN_PROGRESS}
    assert {s for s in State if not may_run_on_primary(s)} == {
        State.COMMIT_PENDING, State.FAILED_OVER, State.REVERSE_REPLICATING, State.DISABLED}
    assert {s for s in State if is_switching(s)} == set(SWITCHING_STATES) == {
        State.FAILOVER_IN_PROGRESS, State.FAILBACK_IN_PROGRESS}


def test_terminal_removable_and_pruning() -> None:
    assert [s for s in State if is_terminal(s)] == [State.DISABLED]
    assert [s for s in State if can_be_removed(s)] == [State.DISABLED]
    assert INITIAL_STATE is State.READY
    assert {s for s in State if not may_prune_recovery_points(s)} == {
        State.FAILOVER_IN_PROGRESS, State.COMMIT_PENDING}


def test_allowed_events_match_transition() -> None:
    for state in State:
        for ctx in ALL_CONTEXTS:
            accepted = []
            for event in Event:
                try:
                    transition(state, event, ctx)
                except TransitionRefused:
                    continue
                accepted.append(event)
            assert list(allowed_events(state, ctx)) == accepted


def test_module_docstring_holds_the_generated_diagram() -> None:
    assert lifecycle.__doc__ is not None
    assert f"```mermaid\n{mermaid_diagram()}\n```" in lifecycle.__doc__


def test_public_names() -> None:
    assert all(hasattr(lifecycle, name) for name in lifecycle.__all__)


# ---- reachability and invariants over the table ----------------------------------

def _graph() -> dict[State, set[State]]:
    graph: dict[State, set[State]] = {s: set() for s in State}
    for (state, event), rows in EXPECTED.items():
        graph[state] |= {to for to, _req in rows}
    return graph


def _reachable(start: State) -> set[State]:
    graph, seen, todo = _graph(), {start}, deque([start])
    while todo:
        for nxt in graph[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_is_reachable_and_none_is_a_trap() -> None:
    assert _reachable(INITIAL_STATE) == set(State)
    for state in State:
        assert {State.PROTECTED, State.DISABLED} <= _reachable(state), state


def _state_ok(state: State) -> bool:
    """I1-I3 of the module docstring, restated."""
    sites, target = runs_on(state), replicates_to(state)
    if target is not None and target in sites:
        return False
    if state in SWITCHING_STATES:
        return target is None
    return len(sites) <= 1


def _step_ok(source: State, event: Event, target: State) -> bool:
    """I4: no one-step jump of production between sites, but the named handovers."""
    a, b = runs_on(source), runs_on(target)
    return not (a and b and a.isdisjoint(b)) or (source, event) in ONE_STEP_HANDOVERS


def test_invariants_hold_for_every_state_and_every_allowed_transition() -> None:
    for state in State:
        assert _state_ok(state) and invariant_holds(state), state
    for (state, event), rows in EXPECTED.items():
        for to, _req in rows:
            assert _step_ok(state, event, to) and step_invariant_holds(state, event, to)


def test_the_one_step_handovers_are_the_only_site_jumps_and_are_used() -> None:
    jumps = {(s, e) for (s, e), rows in EXPECTED.items() for to, _r in rows
             if runs_on(s) and runs_on(to) and runs_on(s).isdisjoint(runs_on(to))}
    assert jumps == set(ONE_STEP_HANDOVERS) == {(State.COMMIT_PENDING, Event.CANCEL_FAILOVER)}


def test_the_step_check_rejects_a_jump_between_sites() -> None:
    # the check can fail: protected (primary) straight to failed over (secondary) would
    assert not step_invariant_holds(State.PROTECTED, Event.COMMIT, State.FAILED_OVER)
    assert not _step_ok(State.PROTECTED, Event.COMMIT, State.FAILED_OVER)


# ---- random event sequences ------------------------------------------------------

contexts = st.builds(ItemContext, vm=st.just(VM), initial_replication_complete=st.booleans(),
                     has_recovery_point=st.booleans(), test_failover_active=st.booleans(),
                     reverse_in_sync=st.booleans())


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(State),
       steps=st.lists(st.tuples(st.sampled_from(Event), contexts), max_size=60))
def test_random_events_and_contexts_stay_in_defined_states(
        start: State, steps: list[tuple[Event, ItemContext]]) -> None:
    state = start
    for event, ctx in steps:
        try:
            nxt = transition(state, event, ctx)
        except TransitionRefused as exc:
            assert exc.state is state and exc.event is event
            assert event not in allowed_events(state, ctx)
            continue
        assert isinstance(nxt, State) and nxt in set(State)
        assert any(to is nxt for to, _r in EXPECTED[(state, event)])
        assert _state_ok(nxt) and _step_ok(state, event, nxt)
        state = nxt


class World:
    """The facts a real item would have, advanced by the events that change them."""

    def __init__(self) -> None:
        self.ctx = ItemContext(vm=VM)
        self.production: Site | None = Site.PRIMARY  # where production last ran settled

    def apply(self, event: Event) -> None:
        c = self.ctx
        if event is Event.INITIAL_REPLICATION_COMPLETED:
            c = replace(c, initial_replication_complete=True, has_recovery_point=True)
        elif event is Event.TEST_FAILOVER_STARTED:
            c = replace(c, test_failover_active=True)
        elif event is Event.TEST_FAILOVER_CLEANED_UP:
            c = replace(c, test_failover_active=False)
        elif event is Event.REVERSE_REPLICATION_STARTED:
            c = replace(c, reverse_in_sync=False)
        elif event is Event.REVERSE_REPLICATION_COMPLETED:
            c = replace(c, reverse_in_sync=True)
        elif event is Event.ENABLE_PROTECTION:  # a new protection, from where the VM runs
            c = ItemContext(vm=VM)
        self.ctx = c


# Each step is either any event (mostly refused) or one of the events allowed now,
# picked by index, so that sequences get deep into the failover family.
choices = st.one_of(st.sampled_from(Event), st.integers(min_value=0, max_value=50))


@settings(max_examples=400, deadline=None)
@given(picks=st.lists(choices, max_size=80))
def test_random_operations_never_run_the_vm_on_both_sites(picks: list[Event | int]) -> None:
    world, state = World(), INITIAL_STATE
    initial_done = False
    for pick in picks:
        if isinstance(pick, Event):
            event = pick
        else:
            allowed = allowed_events(state, world.ctx)
            assert allowed, state  # no state is a dead end
            event = allowed[pick % len(allowed)]
        test_before = world.ctx.test_failover_active
        try:
            nxt = transition(state, event, world.ctx)
        except TransitionRefused:
            continue
        # one test failover per VM at a time
        if event is Event.TEST_FAILOVER_STARTED:
            assert not test_before
        # planned failover refused until initial replication has completed
        if event is Event.PLANNED_FAILOVER_STARTED:
            assert initial_done and not test_before
        if event is Event.INITIAL_REPLICATION_COMPLETED:
            initial_done = True
        if event is Event.ENABLE_PROTECTION:
            initial_done = False
        world.apply(event)
        # replication never writes to where production may run; one site at a time
        assert _state_ok(nxt)
        sites = runs_on(nxt)
        if nxt not in SWITCHING_STATES and sites:
            (site,) = sites
            if world.production is not None and site is not world.production:
                # production moved: only through a switching state or a named handover
                assert state in SWITCHING_STATES or (state, event) in ONE_STEP_HANDOVERS, (
                    state, event, nxt)
            world.production = site
        elif not sites:  # disabled: re-enabling re-homes the item where its VM runs
            world.production = None
        if is_replicating(nxt):
            assert replicates_to(nxt) not in runs_on(nxt)
        state = nxt
