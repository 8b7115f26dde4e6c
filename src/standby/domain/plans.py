"""Recovery plans: ordered groups of VMs, their scripts and manual actions. Pure.

A plan fails a whole application over in order (the reference's recovery plans, without
their limits of 7 groups and 100 VMs: here there is no fixed limit):

- groups run one after the other; the VMs of a group fail over in parallel;
- each group may have pre scripts (before its VMs fail over) and post scripts (after),
  each run with a timeout (default 600 s) and failing its step on a non-zero exit
  (`orchestration/scripts.py`); the reference also fails a script that writes to
  stderr, Standby does not (tools log there);
- each group may have manual actions: instructions shown to the operator, per failover
  type, after the group's post scripts; the plan waits until the operator confirms them
  (CLI or API);
- a planned failover first shuts down the source VMs of every group, the last group
  first (the front ends stop before the databases they write to), so that no part of
  the application keeps running on the primary once a group has moved; then groups in
  order. Each VM's own planned failover still shuts down its source and syncs the last
  changes (`domain/failover.py`): finding the VM off is then a no-op;
- a VM may belong to several plans; a VM already failed over (or, for a test failover,
  already under test) is skipped, and named as skipped;
- error policy: a planned failover stops at the first failed step (what already moved
  stays moved: an operator looks before going on); an unplanned failover goes on
  through errors and reports them all at the end (the primary is gone: bring up what
  can be); a test failover goes on too (test VMs are isolated, and a drill should find
  every fault in one run).

`load_plan(data)` validates a plan as read from YAML or JSON (`PlanError` lists every
problem with its field path: a VM in two groups, an empty group, a bad timeout...),
`expand(plan, type)` gives the plan's steps, `dry_run(plan, type)` renders them, and
`next_plan_step` is the pure runner decision over persisted step statuses.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, \
    model_validator

from standby.domain.failover import Kind
from standby.domain.fabric import Name
from standby.errors import BadInput

__all__ = [
    "DEFAULT_SCRIPT_TIMEOUT",
    "ErrorPolicy",
    "Group",
    "ManualAction",
    "PlanDone",
    "PlanError",
    "PlanFailoverType",
    "PlanStep",
    "PlanStepStatus",
    "RecoveryPlan",
    "Script",
    "StepKind",
    "dry_run",
    "error_policy",
    "expand",
    "load_plan",
    "next_plan_step",
    "plan_json_schema",
]

DEFAULT_SCRIPT_TIMEOUT = 600.0
MAX_SCRIPT_TIMEOUT = 86400.0


class PlanFailoverType(StrEnum):
    TEST = "test"
    PLANNED = "planned"
    UNPLANNED = "unplanned"

    @property
    def workflow_kind(self) -> Kind:
        return {PlanFailoverType.TEST: Kind.TEST_FAILOVER, PlanFailoverType.PLANNED: Kind.PLANNED_FAILOVER,
                PlanFailoverType.UNPLANNED: Kind.UNPLANNED_FAILOVER}[self]


class ErrorPolicy(StrEnum):
    STOP_AT_FIRST_ERROR = "stop at the first error"
    CONTINUE_AND_REPORT = "continue and report errors"


def error_policy(ftype: PlanFailoverType | str) -> ErrorPolicy:
    return (ErrorPolicy.STOP_AT_FIRST_ERROR if PlanFailoverType(ftype) is PlanFailoverType.PLANNED
            else ErrorPolicy.CONTINUE_AND_REPORT)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]


class Script(_Model):
    """A group's pre or post script. `path` is absolute, or relative to the control
    plane's scripts directory (no `..`: a plan cannot reach outside it)."""

    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(default_factory=list)
    timeout_seconds: float = DEFAULT_SCRIPT_TIMEOUT

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if "\0" in v or ".." in PurePosixPath(v).parts:
            raise ValueError("a script path may not contain '..' or NUL")
        return v

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        if any("\0" in a for a in v):
            raise ValueError("an argument may not contain NUL")
        return v

    @field_validator("timeout_seconds")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= MAX_SCRIPT_TIMEOUT):
            raise ValueError(f"the timeout must be more than 0 and at most {MAX_SCRIPT_TIMEOUT:.0f} seconds")
        return v

    def label(self) -> str:
        args = "".join(f" {a}" if a and " " not in a else f" {a!r}" for a in self.args)
        return f"{self.path}{args} (timeout {self.timeout_seconds:g} s)"


class ManualAction(_Model):
    """Instructions for the operator; the plan waits for a confirmation. `failover_types`
    says in which failovers it appears (default: all)."""

    text: Text
    failover_types: list[PlanFailoverType] = Field(default_factory=lambda: list(PlanFailoverType), min_length=1)

    @field_validator("failover_types")
    @classmethod
    def _unique(cls, v: list[PlanFailoverType]) -> list[PlanFailoverType]:
        if len(set(v)) != len(v):
            raise ValueError("a failover type is listed twice")
        return v


class Group(_Model):
    name: Name | None = None
    vms: list[Name] = Field(min_length=1)
    pre: list[Script] = Field(default_factory=list)
    post: list[Script] = Field(default_factory=list)
    manual_actions: list[ManualAction] = Field(default_factory=list)


class RecoveryPlan(_Model):
    name: Name
    description: str = ""
    groups: list[Group] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RecoveryPlan:
        problems = _duplicates([(g.name, list(g.vms)) for g in self.groups])
        if problems:
            raise _Problems(problems)
        return self

    def group_name(self, index: int) -> str:
        return self.groups[index].name or f"group {index + 1}"

    @property
    def vms(self) -> list[str]:
        return [vm for g in self.groups for vm in g.vms]


def _duplicates(groups: list[tuple[Any, Any]]) -> list[tuple[tuple[Any, ...], str]]:
    """A VM in two places of a plan, a group name used twice (also run on the raw data of
    a plan with other problems, so that every problem is reported at once)."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    where: dict[str, int] = {}
    names: dict[str, int] = {}

    def called(g: int) -> str:
        name = groups[g][0]
        return f"groups.{g}" + (f" ({name})" if isinstance(name, str) else "")

    for g, (name, vms) in enumerate(groups):
        if isinstance(name, str):
            if name in names:
                problems.append((("groups", g, "name"), f"group name {name} is already used by {called(names[name])}"))
            names.setdefault(name, g)
        for v, vm in enumerate(vms if isinstance(vms, list) else []):
            if not isinstance(vm, str):
                continue
            if vm in where:
                same = "this group" if where[vm] == g else called(where[vm])
                problems.append((("groups", g, "vms", v), f"VM {vm} is already in {same} (a VM is in one group "
                                                          "of a plan)"))
            else:
                where[vm] = g
    return problems


class _Problems(ValueError):
    def __init__(self, problems: list[tuple[tuple[Any, ...], str]]) -> None:
        super().__init__("; ".join(m for _l, m in problems))
        self.problems = problems


class PlanError(BadInput):
    """A recovery plan is invalid; `problems` holds one line per fault, naming the field."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recovery plan {name}: invalid\n{lines}", details={"problems": problems})


def _order(problem: str) -> list[Any]:
    """Problems in the order of the fields (list indexes compared as numbers)."""
    path = problem.split(": ", 1)[0]
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_plan(data: Mapping[str, Any]) -> RecoveryPlan:
    """Validate a plan read from YAML or JSON; `PlanError` lists every problem by field."""
    name = str(data.get("name") or "(unnamed)") if isinstance(data, Mapping) else "(unnamed)"
    try:
        return RecoveryPlan.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        groups = data.get("groups") if isinstance(data, Mapping) else None
        if isinstance(groups, list):
            raw = [(g.get("name"), g.get("vms")) if isinstance(g, Mapping) else (None, None) for g in groups]
            problems.extend(f"{_loc(loc)}: {msg}" for loc, msg in _duplicates(raw))
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _Problems):
                continue  # found on the raw data above
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "too_short" and err["loc"] and err["loc"][-1] == "vms":
                msg = "a group needs at least one VM"
            elif err["type"] == "too_short" and err["loc"] == ("groups",):
                msg = "a plan needs at least one group"
            problems.append(f"{_loc(err['loc'])}: {msg}")
        raise PlanError(name, sorted(problems, key=_order)) from None


def plan_json_schema() -> dict[str, Any]:
    """The JSON schema of a plan (for the API and editors)."""
    return RecoveryPlan.model_json_schema()


# ---- expansion ------------------------------------------------------------------------

class StepKind(StrEnum):
    SHUTDOWN = "shutdown"
    PRE_SCRIPT = "pre_script"
    FAILOVER = "failover"
    POST_SCRIPT = "post_script"
    MANUAL_ACTION = "manual_action"


@dataclass(frozen=True)
class PlanStep:
    number: int                      # 1-based, in run order
    kind: StepKind
    group: int                       # 1-based group number
    group_name: str
    failover_type: PlanFailoverType
    vms: tuple[str, ...] = ()        # the VMs this step acts on (FAILOVER, SHUTDOWN); for scripts, the group's
    skipped: tuple[str, ...] = ()    # VMs of the group left out (already failed over / under test)
    script: Script | None = None
    text: str | None = None          # a manual action's instructions

    @property
    def waits_for_operator(self) -> bool:
        return self.kind is StepKind.MANUAL_ACTION

    def label(self) -> str:
        where = f"group {self.group}" + (f" ({self.group_name})" if self.group_name != f"group {self.group}" else "")
        skipped = f"; skipped, already {_ALREADY[self.failover_type]}: {', '.join(self.skipped)}" \
            if self.skipped else ""
        if self.kind is StepKind.SHUTDOWN:
            what = f"shut down {', '.join(self.vms) or 'nothing'} on the primary"
        elif self.kind is StepKind.FAILOVER:
            what = (f"{self.failover_type} failover of {', '.join(self.vms)}" if self.vms
                    else f"{self.failover_type} failover of no VM")
            what += " in parallel" if len(self.vms) > 1 else ""
        elif self.kind in (StepKind.PRE_SCRIPT, StepKind.POST_SCRIPT):
            assert self.script is not None
            what = f"{'pre' if self.kind is StepKind.PRE_SCRIPT else 'post'} script {self.script.label()}"
        else:
            what = f"manual action, wait for confirmation: {self.text}"
        return f"{where}: {what}{skipped}"

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "kind": self.kind.value, "group": self.group, "group_name": self.group_name,
                "failover_type": self.failover_type.value, "vms": list(self.vms), "skipped": list(self.skipped),
                "script": self.script.model_dump(mode="json") if self.script else None, "text": self.text,
                "label": self.label()}


_ALREADY = {PlanFailoverType.TEST: "under test", PlanFailoverType.PLANNED: "failed over",
            PlanFailoverType.UNPLANNED: "failed over"}


def expand(plan: RecoveryPlan, failover_type: PlanFailoverType | str, *,
           skip: Collection[str] = ()) -> list[PlanStep]:
    """The plan's steps for this failover type, in run order. `skip`: VMs already failed
    over (for a test failover: already under test); they are named, not acted on."""
    ftype = PlanFailoverType(failover_type)
    skip = set(skip)
    raw: list[tuple[StepKind, int, dict[str, Any]]] = []

    def split(g: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        vms = plan.groups[g].vms
        return tuple(v for v in vms if v not in skip), tuple(v for v in vms if v in skip)

    if ftype is PlanFailoverType.PLANNED:
        for g in reversed(range(len(plan.groups))):
            act, skipped = split(g)
            raw.append((StepKind.SHUTDOWN, g, {"vms": act, "skipped": skipped}))
    for g, group in enumerate(plan.groups):
        act, skipped = split(g)
        raw.extend((StepKind.PRE_SCRIPT, g, {"script": s, "vms": act}) for s in group.pre)
        raw.append((StepKind.FAILOVER, g, {"vms": act, "skipped": skipped}))
        raw.extend((StepKind.POST_SCRIPT, g, {"script": s, "vms": act}) for s in group.post)
        raw.extend((StepKind.MANUAL_ACTION, g, {"text": m.text, "vms": act})
                   for m in group.manual_actions if ftype in m.failover_types)
    return [PlanStep(n, kind, g + 1, plan.group_name(g), ftype, **kw) for n, (kind, g, kw) in enumerate(raw, 1)]


def dry_run(plan: RecoveryPlan, failover_type: PlanFailoverType | str, *, skip: Collection[str] = ()) -> str:
    """The steps a run would take, one a line, with the error policy."""
    ftype = PlanFailoverType(failover_type)
    steps = expand(plan, ftype, skip=skip)
    vms = len(plan.vms)
    head = (f"recovery plan {plan.name}: {ftype} failover, {len(plan.groups)} group(s), {vms} VM(s); "
            f"on error: {error_policy(ftype)}")
    width = len(str(len(steps)))
    return "\n".join([head, *(f"{s.number:>{width}}. {s.label()}" for s in steps)]) + "\n"


# ---- the plan runner's decision ---------------------------------------------------------

class PlanStepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"          # started; after a control-plane restart: resumed
    WAITING = "waiting"          # a manual action waiting for the operator's confirmation
    DONE = "done"
    FAILED = "failed"            # a script failed, or at least one VM of a failover step


@dataclass(frozen=True)
class PlanDone:
    ok: bool
    message: str
    failed: tuple[int, ...] = ()          # numbers of the failed steps
    not_run: tuple[int, ...] = ()         # steps never run (planned: after the first error)


def next_plan_step(steps: Sequence[PlanStep], statuses: Sequence[PlanStepStatus]) -> PlanStep | PlanDone:
    """The step to run (or resume, or keep waiting on) next, or how the run ended.

    Steps run one at a time (a failover step runs its VMs in parallel itself). The error
    policy of the failover type decides what a failed step means."""
    if len(steps) != len(statuses):
        raise ValueError("one status per step")
    failed: list[int] = []
    for step, status in zip(steps, statuses, strict=True):
        if status is PlanStepStatus.DONE:
            continue
        if status is PlanStepStatus.FAILED:
            failed.append(step.number)
            if error_policy(step.failover_type) is ErrorPolicy.STOP_AT_FIRST_ERROR:
                rest = tuple(s.number for s, st in zip(steps, statuses, strict=True)
                             if s.number > step.number and st is not PlanStepStatus.DONE)
                return PlanDone(False, f"stopped at step {step.number} ({step.label()}): "
                                       f"a {step.failover_type} failover stops at the first error",
                                tuple(failed), rest)
            continue
        return step
    if failed:
        return PlanDone(False, f"completed with errors in step(s) {', '.join(map(str, failed))}", tuple(failed))
    return PlanDone(True, "completed")
