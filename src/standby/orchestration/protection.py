"""Protection operations: what the API's item routes do.

Each operation checks what it can at once, in the request's transaction (the VM, its
pairing and policy, readiness, whether the lifecycle allows the event), so a refusal is an
immediate 409 with a clear message; then it creates a persisted job that the runner runs:

    item_id, job_id = enable_protection(store, runner, vm="web01", created_by="ops")
    item_id, job_id = pause(store, runner, item="web01")
    item_id, job_id = disable_protection(store, runner, item=7, delete_replica=True)

Every state change goes through `domain.lifecycle` (`store.repo.items.transition`), read
under the item's row lock, so a job finding the item moved meanwhile fails with the state
machine's own message. Steps are idempotent (a restarted control plane resumes a job at
its first unfinished step): each checks what is done before doing it, and tasks a step
hands to agents are recorded in the item's details so a resumed step waits for the same
task rather than enqueueing another.

Replication itself is the scheduler's: the protect job moves the item to
`initial_replication_in_progress` and schedules its first cycle (now, at the policy's
time, or after an offline seed is exported and imported), then waits until the first
cycle's result makes the item `protected` (`Scheduler.apply_task_result`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.domain import lifecycle
from standby.domain.lifecycle import Event, ItemContext, State
from standby.errors import BadInput, NotFound, Refused, RemoteError
from standby.orchestration import agents as agent_svc
from standby.orchestration.livefabric import live_readiness_for
from standby.contract import DiskIdsParams, SeedExportParams, SeedImportParams, build_params, disk_id_for
from standby.orchestration.runner import JobHandler, JobRunner, Step, StepContext
from standby.orchestration.settings import ServerSettings
from standby.readiness.engine import Report, Severity
from standby.store import Store
from standby.store.base import utcnow
from standby.store.models import Agent, AgentTask, CloudPairing, Host, Policy, ProtectedItem, Vm
from standby.store.repo import agents, inventory, items, jobs, policies, tasks
from standby.store.states import JobState

log = logging.getLogger("standby.protection")

PROTECT = "protect"
DISABLE = "disable_protection"
PAUSE = "pause"
RESUME = "resume"
REPLICATE_NOW = "replicate_now"
RESYNC = "resync"

FIRST_POINT_TIMEOUT = 6 * 3600.0  # a first full copy of large disks takes hours
RESYNC_TIMEOUT = 6 * 3600.0
SEED_TASK_DEADLINE = 24 * 3600.0  # exporting or importing a seed of large disks
OPEN_TASK_STATES = ("queued", "claimed")
NOT_STARTED = "replication cycle not started"  # the scheduler's prefix when it cannot dispatch


# ---------------------------------------------------------------- lookups


def item_context(item: ProtectedItem) -> ItemContext:
    """The lifecycle guards' facts, from the item's row."""
    details = item.details or {}
    has_point = item.last_recovery_point_id is not None
    return ItemContext(
        vm=item.vm.name,
        initial_replication_complete=has_point,
        has_recovery_point=has_point,
        test_failover_active=bool(details.get("test_failover_active")),
        reverse_in_sync=bool(details.get("reverse_in_sync")),
    )


def resolve_item(session: Session, ref: int | str, *, lock: bool = False) -> ProtectedItem:
    """An item by id (an int or digits) or by its VM's name."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        return items.get(session, int(ref), lock=lock)
    found = list(session.scalars(select(ProtectedItem).join(Vm, Vm.id == ProtectedItem.vm_id).where(Vm.name == ref)))
    if not found:
        raise NotFound(f"no protected item for VM {ref!r}")
    if len(found) > 1:
        ids = ", ".join(str(i.id) for i in found)
        raise BadInput(f"VMs named {ref!r} on several hosts are protected (items {ids}): use the item id")
    return items.get(session, found[0].id, lock=lock) if lock else found[0]


def _resolve_vm(session: Session, vm: str, host: str | None) -> Vm:
    if host is not None:
        row = inventory.get_vm(session, host, vm)
    else:
        rows = [v for v in inventory.list_vms(session) if v.name == vm]
        if not rows:
            raise NotFound(f"VM {vm!r} is not in the inventory (is its host's agent running?)")
        if len(rows) > 1:
            hosts = ", ".join(sorted(v.host.name for v in rows))
            raise BadInput(f"VM {vm!r} exists on several hosts ({hosts}): say which host")
        row = rows[0]
    if row.missing_since is not None:
        raise Refused(f"VM {vm!r} was last seen on host {row.host.name!r} at "
                      f"{row.missing_since.isoformat(timespec='seconds')} and is missing now")
    return row


def _pairing_of_host(session: Session, host: Host) -> CloudPairing:
    pairings = [p for c in inventory.clouds_of_host(session, host.name)
                if (p := policies.pairing_of_primary(session, c.name)) is not None]
    if not pairings:
        clouds = ", ".join(c.name for c in inventory.clouds_of_host(session, host.name)) or "no cloud"
        raise Refused(f"host {host.name!r} ({clouds}) is in no cloud paired as a primary: pair its cloud first")
    if len(pairings) > 1:
        raise Refused(f"host {host.name!r} is in several primary clouds "
                      f"({', '.join(p.primary.name for p in pairings)}): keep it in one")
    return pairings[0]


def _choose_policy(session: Session, pairing: CloudPairing, policy: str | None) -> Policy:
    route = f"{pairing.primary.name} -> {pairing.secondary.name}"
    if policy is not None:
        row = policies.get_policy(session, policy)
        if not policies.is_associated(session, row.id, pairing.id):
            raise Refused(f"policy {policy!r} is not associated with the pairing {route}: associate it first")
        return row
    associated = list(pairing.policies)
    if not associated:
        raise Refused(f"no policy is associated with the pairing {route}: associate one")
    if len(associated) > 1:
        names = ", ".join(p.name for p in associated)
        raise BadInput(f"several policies are associated with the pairing {route} ({names}): choose one")
    return associated[0]


def _readiness(session: Session, settings: ServerSettings, vm: Vm) -> Report:
    return live_readiness_for(session, settings, vm=vm)


def refuse_unless_ready(report: Report, vm: str) -> None:
    """`Refused` with every finding in `details.findings` if any finding is an error."""
    errors = [f for f in report.findings if f.severity is Severity.ERROR]
    if not errors:
        return
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise Refused(
        f"VM {vm} is not ready for protection: {first.subject}: {first.message}{more}",
        details={"findings": [f.as_dict() for f in report.findings]},
    )


def _live_agent(session: Session, host: str, settings: ServerSettings, now: datetime) -> Agent | None:
    try:
        agent = agents.agent_for_host(session, host)
    except NotFound:
        return None
    return agent if agent_svc.alive(agent, settings, now) else None


def place_replica(session: Session, settings: ServerSettings, pairing: CloudPairing, *,
                  requested: str | None = None, now: datetime | None = None) -> Host:
    """The secondary host to hold a replica: `requested` if it is in the pairing's secondary
    cloud with a live agent, else the host there with a live agent (active, heartbeat
    current, a replication address) and the most free storage."""
    now = now or utcnow()
    cloud = pairing.secondary.name
    hosts = inventory.list_hosts(session, cloud=cloud)
    why: list[str] = []
    candidates: list[Host] = []
    for h in hosts:
        agent = _live_agent(session, h.name, settings, now)
        if agent is None:
            why.append(f"{h.name}: no active agent with a current heartbeat")
        elif not agent.address:
            why.append(f"{h.name}: agent {agent.name} has no replication address")
        else:
            candidates.append(h)
    if requested is not None:
        chosen = next((h for h in candidates if h.name == requested), None)
        if chosen is None:
            if requested not in {h.name for h in hosts}:
                raise Refused(f"host {requested!r} is not in the secondary cloud {cloud!r}")
            reason = next(w for w in why if w.startswith(f"{requested}:"))
            raise Refused(f"host {requested!r} cannot hold the replica: {reason.split(': ', 1)[1]}")
        return chosen
    if not candidates:
        detail = "; ".join(why) if why else "the cloud has no hosts"
        raise Refused(f"no host of the secondary cloud {cloud!r} can hold the replica ({detail})")
    return max(candidates, key=lambda h: (h.storage_free_bytes or 0, _reverse_name(h.name)))


def _reverse_name(name: str) -> tuple[int, ...]:
    # Ties on free storage go to the first name in order (max() would take the last).
    return tuple(-ord(c) for c in name)


def disk_ids_of(item: ProtectedItem) -> list[str]:
    """Replica disk ids of the item's VM: one per disk target, plus any a cycle reported."""
    ids = {disk_id_for(item.vm.name, target) for target in (item.vm.disks or {})}
    ids.update(d for d in (item.details or {}).get("disk_ids", []) if isinstance(d, str))
    return sorted(ids)


def _transition(session: Session, item_id: int, event: Event, *, error: str | None = None,
                now: datetime | None = None) -> ProtectedItem:
    """Apply a lifecycle event under the row lock; `TransitionRefused` says why not."""
    item = items.get(session, item_id, lock=True)
    ctx = item_context(item)
    return items.transition(session, item_id, lambda cur: lifecycle.transition(State(cur), event, ctx).value,
                            error=error, now=now)


def _check_event(item: ProtectedItem, event: Event) -> None:
    lifecycle.transition(State(item.state), event, item_context(item))


# ---------------------------------------------------------------- operations


def enable_protection(
    store: Store,
    runner: JobRunner,
    *,
    vm: str,
    host: str | None = None,
    policy: str | None = None,
    secondary_host: str | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
) -> tuple[int, int]:
    """Protect a VM: (item id, protect job id). Refused (with the readiness findings in
    `details.findings`) when the live fabric has an error finding for it."""
    settings = runner.settings
    now = now or utcnow()
    with store.transaction() as s:
        vm_row = _resolve_vm(s, vm, host)
        existing = items.by_vm(s, vm_row.id)
        if existing is not None and existing.state != items.DISABLED:
            raise Refused(f"VM {vm_row.name} is already protected (item {existing.id}, {existing.state})")
        pairing = _pairing_of_host(s, vm_row.host)
        policy_row = _choose_policy(s, pairing, policy)
        if secondary_host is not None:
            place_replica(s, settings, pairing, requested=secondary_host, now=now)
        refuse_unless_ready(_readiness(s, settings, vm_row), vm_row.name)
        item = items.create(s, vm_id=vm_row.id, pairing_id=pairing.id, policy_id=policy_row.id,
                            state=lifecycle.INITIAL_STATE.value, now=now)
        job = runner.create_job(s, kind=PROTECT, target=f"item:{item.id}", created_by=created_by, now=now,
                                payload={"item_id": item.id, "vm": vm_row.name, "host": vm_row.host.name,
                                         "policy": policy_row.name, "secondary_host": secondary_host})
        return item.id, job.id


def _simple(store: Store, runner: JobRunner, kind: str, item_ref: int | str, created_by: str | None,
            check: Callable[[ProtectedItem], None], **payload: Any) -> tuple[int, int]:
    with store.transaction() as s:
        item = resolve_item(s, item_ref, lock=True)
        check(item)
        job = runner.create_job(s, kind=kind, target=f"item:{item.id}", created_by=created_by,
                                payload={"item_id": item.id, "vm": item.vm.name, **payload})
        return item.id, job.id


def pause(store: Store, runner: JobRunner, *, item: int | str, created_by: str | None = None) -> tuple[int, int]:
    """Stop replicating (cycles stop; an open cycle is asked to stop)."""
    return _simple(store, runner, PAUSE, item, created_by, lambda i: _check_event(i, Event.PAUSE))


def resume(store: Store, runner: JobRunner, *, item: int | str, created_by: str | None = None) -> tuple[int, int]:
    """Replicate again; the next cycle is due at once."""
    return _simple(store, runner, RESUME, item, created_by, lambda i: _check_event(i, Event.RESUME))


def _check_replicating(item: ProtectedItem) -> None:
    state = State(item.state)
    if not lifecycle.is_replicating(state):
        raise Refused(f"cannot replicate VM {item.vm.name} now: it is {lifecycle.STATES[state].label}, "
                      "and replication cycles run only while it is protected or replicating")


def replicate_now(store: Store, runner: JobRunner, *, item: int | str,
                  created_by: str | None = None) -> tuple[int, int]:
    """Run a cycle now (or let the running one count) and wait for its outcome."""
    return _simple(store, runner, REPLICATE_NOW, item, created_by, _check_replicating,
                   requested_at=utcnow().isoformat())


def resync(store: Store, runner: JobRunner, *, item: int | str, created_by: str | None = None) -> tuple[int, int]:
    """Resynchronize: the next cycle compares every block by hash; waits until protected again."""
    return _simple(store, runner, RESYNC, item, created_by, lambda i: _check_event(i, Event.RESYNC_STARTED))


def disable_protection(store: Store, runner: JobRunner, *, item: int | str, delete_replica: bool | None = None,
                       created_by: str | None = None) -> tuple[int, int]:
    """Stop protecting; delete the replica on the secondary when asked (None: the policy's
    `delete_replica_on_disable`)."""
    with store.transaction() as s:
        row = resolve_item(s, item, lock=True)
        _check_event(row, Event.DISABLE_PROTECTION)
        delete = row.policy.delete_replica_on_disable if delete_replica is None else bool(delete_replica)
        job = runner.create_job(s, kind=DISABLE, target=f"item:{row.id}", created_by=created_by,
                                payload={"item_id": row.id, "vm": row.vm.name, "delete_replica": delete})
        return row.id, job.id


# ---------------------------------------------------------------- step helpers


def _item_id(ctx: StepContext) -> int:
    return int(ctx.payload["item_id"])


def _now() -> datetime:
    return utcnow()


def _enqueue_or_reuse(ctx: StepContext, session: Session, item: ProtectedItem, key: str, *, agent: Agent, kind: str,
                      params: dict[str, Any], deadline: float) -> int:
    """The id of the task recorded under `details[key]`, or of a new one recorded there
    (in the caller's transaction: the task and its record commit together)."""
    recorded = (item.details or {}).get(key)
    if isinstance(recorded, int):
        return recorded
    task = tasks.enqueue(session, agent_id=agent.id, kind=kind, params=params, item_id=item.id, job_id=ctx.job_id,
                         deadline_seconds=deadline)
    items.update_details(session, item.id, **{key: task.id})
    return task.id


def _wait_task(ctx: StepContext, task_id: int, *, what: str, timeout: float) -> dict[str, Any]:
    """Wait for an agent task; its result, or `RemoteError` with the agent's error."""

    def done(s: Session) -> dict[str, Any] | None:
        task = tasks.get(s, task_id)
        if task.state == "succeeded":
            return dict(task.result or {}) or {"ok": True}
        if task.state in ("failed", "cancelled", "expired"):
            agent = s.get(Agent, task.agent_id)
            who = f"agent {agent.name}" if agent is not None else f"agent {task.agent_id}"
            kind = f" ({task.error_type})" if task.error_type else ""
            raise RemoteError(f"{what} {task.state} on {who}: {task.error or 'no reason given'}{kind}")
        return None

    return ctx.wait_until(done, timeout=timeout, poll=ctx.settings.tick_seconds, what=what)


def _cancel_open_tasks(session: Session, *, item_id: int | None = None, job_id: int | None = None,
                       kinds: tuple[str, ...] | None = None) -> list[int]:
    cancelled = []
    for task in tasks.list_tasks(session, item_id=item_id, job_id=job_id, states=OPEN_TASK_STATES, limit=1000):
        if kinds is None or task.kind in kinds:
            tasks.cancel(session, task.id)
            cancelled.append(task.id)
    return cancelled


# ---------------------------------------------------------------- protect


def _check_readiness(ctx: StepContext) -> None:
    with ctx.store.read() as s:
        item = items.get(s, _item_id(ctx))
        if State(item.state) is not State.READY:
            return  # replication has started: readiness was checked before it did
        refuse_unless_ready(_readiness(s, ctx.settings, item.vm), item.vm.name)


def _place_replica(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        requested = ctx.payload.get("secondary_host")
        if item.secondary_host_id is not None and requested in (None, item.secondary_host.name):  # type: ignore[union-attr]
            ctx.result["secondary_host"] = item.secondary_host.name  # type: ignore[union-attr]
            return  # placed before a restart
        host = place_replica(s, ctx.settings, item.pairing, requested=requested)
        item.secondary_host_id = host.id
        items.update_details(s, item.id, placed_on=host.name, placed_free_bytes=host.storage_free_bytes)
        ctx.result["secondary_host"] = host.name
    ctx.report(100, f"replica placed on {host.name}")


def _initial_replication(ctx: StepContext) -> None:
    item_id = _item_id(ctx)
    with ctx.store.transaction() as s:
        item = items.get(s, item_id, lock=True)
        policy = item.policy
        state = State(item.state)
        if state is State.READY:
            now = _now()
            _transition(s, item_id, Event.INITIAL_REPLICATION_STARTED, now=now)
            if policy.initial_replication == "now":
                items.schedule(s, item_id, now, now=now)
            elif policy.initial_replication == "scheduled":
                at = policy.initial_replication_at or now
                items.schedule(s, item_id, max(at, now), now=now)
            items.update_details(s, item_id, initial_replication=policy.initial_replication,
                                 initial_replication_started_at=now.isoformat())
        elif state is not State.INITIAL_REPLICATION:
            ctx.result["initial_replication"] = f"skipped: the item is {item.state}"
            return
        mode = policy.initial_replication
    if mode == "now":
        ctx.report(100, "first cycle scheduled now")
    elif mode == "scheduled":
        ctx.report(100, f"first cycle scheduled at {policy.initial_replication_at}")
    else:
        _offline_seed(ctx)


def _offline_seed(ctx: StepContext) -> None:
    """Export a seed of every disk on the primary, import it on the secondary, then let the
    first cycle send what changed since the export."""
    item_id = _item_id(ctx)
    with ctx.store.transaction() as s:
        item = items.get(s, item_id, lock=True)
        if (item.details or {}).get("seeded"):
            return
        if item.secondary_host is None:
            raise Refused("no secondary host was chosen for the replica")
        primary = agents.agent_for_host(s, item.vm.host.name)
        secondary = agents.agent_for_host(s, item.secondary_host.name)
        disk_ids = disk_ids_of(item)
        export_id = _enqueue_or_reuse(
            ctx, s, item, "seed_export_task", agent=primary, kind="seed_export", deadline=SEED_TASK_DEADLINE,
            params=build_params(SeedExportParams, vm=item.vm.name, disk_ids=disk_ids,
                                path=item.policy.offline_export_path))
        import_params = build_params(SeedImportParams, vm=item.vm.name, disk_ids=disk_ids,
                                     path=item.policy.offline_import_path)
        secondary_id = secondary.id
    ctx.report(10, f"exporting the seed of {len(disk_ids)} disk(s) on the primary")
    exported = _wait_task(ctx, export_id, what="the seed export", timeout=SEED_TASK_DEADLINE)
    with ctx.store.transaction() as s:
        item = items.get(s, item_id, lock=True)
        import_id = _enqueue_or_reuse(
            ctx, s, item, "seed_import_task", agent=s.get_one(Agent, secondary_id), kind="seed_import",
            deadline=SEED_TASK_DEADLINE, params=import_params)
    ctx.report(55, "importing the seed on the secondary")
    imported = _wait_task(ctx, import_id, what="the seed import", timeout=SEED_TASK_DEADLINE)
    with ctx.store.transaction() as s:
        now = _now()
        items.update_details(s, item_id, seeded=True, seed_bytes=imported.get("bytes", exported.get("bytes")),
                             now=now)
        items.schedule(s, item_id, now, now=now)  # the catch-up cycle makes the first point
    ctx.report(100, "seed imported; first cycle scheduled")


def _wait_first_point(ctx: StepContext) -> None:
    item_id = _item_id(ctx)
    status = {"now": "", "shown": ""}

    def protected(s: Session) -> bool:
        item = items.get(s, item_id)
        state = State(item.state)
        if state is State.PROTECTED or (item.last_recovery_point_id is not None and lifecycle.is_replicating(state)):
            return True
        if state in (State.ERROR, State.DISABLED):
            raise Refused(f"initial replication of VM {item.vm.name} stopped: the item is "
                          f"{lifecycle.STATES[state].label}" + (f" ({item.error})" if item.error else ""))
        status["now"] = f"waiting for the first recovery point ({lifecycle.STATES[state].label})" + (
            f": {item.error}" if item.error else "")
        return False

    def show() -> None:
        # The job says what the wait is on (an agent missing, a failed cycle), once per change.
        if status["now"] != status["shown"]:
            status["shown"] = status["now"]
            ctx.report(50, status["now"])

    ctx.wait_until(protected, timeout=float(ctx.payload.get("first_point_timeout", FIRST_POINT_TIMEOUT)),
                   poll=ctx.settings.tick_seconds, what="the first recovery point", on_poll=show)


def _finalize_protection(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        if not (item.details or {}).get("protected_at"):
            items.update_details(s, item.id, protected_at=_now().isoformat(), protect_job=ctx.job_id)
        ctx.result.update(item_id=item.id, state=item.state, recovery_point=item.last_recovery_point_id,
                          secondary_host=item.secondary_host.name if item.secondary_host else None)


def _protect_ended(ctx: StepContext, state: JobState, error: str) -> None:
    """A protect job that did not succeed: cancel the tasks it handed out; record why on
    the item. Before replication started, protection is withdrawn (the item is disabled,
    so enabling again starts afresh); a failed offline seed fails initial replication;
    later, replication carries on and the item keeps the error."""
    with ctx.store.transaction() as s:
        _cancel_open_tasks(s, job_id=ctx.job_id)
        try:
            item = items.get(s, _item_id(ctx), lock=True)
        except NotFound:
            return
        if state is JobState.CANCELLED:
            return
        current = State(item.state)
        reason = f"protect job {ctx.job_id} {state.value}: {error}"
        if current is State.READY:
            _transition(s, item.id, Event.DISABLE_PROTECTION, error=reason)
        elif current is State.INITIAL_REPLICATION and ctx.step_name == "initial replication":
            _transition(s, item.id, Event.INITIAL_REPLICATION_FAILED, error=reason)
            items.schedule(s, item.id, None)
        else:
            item.error = reason
            s.flush()


PROTECT_HANDLER = JobHandler(
    [
        Step("check readiness", _check_readiness),
        Step("place replica", _place_replica),
        Step("initial replication", _initial_replication),
        Step("wait for first recovery point", _wait_first_point),
        Step("finalize protection", _finalize_protection),
    ],
    on_end=_protect_ended,
)


# ---------------------------------------------------------------- pause, resume, replicate now, resync


def _pause_step(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        if State(item.state) is not State.PAUSED:  # paused already: done before a restart
            _transition(s, item.id, Event.PAUSE)
        items.schedule(s, item.id, None)
        cancelled = _cancel_open_tasks(s, item_id=item.id, kinds=("cycle",))
    ctx.result.update(state="paused", cycles_cancelled=len(cancelled))


def _resume_step(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        if State(item.state) is State.PAUSED:
            item = _transition(s, item.id, Event.RESUME)
        if State(item.state) is State.READY and item.secondary_host_id is not None:
            # Paused during initial replication: start it again (the seed resumes).
            item = _transition(s, item.id, Event.INITIAL_REPLICATION_STARTED)
        if lifecycle.is_replicating(State(item.state)) and tasks.open_task_for_item(s, item.id, "cycle") is None:
            items.schedule(s, item.id, _now())
        ctx.result.update(state=item.state)


def _replicate_now_step(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        _check_replicating(item)
        if item.error and item.error.startswith(NOT_STARTED):
            item.error = None  # a fresh attempt: the scheduler says again if it still cannot start one
        # an agent that runs its own cycles starts one when its desired state's run_now moves
        details = dict(item.details or {})
        details["run_now"] = int(details.get("run_now") or 0) + 1
        item.details = details
        if tasks.open_task_for_item(s, item.id, "cycle") is None:
            items.schedule(s, item.id, _now())
    ctx.report(100, "cycle requested")


def _cycle_after(s: Session, item_id: int, since: datetime) -> AgentTask | None:
    found = [t for t in tasks.list_tasks(s, item_id=item_id, kind="cycle", limit=20) if t.created_at >= since]
    return found[-1] if found else None  # the oldest since the request (list is newest first)


def _wait_cycle_step(ctx: StepContext) -> None:
    """Wait for a cycle that started after the request (a cycle already running then
    carries an older point: once it ends, this request gets a cycle of its own)."""
    item_id = _item_id(ctx)
    since = datetime.fromisoformat(str(ctx.payload["requested_at"]))

    def finished(s: Session) -> dict[str, Any] | None:
        item = items.get(s, item_id)
        report = (item.details or {}).get("last_report") or {}
        if isinstance(report.get("started_at"), (int, float)) and report["started_at"] >= since.timestamp():
            if not report.get("ok"):  # the agent's own cycle, started after the request
                raise RemoteError(f"the replication cycle failed: {report.get('error') or 'no reason given'}")
            return {"cycle_id": report.get("cycle_id"), "bytes_sent": report.get("bytes_sent")}
        task = _cycle_after(s, item_id, since)
        if task is not None and not task.is_open:
            if task.state != "succeeded":
                raise RemoteError(f"the replication cycle {task.state}: {task.error or 'no reason given'}")
            # Plain values: the read session's objects expire when it ends.
            return {"task_id": task.id, "bytes_sent": (task.result or {}).get("bytes_sent")}
        if not lifecycle.is_replicating(State(item.state)):
            raise Refused(f"VM {item.vm.name} stopped replicating ({item.state}) before the cycle ran")
        if task is None and item.error and item.error.startswith(NOT_STARTED) and item.updated_at >= since:
            raise RemoteError(item.error)  # the scheduler could not start it (an agent missing ...)
        if (task is None and tasks.open_task_for_item(s, item_id, "cycle") is None
                and (item.next_cycle_at is None or item.next_cycle_at > _now())):
            return {"reschedule": True}
        return None

    timeout = ctx.settings.task_deadline_seconds + 60
    while True:
        outcome = ctx.wait_until(finished, timeout=timeout, poll=ctx.settings.tick_seconds,
                                 what="the replication cycle")
        if not outcome.get("reschedule"):
            ctx.result.update(outcome)
            return
        with ctx.store.transaction() as s:
            if tasks.open_task_for_item(s, item_id, "cycle") is None:
                items.schedule(s, item_id, _now())


def _resync_step(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        if State(item.state) is not State.RESYNCHRONIZING:
            _transition(s, item.id, Event.RESYNC_STARTED)
        items.update_details(s, item.id, force_hash_scan=True, resync_requested_by_job=ctx.job_id)
        # A cycle already under way is not a hash scan: its success must not count as the
        # resynchronization. Stop it; the next cycle scans.
        for task in tasks.list_tasks(s, item_id=item.id, kind="cycle", states=OPEN_TASK_STATES):
            if not task.params.get("force_hash_scan"):
                tasks.cancel(s, task.id)
        if tasks.open_task_for_item(s, item.id, "cycle") is None:
            items.schedule(s, item.id, _now())


def _wait_resync_step(ctx: StepContext) -> None:
    item_id = _item_id(ctx)

    def done(s: Session) -> bool:
        item = items.get(s, item_id)
        state = State(item.state)
        if state is State.PROTECTED:
            return True
        if state in (State.RESYNCHRONIZING, State.RESYNC_REQUIRED):
            return False  # a failed pass is retried by the scheduler
        raise Refused(f"resynchronization of VM {item.vm.name} stopped: the item is {lifecycle.STATES[state].label}"
                      + (f" ({item.error})" if item.error else ""))

    ctx.wait_until(done, timeout=float(ctx.payload.get("timeout", RESYNC_TIMEOUT)), poll=ctx.settings.tick_seconds,
                   what="the resynchronization")


# ---------------------------------------------------------------- disable


def _disable_step(ctx: StepContext) -> None:
    with ctx.store.transaction() as s:
        item = items.get(s, _item_id(ctx), lock=True)
        if State(item.state) is not State.DISABLED:
            _transition(s, item.id, Event.DISABLE_PROTECTION)
        items.schedule(s, item.id, None)
        # Work still running for the item stops: its tasks, and its other jobs (a protect job
        # waiting for the first point would otherwise wait on a disabled item).
        _cancel_open_tasks(s, item_id=item.id)
        for job in jobs.list_jobs(s, states=("queued", "running"), target=f"item:{item.id}"):
            if job.id != ctx.job_id:
                jobs.request_cancel(s, job.id)


def _delete_replica_step(ctx: StepContext) -> None:
    if not ctx.payload.get("delete_replica"):
        ctx.report(100, "replica kept on the secondary")
        ctx.result["replica"] = "kept"
        return
    item_id = _item_id(ctx)
    with ctx.store.transaction() as s:
        item = items.get(s, item_id, lock=True)
        if item.secondary_host is None:
            ctx.result["replica"] = "none was placed"
            return
        host = item.secondary_host.name
        try:
            agent = agents.agent_for_host(s, host)
        except NotFound:
            raise Refused(f"cannot delete the replica of VM {item.vm.name}: no active agent on host {host}") from None
        disk_ids = disk_ids_of(item)
        task_id = _enqueue_or_reuse(ctx, s, item, "delete_replica_task", agent=agent, kind="delete_replica",
                                    params=build_params(DiskIdsParams, disk_ids=disk_ids),
                                    deadline=ctx.settings.task_deadline_seconds)
    ctx.report(10, f"deleting {len(disk_ids)} replica disk(s) on {host}")
    result = _wait_task(ctx, task_id, what="deleting the replica", timeout=ctx.settings.task_deadline_seconds + 60)
    with ctx.store.transaction() as s:
        items.update_details(s, item_id, replica_deleted=result.get("deleted", []))
    ctx.result.update(replica="deleted", deleted=result.get("deleted", []))


# ---------------------------------------------------------------- handlers


def handlers() -> dict[str, JobHandler]:
    """The job handlers of the protection operations, by job kind."""
    return {
        PROTECT: PROTECT_HANDLER,
        PAUSE: JobHandler([Step("pause replication", _pause_step)]),
        RESUME: JobHandler([Step("resume replication", _resume_step)]),
        REPLICATE_NOW: JobHandler([Step("request cycle", _replicate_now_step),
                                   Step("wait for the cycle", _wait_cycle_step)]),
        RESYNC: JobHandler([Step("start resynchronization", _resync_step),
                            Step("wait for resynchronization", _wait_resync_step)]),
        DISABLE: JobHandler([Step("disable protection", _disable_step), Step("delete replica", _delete_replica_step)]),
    }
