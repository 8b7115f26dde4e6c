"""Recovery plans (domain/plans.py): expansion, error policy, the runner's decision.
Golden plans and their dry runs are in tests/golden/plans/."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.domain.failover import Kind
from standby.domain.plans import (
    DEFAULT_SCRIPT_TIMEOUT,
    ErrorPolicy,
    PlanDone,
    PlanError,
    PlanFailoverType,
    PlanStep,
    PlanStepStatus,
    StepKind,
    error_policy,
    expand,
    load_plan,
    next_plan_step,
    plan_json_schema,
)

T = PlanFailoverType
PS = PlanStepStatus

PLAN = {
    "name": "erp",
    "groups": [
        {"name": "db", "vms": ["db01"], "pre": [{"path": "pre.sh"}], "post": [{"path": "post.sh"}],
         "manual_actions": [{"text": "check the database", "failover_types": ["planned"]}]},
        {"name": "web", "vms": ["web01", "web02"]},
    ],
}


def kinds(steps: list[PlanStep]) -> list[tuple[StepKind, int]]:
    return [(s.kind, s.group) for s in steps]


def test_planned_shuts_down_every_group_last_first_then_runs_groups_in_order() -> None:
    steps = expand(load_plan(PLAN), T.PLANNED)
    assert kinds(steps) == [
        (StepKind.SHUTDOWN, 2), (StepKind.SHUTDOWN, 1),
        (StepKind.PRE_SCRIPT, 1), (StepKind.FAILOVER, 1), (StepKind.POST_SCRIPT, 1), (StepKind.MANUAL_ACTION, 1),
        (StepKind.FAILOVER, 2),
    ]
    assert [s.number for s in steps] == list(range(1, 8))
    assert steps[-1].vms == ("web01", "web02")
    assert steps[5].waits_for_operator and steps[5].text == "check the database"
    assert steps[2].script is not None and steps[2].script.timeout_seconds == DEFAULT_SCRIPT_TIMEOUT == 600
    assert steps[2].vms == ("db01",)   # scripts get the group's VMs (STANDBY_VMS)


def test_manual_actions_appear_only_in_their_failover_types() -> None:
    plan = load_plan(PLAN)
    assert StepKind.MANUAL_ACTION not in {s.kind for s in expand(plan, T.UNPLANNED)}
    assert StepKind.MANUAL_ACTION not in {s.kind for s in expand(plan, "test")}
    assert StepKind.SHUTDOWN not in {s.kind for s in expand(plan, T.UNPLANNED)}


def test_no_fixed_limit_on_groups_or_vms() -> None:
    groups = [{"vms": [f"vm{g}-{v}" for v in range(20)]} for g in range(50)]
    steps = expand(load_plan({"name": "big", "groups": groups}), T.UNPLANNED)
    assert len(steps) == 50 and sum(len(s.vms) for s in steps) == 1000


def test_error_policy_per_failover_type() -> None:
    assert error_policy(T.PLANNED) is ErrorPolicy.STOP_AT_FIRST_ERROR
    assert error_policy("unplanned") is ErrorPolicy.CONTINUE_AND_REPORT
    assert error_policy(T.TEST) is ErrorPolicy.CONTINUE_AND_REPORT
    assert [t.workflow_kind for t in T] == [Kind.TEST_FAILOVER, Kind.PLANNED_FAILOVER, Kind.UNPLANNED_FAILOVER]


def test_planned_stops_at_the_first_failed_step() -> None:
    steps = expand(load_plan(PLAN), T.PLANNED)
    st = [PS.DONE] * 4 + [PS.FAILED] + [PS.PENDING] * 2       # the post script failed
    done = next_plan_step(steps, st)
    assert isinstance(done, PlanDone) and not done.ok
    assert done.failed == (5,) and done.not_run == (6, 7)
    assert "stopped at step 5 (group 1 (db): post script post.sh" in done.message


def test_unplanned_continues_and_reports_every_failure() -> None:
    steps = expand(load_plan(PLAN), T.UNPLANNED)
    assert kinds(steps) == [(StepKind.PRE_SCRIPT, 1), (StepKind.FAILOVER, 1), (StepKind.POST_SCRIPT, 1),
                            (StepKind.FAILOVER, 2)]
    nxt = next_plan_step(steps, [PS.FAILED, PS.DONE, PS.PENDING, PS.PENDING])
    assert isinstance(nxt, PlanStep) and nxt.number == 3
    done = next_plan_step(steps, [PS.FAILED, PS.DONE, PS.FAILED, PS.DONE])
    assert isinstance(done, PlanDone) and (done.ok, done.failed) == (False, (1, 3))
    assert done.message == "completed with errors in step(s) 1, 3"
    assert next_plan_step(steps, [PS.DONE] * 4) == PlanDone(True, "completed")


def test_an_interrupted_or_waiting_step_is_the_next_one() -> None:
    steps = expand(load_plan(PLAN), T.PLANNED)
    assert next_plan_step(steps, [PS.DONE, PS.RUNNING] + [PS.PENDING] * 5) == steps[1]   # resumed
    assert next_plan_step(steps, [PS.DONE] * 5 + [PS.WAITING, PS.PENDING]) == steps[5]   # still waiting
    with pytest.raises(ValueError):
        next_plan_step(steps, [PS.DONE])


def test_skipped_vms_are_left_out_of_shutdown_and_failover() -> None:
    steps = expand(load_plan(PLAN), T.PLANNED, skip={"web02", "not-in-plan"})
    assert steps[0].vms == ("web01",) and steps[0].skipped == ("web02",)
    assert steps[-1].vms == ("web01",) and steps[-1].skipped == ("web02",)


def test_schema_and_defaults() -> None:
    schema = plan_json_schema()
    assert schema["title"] == "RecoveryPlan" and "groups" in schema["required"]
    plan = load_plan({"name": "p", "groups": [{"vms": ["a"], "manual_actions": [{"text": "x"}]}]})
    assert plan.groups[0].manual_actions[0].failover_types == list(T)
    assert plan.group_name(0) == "group 1" and plan.vms == ["a"]


def test_plan_error_is_bad_input_with_the_problems_in_details() -> None:
    with pytest.raises(PlanError) as e:
        load_plan({"name": "p", "groups": [{"vms": ["a"], "pre": [{"path": "x", "timeout_seconds": -1}]}]})
    assert e.value.http_status == 400
    assert e.value.details == {"problems": ["groups.0.pre.0.timeout_seconds: the timeout must be more than 0 "
                                            "and at most 86400 seconds"]}
    assert str(e.value).startswith("recovery plan p: invalid\n  - groups.0.pre.0.timeout_seconds")
    with pytest.raises(PlanError, match="recovery plan \\(unnamed\\)"):
        load_plan([])  # type: ignore[arg-type]


def test_the_example_on_the_recovery_page_is_a_valid_plan() -> None:
    from pathlib import Path

    import yaml

    page = (Path(__file__).parents[2] / "docs" / "recovery.md").read_text()
    block = page.split("## Recovery plans", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    plan = load_plan(yaml.safe_load(block))
    assert [s.kind for s in expand(plan, T.PLANNED)][:2] == [StepKind.SHUTDOWN, StepKind.SHUTDOWN]


# ---- properties -----------------------------------------------------------------------------

_vm = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
_script = st.fixed_dictionaries({"path": st.sampled_from(["a.sh", "/opt/b.sh"])},
                                optional={"timeout_seconds": st.floats(1, 3600)})


@st.composite
def plans(draw: st.DrawFn) -> tuple[dict[str, object], set[str]]:
    vms = draw(st.lists(_vm, min_size=1, max_size=30, unique=True))
    cuts = sorted(draw(st.sets(st.integers(1, len(vms) - 1), max_size=8))) if len(vms) > 1 else []
    bounds = [0, *cuts, len(vms)]
    groups = [{"vms": vms[a:b], "pre": draw(st.lists(_script, max_size=2)), "post": draw(st.lists(_script, max_size=2)),
               "manual_actions": draw(st.lists(st.fixed_dictionaries(
                   {"text": st.just("do it"), "failover_types": st.lists(st.sampled_from(list(T)), min_size=1,
                                                                         max_size=3, unique=True)}), max_size=2))}
              for a, b in zip(bounds, bounds[1:], strict=False)]
    skip = set(draw(st.lists(st.sampled_from(vms), max_size=len(vms))))
    return {"name": "p", "groups": groups}, skip


@settings(max_examples=200, deadline=None)
@given(plans(), st.sampled_from(list(T)))
def test_expansion_invariants(p: tuple[dict[str, object], set[str]], ftype: PlanFailoverType) -> None:
    data, skip = p
    plan = load_plan(data)
    steps = expand(plan, ftype, skip=skip)
    fo = [s for s in steps if s.kind is StepKind.FAILOVER]
    # every VM of the plan: in exactly one failover step, acted on or named as skipped
    assert sorted(v for s in fo for v in s.vms + s.skipped) == sorted(plan.vms)
    assert {v for s in fo for v in s.skipped} == skip & set(plan.vms)
    # groups run in order, one failover step each, after their pre and before their post scripts
    assert [s.group for s in fo] == list(range(1, len(plan.groups) + 1))
    for s in steps:
        f = fo[s.group - 1]
        if s.kind is StepKind.PRE_SCRIPT:
            assert s.number < f.number
        if s.kind in (StepKind.POST_SCRIPT, StepKind.MANUAL_ACTION):
            assert s.number > f.number
    assert [s.group for s in steps if s.kind is not StepKind.SHUTDOWN] == \
        sorted(s.group for s in steps if s.kind is not StepKind.SHUTDOWN)
    shut = [s for s in steps if s.kind is StepKind.SHUTDOWN]
    if ftype is PlanFailoverType.PLANNED:
        # every source VM is shut down, last group first, before any group fails over
        assert [s.group for s in shut] == list(range(len(plan.groups), 0, -1))
        assert max(s.number for s in shut) < min(s.number for s in steps if s.kind is not StepKind.SHUTDOWN)
        assert sorted(v for s in shut for v in s.vms) == sorted(set(plan.vms) - skip)
    else:
        assert not shut
    assert [s.number for s in steps] == list(range(1, len(steps) + 1))
    n_manual = sum(1 for g in data["groups"] for m in g["manual_actions"] if ftype in m["failover_types"])  # type: ignore[index,union-attr]
    assert sum(1 for s in steps if s.kind is StepKind.MANUAL_ACTION) == n_manual
