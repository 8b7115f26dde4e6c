"""Recovery plans: stored plans and the job that runs one.

    create_plan(store, {"name": "erp", "groups": [...]})        # validated by domain.plans
    job_id = run_plan(store, runner, "erp", "planned", created_by="ops")
    run_plan(store, runner, "erp", "test", dry_run=True)        # {"text": ..., "steps": [...]}
    confirm_manual_action(store, job_id, 7, by="ops")           # the plan waits on step 7

A plan job expands the plan (`domain.plans.expand`, VMs already failed over, or under
test, skipped and named) and runs its steps one at a time, each one's status persisted
in the job's payload before and after it acts (`next_plan_step` decides what runs next,
also after a control-plane restart). A failover step starts one failover job per VM
(`orchestration.failover`; they run in parallel on the runner's workers) and waits for
them all; a shutdown step (planned failover) stops the group's source VMs in parallel
(`stop_vm` tasks); pre and post scripts run with `orchestration.scripts` (timeout
600 s by default) from the scripts directory (`<data dir>/scripts` unless the run
names one); a manual action waits until an operator confirms it
(`confirm_manual_action`, recorded in the job's payload with who and when). A planned
failover stops at the first failed step; unplanned and test failovers go on and report
every failure in the job's result.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from standby.contract import StopVmParams, build_params
from standby.domain import plans as plan_rules
from standby.domain.lifecycle import State
from standby.domain.plans import PlanDone, PlanFailoverType, PlanStep, PlanStepStatus, StepKind
from standby.errors import BadInput, NotFound, Refused, RemoteError, StandbyError
from standby.orchestration import failover as fo
from standby.orchestration.protection import resolve_item
from standby.orchestration.runner import JobCancelled, JobHandler, JobRunner, RunnerStopping, Step, StepContext
from standby.orchestration.scripts import run_plan_script
from standby.store import Store
from standby.store.base import utcnow
from standby.store.models import Job, RecoveryPlan
from standby.store.repo import agents, jobs, tasks
from standby.store.repo import plans as plans_repo
from standby.store.states import JOB_TERMINAL, JobState

__all__ = [
    "PLAN_FAILOVER",
    "confirm_manual_action",
    "create_plan",
    "delete_plan",
    "get_plan",
    "handlers",
    "list_plans",
    "run_plan",
]

# A plan run this long after this control plane's promotion is the disaster's recovery:
# its RTO counts from the promotion (the declaration), else from the plan's own start.
DECLARATION_WINDOW = timedelta(hours=24)

log = logging.getLogger("standby.plans")

PLAN_FAILOVER = "plan_failover"
MANUAL_ACTION_TIMEOUT = 7 * 24 * 3600.0   # an operator may take the weekend
FAILOVER_STEP_TIMEOUT = 24 * 3600.0
STOP_TIMEOUT = 120.0

# States in which a VM counts as already failed over (a plan skips it and says so).
_FAILED_OVER = {State.FAILOVER_IN_PROGRESS, State.COMMIT_PENDING, State.FAILED_OVER, State.REVERSE_REPLICATING,
                State.FAILBACK_IN_PROGRESS}


# ---------------------------------------------------------------- plans


def _view(row: RecoveryPlan) -> dict[str, Any]:
    return {"name": row.name, "document": dict(row.document), "created_by": row.created_by,
            "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat()}


def create_plan(store: Store, document: Mapping[str, Any], *, replace: bool = False,
                created_by: str | None = None) -> dict[str, Any]:
    """Validate (`PlanError` lists every bad field) and store a plan; an existing name is
    a `Conflict` unless `replace`."""
    plan = plan_rules.load_plan(document)
    with store.transaction() as s:
        row = plans_repo.save(s, plan.name, plan.model_dump(mode="json"), replace=replace, created_by=created_by)
        return _view(row)


def list_plans(store: Store) -> list[dict[str, Any]]:
    with store.read() as s:
        return [_view(r) for r in plans_repo.list_plans(s)]


def get_plan(store: Store, name: str) -> dict[str, Any]:
    with store.read() as s:
        return _view(plans_repo.get(s, name))


def _running_plan_job(s: Session, name: str) -> Job | None:
    found = jobs.list_jobs(s, states=("queued", "running"), kind=PLAN_FAILOVER, target=f"plan:{name}", limit=1)
    return found[0] if found else None


def delete_plan(store: Store, name: str) -> None:
    """Forget a plan (refused while a run of it is going on)."""
    with store.transaction() as s:
        running = _running_plan_job(s, name)
        if running is not None:
            raise Refused(f"recovery plan {name!r} is running (job {running.id}): wait for it or cancel it")
        plans_repo.delete(s, name)


# ---------------------------------------------------------------- runs


def _skipped(s: Session, vms: list[str], ftype: PlanFailoverType) -> list[str]:
    out = []
    for vm in vms:
        try:
            item = resolve_item(s, vm)
        except (NotFound, BadInput):
            continue  # its failover step reports it
        state = State(item.state)
        if ftype is PlanFailoverType.TEST:
            if state is State.TEST_FAILOVER or (item.details or {}).get("test_failover_active"):
                out.append(vm)
        elif state in _FAILED_OVER:
            out.append(vm)
    return out


def run_plan(store: Store, runner: JobRunner, name: str, type: str, point: str | None = None,  # noqa: A002
             created_by: str | None = None, dry_run: bool = False,
             scripts_dir: str | None = None) -> int | dict[str, Any]:
    """Run plan `name` as a `test`, `planned` or `unplanned` failover: the job id. With
    `dry_run`: `{"text": domain.plans.dry_run(...), "steps": [...]}` and nothing acts."""
    try:
        ftype = PlanFailoverType(type)
    except ValueError:
        raise BadInput(f"type: {type!r} is not one of test, planned, unplanned") from None
    if ftype is PlanFailoverType.PLANNED and point not in (None, "", "latest"):
        raise BadInput(f"point: a planned failover fails over to the point of its final sync, not {point!r}")
    with store.transaction() as s:
        row = plans_repo.get(s, name)
        plan = plan_rules.load_plan(row.document)
        skip = _skipped(s, plan.vms, ftype)
        steps = plan_rules.expand(plan, ftype, skip=skip)
        if dry_run:
            return {"text": plan_rules.dry_run(plan, ftype, skip=skip), "steps": [st.as_dict() for st in steps]}
        running = _running_plan_job(s, name)
        if running is not None:
            raise Refused(f"recovery plan {name!r} is already running (job {running.id})")
        job = runner.create_job(s, kind=PLAN_FAILOVER, target=f"plan:{name}", created_by=created_by,
                                payload={"plan": name, "document": dict(row.document), "type": ftype.value,
                                         "point": point, "skip": skip, "scripts_dir": scripts_dir,
                                         "statuses": [PlanStepStatus.PENDING.value] * len(steps),
                                         "info": {}, "confirmations": {}})
        return job.id


def confirm_manual_action(store: Store, job_id: int, step_position: int, by: str | None) -> dict[str, Any]:
    """Record an operator's confirmation of the manual action the plan job waits on
    (`step_position`: the plan step's number, as the dry run and the job show it)."""
    with store.transaction() as s:
        job = jobs.get(s, job_id, lock=True)
        if job.kind != PLAN_FAILOVER:
            raise Refused(f"job {job_id} is a {job.kind} job, not a recovery plan run: it has no manual action")
        if JobState(job.state) in JOB_TERMINAL:
            raise Refused(f"job {job_id} has ended ({job.state}): there is nothing to confirm")
        payload = dict(job.payload or {})
        steps = _steps(payload)
        step = next((st for st in steps if st.number == step_position), None)
        if step is None or step.kind is not StepKind.MANUAL_ACTION:
            raise BadInput(f"step {step_position} of job {job_id} is not a manual action")
        status = PlanStepStatus(payload["statuses"][step.number - 1])
        key = str(step.number)
        if key in payload.get("confirmations", {}):
            raise Refused(f"step {step_position} of job {job_id} was already confirmed")
        if status is not PlanStepStatus.WAITING:
            raise Refused(f"step {step_position} of job {job_id} is {status.value}, not waiting for a confirmation")
        record = {"by": by, "at": utcnow().isoformat()}
        job.payload = {**payload, "confirmations": {**payload.get("confirmations", {}), key: record}}
        s.flush()
        return {"job": job_id, "step": step_position, **record}


def _steps(payload: Mapping[str, Any]) -> list[PlanStep]:
    plan = plan_rules.load_plan(payload["document"])
    return plan_rules.expand(plan, payload["type"], skip=payload.get("skip") or [])


class _PlanRun:
    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        p = ctx.payload
        self.name = str(p["plan"])
        self.plan = plan_rules.load_plan(p["document"])
        self.ftype = PlanFailoverType(p["type"])
        self.steps = _steps(p)
        self.statuses = [PlanStepStatus(v) for v in p["statuses"]]
        self.info: dict[str, Any] = dict(p.get("info") or {})
        self.scripts_dir = Path(p["scripts_dir"]) if p.get("scripts_dir") else ctx.settings.data_dir / "scripts"

    def persist(self) -> None:
        with self.store.transaction() as s:
            job = jobs.get(s, self.ctx.job_id, lock=True)
            # Merge: confirmations are written by the operator's requests meanwhile.
            job.payload = {**(job.payload or {}), "statuses": [st.value for st in self.statuses], "info": self.info}
            s.flush()

    def _set(self, step: PlanStep, status: PlanStepStatus, **info: Any) -> None:
        self.statuses[step.number - 1] = status
        self.info.setdefault(str(step.number), {}).update(info)
        self.persist()

    def run(self) -> None:
        while True:
            nxt = plan_rules.next_plan_step(self.steps, self.statuses)
            if isinstance(nxt, PlanDone):
                break
            self.ctx.check()
            step = nxt
            self.ctx.report(int(100 * (step.number - 1) / max(len(self.steps), 1)), step.label())
            if self.statuses[step.number - 1] is PlanStepStatus.PENDING:
                self._set(step, PlanStepStatus.RUNNING, started_at=utcnow().isoformat())
            started = time.monotonic()
            try:
                extra = self.perform(step)
            except (RunnerStopping, JobCancelled):
                raise
            except StandbyError as e:
                log.warning("plan %s step %d failed: %s", self.name, step.number, e.message)
                self._set(step, PlanStepStatus.FAILED, error=e.message, seconds=round(time.monotonic() - started, 3),
                          **({"script": e.details["script"]} if isinstance(e.details, dict)
                             and "script" in e.details else {}))
                continue
            self._set(step, PlanStepStatus.DONE, seconds=round(time.monotonic() - started, 3), **extra)
        result = self.result(nxt)
        self.ctx.result.update(result)
        if not nxt.ok:
            with self.store.transaction() as s:
                job = jobs.get(s, self.ctx.job_id, lock=True)
                job.result = result
                s.flush()
            failures = "; ".join(f"step {n}: {self.info.get(str(n), {}).get('error')}" for n in nxt.failed)
            raise Refused(f"recovery plan {self.name}: {nxt.message} ({failures})", details={"failed": list(nxt.failed)})

    def rto(self) -> dict[str, Any]:
        """The plan's RTO: seconds from the declaration of the disaster (this control plane's
        promotion, when it came within DECLARATION_WINDOW before the plan) or else from the
        plan's start, to now (every VM of the plan running)."""
        from standby.orchestration.role import read_state

        with self.store.read() as s:
            started = jobs.get(s, self.ctx.job_id).started_at or utcnow()
        st = read_state(self.store)
        since = st.active_since if st is not None and st.epoch > 1 else None
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=started.tzinfo)
        if since is not None and timedelta(0) <= started - since <= DECLARATION_WINDOW:
            return {"rto_seconds": round((utcnow() - since).total_seconds(), 1), "rto_from": "promotion",
                    "declared_at": since.isoformat()}
        return {"rto_seconds": round((utcnow() - started).total_seconds(), 1), "rto_from": "plan start"}

    def result(self, done: PlanDone) -> dict[str, Any]:
        return {"plan": self.name, "type": self.ftype.value, "ok": done.ok, "message": done.message, **self.rto(),
                "failed": list(done.failed), "not_run": list(done.not_run), "skipped": list(self.ctx.payload.get("skip")
                                                                                         or []),
                "steps": [{**st.as_dict(), "status": status.value, **self.info.get(str(st.number), {})}
                          for st, status in zip(self.steps, self.statuses, strict=True)]}

    # ---------------------------------------------------------- steps

    def perform(self, step: PlanStep) -> dict[str, Any]:
        group = step.group_name
        if step.kind in (StepKind.PRE_SCRIPT, StepKind.POST_SCRIPT):
            assert step.script is not None
            res = run_plan_script(step.script, plan=self.name, group=group, failover_type=self.ftype.value,
                                  vms=list(step.vms), scripts_dir=self.scripts_dir)
            return {"script": res.as_dict()}
        if step.kind is StepKind.MANUAL_ACTION:
            return self._manual(step)
        if step.kind is StepKind.SHUTDOWN:
            return self._shutdown(step)
        return self._failover(step)

    def _manual(self, step: PlanStep) -> dict[str, Any]:
        if self.statuses[step.number - 1] is not PlanStepStatus.WAITING:
            self._set(step, PlanStepStatus.WAITING)
        key = str(step.number)

        def confirmed(s: Session) -> dict[str, Any] | None:
            conf = (jobs.get(s, self.ctx.job_id).payload or {}).get("confirmations", {})
            return dict(conf[key]) if key in conf else None

        record = self.ctx.wait_until(confirmed, timeout=MANUAL_ACTION_TIMEOUT, poll=self.ctx.settings.tick_seconds,
                                     what=f"the confirmation of step {step.number} ({step.text})")
        return {"confirmed_by": record.get("by"), "confirmed_at": record.get("at")}

    def _shutdown(self, step: PlanStep) -> dict[str, Any]:
        """Stop the group's source VMs in parallel (each VM's own failover then finds it off)."""
        recorded: dict[str, int] = dict(self.info.get(str(step.number), {}).get("tasks") or {})
        errors: list[str] = []
        with self.store.transaction() as s:
            for vm in step.vms:
                if vm in recorded:
                    continue
                try:
                    item = resolve_item(s, vm)
                    agent = agents.agent_for_host(s, item.vm.host.name)
                except StandbyError as e:
                    errors.append(f"{vm}: {e.message}")
                    continue
                t = tasks.enqueue(s, agent_id=agent.id, kind="stop_vm",
                                  params=build_params(StopVmParams, name=item.vm.name, timeout_seconds=STOP_TIMEOUT),
                                  job_id=self.ctx.job_id, deadline_seconds=self.ctx.settings.task_deadline_seconds)
                recorded[vm] = t.id
        self.info.setdefault(str(step.number), {})["tasks"] = recorded
        self.persist()
        for vm, task_id in recorded.items():
            try:
                self._wait_task(task_id, f"stopping {vm}")
            except StandbyError as e:
                errors.append(f"{vm}: {e.message}")
        if errors:
            raise RemoteError("; ".join(errors))
        return {}

    def _wait_task(self, task_id: int, what: str) -> dict[str, Any]:
        def done(s: Session) -> dict[str, Any] | None:
            t = tasks.get(s, task_id)
            if t.state == "succeeded":
                return dict(t.result or {}) or {"ok": True}
            if t.state in ("failed", "cancelled", "expired"):
                raise RemoteError(f"{what} {t.state}: {t.error or 'no reason given'}")
            return None

        return self.ctx.wait_until(done, timeout=self.ctx.settings.task_deadline_seconds + 60,
                                   poll=self.ctx.settings.tick_seconds, what=what)

    def _start_one(self, vm: str) -> int:
        runner = self.ctx.runner
        point = self.ctx.payload.get("point")
        if self.ftype is PlanFailoverType.TEST:
            return fo.start_test_failover(self.store, runner, item=vm, point=point or "latest",
                                          created_by=f"plan:{self.name}")[1]
        return fo.start_failover(self.store, runner, item=vm, type=self.ftype.value,
                                 point=point if self.ftype is PlanFailoverType.UNPLANNED else None,
                                 shutdown_source=True, created_by=f"plan:{self.name}")[1]

    def _adopt(self, vm: str) -> int | None:
        """The failover job this run started for `vm` before a restart (not yet recorded)."""
        kind = {PlanFailoverType.TEST: "test_failover", PlanFailoverType.PLANNED: "planned_failover",
                PlanFailoverType.UNPLANNED: "unplanned_failover"}[self.ftype]
        with self.store.read() as s:
            try:
                item = resolve_item(s, vm)
            except StandbyError:
                return None
            found = [j for j in jobs.list_jobs(s, kind=kind, target=f"item:{item.id}", limit=5)
                     if j.created_by == f"plan:{self.name}" and j.id > self.ctx.job_id]
            return found[0].id if found else None

    def _failover(self, step: PlanStep) -> dict[str, Any]:
        key = str(step.number)
        started: dict[str, int] = dict(self.info.get(key, {}).get("jobs") or {})
        errors: dict[str, str] = dict(self.info.get(key, {}).get("errors") or {})
        for vm in step.vms:
            if vm in started or vm in errors:
                continue
            try:
                started[vm] = self._start_one(vm)
            except StandbyError as e:
                adopted = self._adopt(vm)
                if adopted is None:
                    errors[vm] = e.message
                else:
                    started[vm] = adopted
            self.info.setdefault(key, {}).update(jobs=started, errors=errors)
            self.persist()

        def all_ended(s: Session) -> dict[str, Any] | None:
            states = {vm: jobs.get(s, jid) for vm, jid in started.items()}
            if any(JobState(j.state) not in JOB_TERMINAL for j in states.values()):
                return None
            return {vm: {"state": j.state, "error": j.error} for vm, j in states.items()}

        ended = self.ctx.wait_until(all_ended, timeout=FAILOVER_STEP_TIMEOUT, poll=self.ctx.settings.tick_seconds,
                                    what="the VMs' failovers") if started else {}
        for vm, e in ended.items():
            if e["state"] != JobState.SUCCEEDED.value:
                errors[vm] = f"{e['state']}: {e['error']}"
        self.info.setdefault(key, {}).update(jobs=started, errors=errors)
        if errors:
            raise RemoteError("; ".join(f"{vm}: {err}" for vm, err in sorted(errors.items())))
        return {"jobs": started}


def _run_step(ctx: StepContext) -> None:
    _PlanRun(ctx).run()


def _ended(ctx: StepContext, state: JobState, error: str) -> None:
    """A cancelled (or broken) run: its unfinished failover jobs and tasks are stopped."""
    with ctx.store.transaction() as s:
        info = (jobs.get(s, ctx.job_id).payload or {}).get("info") or {}
        for step in info.values():
            for jid in (step.get("jobs") or {}).values():
                if JobState(jobs.get(s, jid).state) not in JOB_TERMINAL:
                    jobs.request_cancel(s, jid)
        for t in tasks.list_tasks(s, job_id=ctx.job_id, states=("queued", "claimed")):
            tasks.cancel(s, t.id)


def handlers() -> dict[str, JobHandler]:
    return {PLAN_FAILOVER: JobHandler([Step("run plan", _run_step)], resumable=True, on_end=_ended)}


