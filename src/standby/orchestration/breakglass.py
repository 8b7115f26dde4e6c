"""A break-glass failover reported by a secondary agent (`agent/breakglass.py`): the
control plane takes it in as if it had run the unplanned failover itself.

    result = take_report(session, agent, report)

The item goes through the same lifecycle events (unplanned failover started, failover
completed: commit pending), its details hold the same `failover` record an orchestrated
failover leaves (overlay tag, overlays, replica VM, point: commit, cancel, reverse
replication and failback work on it as they are), open cycle tasks are cancelled, and a
finished `unplanned_failover` job shows the steps the agent ran, their times and who broke
the glass. A warning alert says it happened. A report taken once is taken again as a
no-op (the agent retries until it hears back).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from standby.domain import lifecycle
from standby.domain.lifecycle import Event, State
from standby.errors import BadInput, Conflict, Refused
from standby.orchestration.protection import item_context, resolve_item
from standby.store.base import utcnow
from standby.store.models import Agent
from standby.store.repo import alerts, items, jobs, tasks
from standby.store.states import JobState, StepState

ALERT_KIND = "break_glass_failover"
JOB_KIND = "unplanned_failover"


def _time(value: Any, what: str) -> datetime:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 4e9:
        raise BadInput(f"break-glass report: {what} must be a Unix time, not {value!r}")
    return datetime.fromtimestamp(float(value), UTC)


def take_report(session: Session, agent: Agent, report: dict[str, Any]) -> dict[str, Any]:
    """Record a finished break-glass failover of `agent` (see the module doc)."""
    vm = report.get("vm")
    if not isinstance(vm, str) or not vm:
        raise BadInput("break-glass report: 'vm' must name the VM")
    ref = report.get("item_id")
    item = resolve_item(session, ref if isinstance(ref, int) else vm, lock=True)
    if item.vm.name != vm:
        raise Conflict(f"break-glass report: item {item.id} protects {item.vm.name}, not {vm}")
    secondary = item.secondary_host.name if item.secondary_host is not None else None
    if secondary != agent.host_name:
        raise Refused(f"break-glass report from agent {agent.name} on host {agent.host_name}: VM {vm}'s replica "
                      f"is held by host {secondary}")
    if report.get("outcome") != "done":
        raise BadInput(f"break-glass report: only a finished failover is taken, not {report.get('outcome')!r}")
    started, finished = _time(report.get("started_at"), "started_at"), _time(report.get("finished_at"),
                                                                             "finished_at")
    point = report.get("point") if isinstance(report.get("point"), dict) else {}
    tag, replica = str(report.get("tag") or ""), str(report.get("replica_vm") or "")
    overlays = report.get("overlays") if isinstance(report.get("overlays"), dict) else {}
    if not tag or not replica or not overlays or not point.get("id"):
        raise BadInput("break-glass report: tag, replica_vm, overlays and point are needed")
    details = dict(item.details or {})
    known = details.get("failover") or {}
    if known.get("tag") == tag and known.get("replica_vm") == replica and (known.get("break_glass") or {}):
        return {"item_id": item.id, "state": item.state, "job_id": known.get("job"), "already": True}
    state = State(item.state)
    ctx = item_context(item)
    if Event.UNPLANNED_FAILOVER_STARTED not in lifecycle.allowed_events(state, ctx):
        raise Conflict(f"VM {vm} is {state.value} here: the break-glass failover on {agent.host_name} "
                       f"(replica {replica}, point {point.get('id')}) cannot be taken in; resolve it by hand "
                       "(one copy of the VM must be stopped)")
    now = utcnow()
    for t in tasks.list_tasks(session, item_id=item.id, kind="cycle", states=["queued", "claimed"]):
        tasks.cancel(session, t.id)
    by = str(report.get("by") or "?")
    steps = [s for s in report.get("steps") or [] if isinstance(s, dict)]
    job = jobs.create(session, kind=JOB_KIND, target=vm, created_by=f"break-glass:{by}",
                      payload={"item_id": item.id, "break_glass": {"agent": agent.name, "by": by,
                                                                  "point": point, "steps": steps}},
                      steps=[str(s.get("name") or "step")[:200] for s in steps], now=started)
    jobs.start(session, job.id, runner=f"agent {agent.name} (break glass)", now=started)
    for i, s in enumerate(steps):
        jobs.start_step(session, job.id, i, now=started)
        note = str(s.get("note") or s.get("error") or "")[:500]
        jobs.finish_step(session, job.id, i, StepState.SUCCEEDED if not s.get("error") else StepState.FAILED,
                         message=f"{note} ({float(s.get('seconds') or 0):.1f} s)", now=finished)
    seconds = (finished - started).total_seconds()
    jobs.finish(session, job.id, JobState.SUCCEEDED, now=now,
                message=f"break-glass failover by {by} on {agent.host_name}, taken in at {now.isoformat()}",
                result={"break_glass": True, "point": point, "replica_vm": replica, "seconds": seconds,
                        "bytes_moved": 0})
    for event in (Event.UNPLANNED_FAILOVER_STARTED, Event.FAILOVER_COMPLETED):
        items.transition(session, item.id, lambda cur, e=event: lifecycle.transition(State(cur), e,
                                                                                    item_context(item)).value)
    details["failover"] = {"tag": tag, "overlays": dict(overlays), "replica_vm": replica, "point": point,
                           "job": job.id, "break_glass": {"agent": agent.name, "by": by,
                                                          "started_at": started.isoformat(),
                                                          "finished_at": finished.isoformat()}}
    item.details = details
    item.next_cycle_at = None
    alerts.raise_alert(session, kind=ALERT_KIND, severity="warning", subject=f"item:{vm}", item_id=item.id,
                       agent_id=agent.id, now=now,
                       message=f"{vm} was failed over by breaking glass on {agent.host_name} ({by}, point "
                               f"{point.get('id')}, {seconds:.0f} s) while no control plane answered; "
                               "commit or cancel it, then reverse replication")
    session.flush()
    return {"item_id": item.id, "state": item.state, "job_id": job.id, "already": False}
