"""The scheduler: what runs when (docs/control-plane.md, "Scheduler and health").

Each `tick` does, in short transactions of its own:

1. agents not heard from for `heartbeat_timeout` get a `heartbeat_lost` alert (critical);
   the alert clears on the agent's next heartbeat (or here, once it is no longer stale);
2. tasks past their deadline expire; an expired cycle counts as a failed cycle;
3. items whose next cycle is due, whose state replicates and that have no open cycle
   task get a `cycle` task for the agent of the host replication reads from; the item's
   `next_cycle_at` is cleared meanwhile (the cycle's result schedules the next one);
4. the health of every item not disabled is recomputed (`domain.health`), written only
   where it changed, and the item alerts (`rpo_breach`, `storage_low`,
   `resync_required`) are raised or cleared to match.

`apply_task_result` (called by the agent API in the transaction that records a task's
result, and by step 2) turns a finished cycle into the item's new recovery point, next
cycle, lifecycle transition and, when the policy keeps history, a `prune` task.

The decisions are small pure functions below (`consistency_for`, `next_cycle_after`,
`retry_at`, `needs_resync`, `summary_point_id`, `item_alerts` ...),
tested without a database. The health pass reads every item with its policy, VM and hosts
in one query and the agents and open alerts in one query each, so a tick costs a handful
of queries whatever the number of items.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, null, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from standby.domain import health as health_rules
from standby.domain import lifecycle
from standby.contract import CycleParams, CycleReport, params_of, parse_params, prune_params
from standby.domain.cycles import consistency_for, next_cycle_after, retry_at
from standby.domain.lifecycle import Event, ItemContext, Site, State
from standby.errors import BadInput, NotFound
from standby.orchestration import agents as agent_svc
from standby.orchestration.settings import ServerSettings
from standby.store.base import utcnow
from standby.store.db import Store
from standby.store.models import Agent, Alert, AgentTask, Host, Policy, ProtectedItem, Vm
from standby.store.repo import agents as agents_repo
from standby.store.repo import alerts, items, tasks
from standby.store.repo import inventory as inventory_repo

log = logging.getLogger(__name__)

CYCLE = "cycle"
PRUNE = "prune"
RPO_BREACH = "rpo_breach"
STORAGE_LOW = "storage_low"
RESYNC_REQUIRED = "resync_required"
ITEM_ALERT_KINDS = (RPO_BREACH, STORAGE_LOW, RESYNC_REQUIRED)
ALERT_SEVERITY = {RPO_BREACH: "warning", STORAGE_LOW: "warning", RESYNC_REQUIRED: "critical"}

SENDER_TIMEOUT_SECONDS = 60  # the sender's I/O timeout in a cycle task (`replicate --timeout`)
MISSING_AGENT_RETRY = 30.0  # an item whose agents are missing is looked at again after this
NOT_STARTED = "replication cycle not started"  # prefix of item.error when a cycle cannot be dispatched
AUTO_RESYNCS = 3  # integrity failures in a row resynchronized automatically; then the operator decides
DUE_BATCH = 500  # items dispatched per tick at most (the rest next tick)
ALERT_CHUNK = 100  # alerts raised or cleared per transaction
FINISHED_TASK_RETENTION = timedelta(days=1)
PURGE_EVERY = timedelta(minutes=10)
POINT_ID_MAX = 80  # ProtectedItem.last_recovery_point_id
# The health pass reads every item (tens of ms of CPU at 5,000): every 5th tick (5 s at the
# default tick), as RPO thresholds are minutes; dispatch and heartbeats stay every tick.
HEALTH_EVERY_TICKS = 5
HEALTH_CHUNK = 250  # items judged between pauses (a few ms of CPU) ...
HEALTH_PAUSE_S = 0.002  # ... so that requests do not wait behind the whole pass
REPORTS_REMEMBERED = 8  # cycle ids remembered per item: a report sent again is applied once
SCANS_REMEMBERED = 5  # hash-scan cycles remembered per item (details.scans: started_at, blocks, bytes_sent)


# ---------------------------------------------------------------- pure decisions


def item_subject(vm_name: str) -> str:
    return f"item:{vm_name}"


def _released(item: ProtectedItem, now: datetime) -> None:
    """An item whose agent owns its cycles: `next_cycle_at` says only that the protect job
    released it for cycles (a scheduled or offline initial replication holds it back); once
    it has a recovery point, the agent alone times it."""
    if item.last_recovery_point_id is not None:
        item.next_cycle_at = None
    elif item.next_cycle_at is None or item.next_cycle_at > now:
        item.next_cycle_at = item.next_cycle_at or now


def agents_by_host(s: Session, settings: ServerSettings, now: datetime) -> dict[str, _AgentView]:
    """The dispatching agent of each host (`agents.agent_for_host`: the newest active
    registration), with whether its heartbeat is current."""
    out: dict[str, _AgentView] = {}
    q = select(Agent).where(Agent.kind == "agent", Agent.state == "active").order_by(Agent.registered_at)
    for a in s.scalars(q):  # newest last: it wins
        out[a.host_name] = _AgentView(a.id, a.name, a.address, agent_svc.alive(a, settings, now),
                                      agent_svc.storage_free_fraction(a), agent_svc.owns_cycles(a))
    return out


def cycle_plan(item: ProtectedItem, agents_by_host: Mapping[str, _AgentView], now: datetime,
               mappings: Mapping[str, str], *, problems: bool = False) -> tuple[_AgentView, CycleParams] | str | None:
    """Who runs the item's next cycle and with what (the `cycle` task's parameters, and a
    desired VM's): (source agent, params); None when the item does not replicate now; the
    reason (a string) when it should but cannot, with `problems`."""
    state = _state(item.state)
    sites = cycle_sites(state) if state is not None else None
    if state is None or sites is None:
        return None
    hosts = {
        Site.PRIMARY: item.vm.host.name,
        Site.SECONDARY: item.secondary_host.name if item.secondary_host is not None else None,
    }
    source_host, target_host = hosts[sites[0]], hosts[sites[1]]
    problem = None
    source = agents_by_host.get(source_host) if source_host else None
    target = agents_by_host.get(target_host) if target_host else None
    if target_host is None:
        problem = "no secondary host is assigned to hold the replica"
    elif source is None:
        problem = f"no active agent is registered on host {source_host}"
    elif target is None:
        problem = f"no active agent is registered on host {target_host}"
    elif not target.address:
        problem = f"agent {target.name} on host {target_host} has no replication address"
    elif problems and not source.ok:
        problem = f"agent {source.name} on host {source_host} lost its heartbeat"
    elif problems and not target.ok:
        problem = f"agent {target.name} on host {target_host} lost its heartbeat"
    if problem is not None:
        return problem if problems else None
    assert source is not None and target is not None
    policy = item.policy
    details = item.details or {}
    force = state is State.RESYNCHRONIZING or bool(details.get("force_hash_scan"))
    vm, disk_ids = item.vm.name, None
    if sites[0] is Site.SECONDARY:
        # Reverse replication: the replica VM on the secondary sends to the old primary,
        # its disks named by the original disks' ids (the old disks adopted as the base).
        vm = str(details.get("replica_vm") or item.vm.name)
        if isinstance(details.get("replica_disk_ids"), dict):
            disk_ids = dict(details["replica_disk_ids"])
    fields: dict[str, Any] = dict(
        item_id=item.id, vm=vm, peer={"name": target.name, "address": target.address},
        consistency=consistency_for(policy.app_consistent_interval_hours,
                                    parse_time(details.get("last_app_consistent_at")), now),
        compress=bool(policy.compression), force_hash_scan=force, timeout_seconds=SENDER_TIMEOUT_SECONDS,
        recovery=recovery_params(item, mappings, reverse=sites[0] is Site.SECONDARY))
    if disk_ids is not None:
        fields["disk_ids"] = disk_ids
    try:
        return source, parse_params(CycleParams, fields)
    except BadInput as exc:  # what no agent would accept: this item's problem, not the whole tick's
        return exc.message if problems else None


def recovery_params(item: ProtectedItem, mappings: Mapping[str, str], *, reverse: bool = False) -> dict[str, Any]:
    """What a cycle's points carry for a failover without the control plane (the VM
    manifest, `domain.vm_point`): the network mapping in force for the VM's networks (the
    other way round when replicating back from the secondary) and the policy."""
    direction = {v: k for k, v in mappings.items()} if reverse else mappings
    nets = {n for n in inventory_repo.vm_networks(item.vm) if n}
    if reverse:  # the replica VM's NICs are on the secondary networks the mapping chose
        nets = {mappings[n] for n in nets if n in mappings}
    p = item.policy
    return {"network_map": {n: direction.get(n) for n in sorted(nets)},
            "policy": {"name": p.name, "copy_frequency_seconds": p.copy_frequency_seconds,
                       "retention_hours": p.recovery_point_retention_hours,
                       "app_consistent_interval_hours": p.app_consistent_interval_hours}}


def needs_resync(error_type: str | None, result: Mapping[str, Any] | None) -> bool:
    """Whether a failed cycle means the replica can no longer be trusted (a digest
    mismatch, broken change tracking): the item must be resynchronized."""
    if error_type == "IntegrityError":
        return True
    r = result or {}
    return bool(r.get("resync_required") or r.get("needs_resync"))


def summary_point_id(points: Mapping[str, str]) -> str | None:
    """One id for a VM's recovery point made of one point per disk: the newest disk point
    id (point ids sort by time), so the same cycle always gives the same id."""
    ids = [p for p in points.values() if isinstance(p, str) and p]
    if not ids:
        return None
    return max(ids)[:POINT_ID_MAX]


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from a task result (aware; naive means UTC), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def should_prune(state: State) -> bool:
    """A prune task follows every cycle unless a failover holds the points: the policy's
    retention (0 hours = the latest point only, as in the reference) is what bounds the
    replica's chain and its storage; the replica store removes nothing by itself."""
    return lifecycle.may_prune_recovery_points(state)


def cycle_sites(state: State) -> tuple[Site, Site] | None:
    """(source, target) sites of a cycle in this state, or None if no cycle runs."""
    target = lifecycle.replicates_to(state)
    if target is None:
        return None
    return (Site.SECONDARY if target is Site.PRIMARY else Site.PRIMARY), target


def resync_pending(state: State, details: Mapping[str, Any]) -> bool:
    """Whether the item's replica is known to need (or be under) a resynchronization
    that a failure forced: the resync_required alert stays open until it completes."""
    if state is State.RESYNC_REQUIRED:
        return True
    return state is State.RESYNCHRONIZING and bool(details.get("resync_reason"))


def item_alerts(
    state: State, found: list[health_rules.Finding], details: Mapping[str, Any]
) -> dict[str, str]:
    """The item alerts that should be open, kind -> message."""
    want: dict[str, str] = {}
    for f in found:
        if f.code in ("rpo_breach", "rpo_critical") and RPO_BREACH not in want:
            want[RPO_BREACH] = f.reason
        elif f.code == "storage_low":
            want[STORAGE_LOW] = f.reason
    if resync_pending(state, details):
        reason = details.get("resync_reason")
        want[RESYNC_REQUIRED] = f"resynchronization required: {reason}" if reason else "resynchronization required"
    return want


def _state(value: str) -> State | None:
    try:
        return State(value)
    except ValueError:
        return None


# ---------------------------------------------------------------- the scheduler


@dataclass
class TickReport:
    agents_stale: int = 0
    tasks_expired: int = 0
    cycles_dispatched: int = 0
    dispatch_skipped: int = 0
    items_checked: int = 0
    health_changed: int = 0
    alerts_raised: int = 0
    alerts_cleared: int = 0
    tasks_purged: int = 0


@dataclass(frozen=True)
class CycleOutcome:
    """A finished cycle, from a cycle task or from an agent's report: what applying it needs."""

    state: str  # succeeded, failed, expired or cancelled
    params: Mapping[str, Any]  # the cycle's parameters (force_hash_scan, consistency, disk_ids, peer)
    result: Mapping[str, Any]  # the cycle task's result shape: points, point_at, bytes_sent ...
    started: datetime
    error: str | None = None
    error_type: str | None = None
    schedules: bool = True  # the control plane times the next cycle (tasks); an agent that owns it does not
    prunes: bool = True  # the control plane orders the prune; an agent that owns its cycles prunes itself

    @classmethod
    def of_task(cls, task: AgentTask) -> CycleOutcome:
        return cls(task.state, dict(task.params or {}), dict(task.result or {}), task.claimed_at or task.created_at,
                   task.error, task.error_type)

    @classmethod
    def of_report(cls, report: CycleReport, *, reverse: bool = False) -> CycleOutcome:
        params: dict[str, Any] = {"force_hash_scan": report.scanned, "consistency": report.consistency}
        if reverse:
            params["disk_ids"] = True  # the replica's definition is not the source's
        return cls("succeeded" if report.ok else "failed", params, dict(report.result),
                   datetime.fromtimestamp(report.started_at, UTC), report.error, report.error_type,
                   schedules=False, prunes=False)


@dataclass(frozen=True)
class _AgentView:
    id: int
    name: str
    address: str | None
    ok: bool
    free_fraction: float | None
    owns_cycles: bool = False  # it runs its cycles on its own timers (its desired state): no cycle tasks


class Scheduler:
    """Runs `tick()` every `settings.tick_seconds` (`run`), or when a test calls it."""

    def __init__(self, store: Store, settings: ServerSettings, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._last_purge: datetime | None = None

    # ------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set. A failing tick is logged and the next one runs."""
        n = 0
        while not stop.is_set():
            try:
                self.tick(health=n % HEALTH_EVERY_TICKS == 0)
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad tick
                log.exception("scheduler tick failed")
            n += 1
            stop.wait(self.settings.tick_seconds)

    def tick(self, now: datetime | None = None, *, health: bool = True) -> TickReport:
        """One pass of everything (`health`: with the health and alerts of every item)."""
        now = now or self.clock()
        report = TickReport()
        self._agents_pass(now, report)
        self._expire_pass(now, report)
        self._dispatch_pass(now, report)
        if health:
            self._health_pass(now, report)
        self._purge_pass(now, report)
        return report

    # ------------------------------------------------------------ 1. agents

    def _agents_pass(self, now: datetime, report: TickReport) -> None:
        timeout = timedelta(seconds=self.settings.heartbeat_timeout)
        # Read first: most ticks change nothing and need not take the write lock.
        with self.store.read() as s:
            stale = {
                agent_svc.agent_subject(a.name): (a.id, a.name, a.host_name, a.last_heartbeat_at)
                for a in agents_repo.stale_agents(s, timeout=timeout, now=now)
                if not agent_svc.alive(a, self.settings, now)  # the grace after this control plane's start
            }
            open_subjects = set(
                s.scalars(
                    select(Alert.subject).where(Alert.kind == agent_svc.HEARTBEAT_LOST, Alert.cleared_at.is_(None))
                )
            )
        report.agents_stale = len(stale)
        to_raise = [subject for subject in stale if subject not in open_subjects]
        to_clear = open_subjects - set(stale)  # heard from again, or revoked
        if not (to_raise or to_clear):
            return
        with self.store.transaction() as s:
            for subject in to_raise:
                agent_id, name, host, last = stale[subject]
                seen = last.isoformat(timespec="seconds") if last is not None else "never"
                alerts.raise_alert(
                    s,
                    kind=agent_svc.HEARTBEAT_LOST,
                    severity="critical",
                    subject=subject,
                    message=f"agent {name} on host {host} has not sent a heartbeat since {seen}",
                    agent_id=agent_id,
                    now=now,
                )
            for subject in to_clear:
                alerts.clear_alert(s, kind=agent_svc.HEARTBEAT_LOST, subject=subject, now=now)
        report.alerts_raised += len(to_raise)
        report.alerts_cleared += len(to_clear)

    # ------------------------------------------------------------ 2. expiry

    def _expire_pass(self, now: datetime, report: TickReport) -> None:
        with self.store.read() as s:
            if not tasks.any_overdue(s, now):
                return
        with self.store.transaction() as s:
            expired = tasks.expire(s, now)
            report.tasks_expired = len(expired)
            for task in expired:
                # A result that cannot be applied must not undo the expiry of the others
                # (they would expire, fail and roll back again every tick).
                try:
                    with s.begin_nested():
                        self.apply_task_result(s, task, now)
                except Exception:  # noqa: BLE001
                    log.exception("task %s expired; applying it to item %s failed", task.id, task.item_id)

    # ------------------------------------------------------------ 3. dispatch

    def _dispatch_pass(self, now: datetime, report: TickReport) -> None:
        with self.store.read() as s:
            if not items.due(s, now=now, limit=1):
                return
        with self.store.transaction() as s:
            # items.due's queue, locked: a concurrent result for the same item waits
            # for this transaction (and sees the task it enqueued), and vice versa.
            due = list(
                s.scalars(
                    select(ProtectedItem)
                    .where(ProtectedItem.next_cycle_at.is_not(None), ProtectedItem.next_cycle_at <= now)
                    .order_by(ProtectedItem.next_cycle_at, ProtectedItem.id)
                    .limit(DUE_BATCH)
                    .with_for_update(skip_locked=True)
                    .options(
                        selectinload(ProtectedItem.vm).selectinload(Vm.host),
                        selectinload(ProtectedItem.policy),
                        selectinload(ProtectedItem.secondary_host),
                    )
                )
            )
            if not due:
                return
            busy = tasks.items_with_open_tasks(s, CYCLE)
            agents_by_host = self._agents_by_host(s, now)
            mappings = inventory_repo.network_mappings(s)
            new: list[tasks.NewTask] = []
            for item in due:
                if item.id in busy:
                    continue  # its running cycle's result schedules the next one
                task = self._cycle_task(item, agents_by_host, now, mappings)
                if task is None:
                    report.dispatch_skipped += 1
                else:
                    new.append(task)
            # One INSERT batch for the tick's tasks.
            tasks.enqueue_many(s, new, deadline_seconds=self.settings.task_deadline_seconds, now=now)
            report.cycles_dispatched = len(new)

    def _agents_by_host(self, s: Session, now: datetime) -> dict[str, _AgentView]:
        return agents_by_host(s, self.settings, now)

    def _cycle_task(
        self, item: ProtectedItem, agents_by_host: Mapping[str, _AgentView], now: datetime,
        mappings: Mapping[str, str] | None = None,
    ) -> tasks.NewTask | None:
        """The cycle task for a due item, its `next_cycle_at` cleared; or None, the item
        rescheduled (or taken off the queue) and `error` saying why. An item whose source
        agent runs its cycles itself (its desired state) gets no task: off the queue."""
        plan = cycle_plan(item, agents_by_host, now, mappings or {}, problems=True)
        if plan is None:
            # Not replicating (paused, failed over ...): off the queue until a job puts it back.
            item.next_cycle_at = None
            return None
        if isinstance(plan, str):
            item.error = f"{NOT_STARTED}: {plan}"
            item.next_cycle_at = now + timedelta(seconds=MISSING_AGENT_RETRY)
            item.updated_at = now
            return None
        source, params = plan
        if source.owns_cycles:
            _released(item, now)  # its agent times its cycles (desired state); no task
            return None
        item.next_cycle_at = None
        return tasks.NewTask(agent_id=source.id, kind=CYCLE, params=params_of(params), item_id=item.id)

    # ------------------------------------------------------------ 4. health and alerts

    def _health_pass(self, now: datetime, report: TickReport) -> None:
        primary_host = aliased(Host)
        secondary_host = aliased(Host)
        q = (
            select(
                ProtectedItem.id,
                ProtectedItem.state,
                ProtectedItem.health,
                ProtectedItem.health_reason,
                ProtectedItem.last_recovery_point_at,
                # details only where they matter (a forced resync): no JSON to parse for the rest
                case((ProtectedItem.state == State.RESYNCHRONIZING.value, ProtectedItem.details), else_=null()),
                Policy.copy_frequency_seconds,
                Policy.rpo_alert_seconds,
                Vm.name,
                primary_host.name,
                secondary_host.name,
            )
            .join(Policy, Policy.id == ProtectedItem.policy_id)
            .join(Vm, Vm.id == ProtectedItem.vm_id)
            .join(primary_host, primary_host.id == Vm.host_id)
            .outerjoin(secondary_host, secondary_host.id == ProtectedItem.secondary_host_id)
            .where(ProtectedItem.state != items.DISABLED)
        )
        with self.store.read() as s:
            rows = s.execute(q).all()
            agents_by_host = self._agents_by_host(s, now)
            open_alerts = {
                (kind, subject)
                for kind, subject in s.execute(
                    select(Alert.kind, Alert.subject).where(
                        Alert.cleared_at.is_(None), Alert.kind.in_(ITEM_ALERT_KINDS)
                    )
                )
            }
        report.items_checked = len(rows)
        changes: list[dict[str, Any]] = []
        wanted: dict[tuple[str, str], tuple[str, int]] = {}  # (kind, subject) -> (message, item id)
        for n, (item_id, raw_state, old_health, old_reason, point_at, details, freq, rpo_alert,
                vm_name, p_host, s_host) in enumerate(rows):
            if n and n % HEALTH_CHUNK == 0:
                time.sleep(HEALTH_PAUSE_S)  # let the API's threads have the interpreter between chunks
            state = _state(raw_state)
            if state is None:
                continue
            primary, secondary = agents_by_host.get(p_host), agents_by_host.get(s_host) if s_host else None
            rpo = (now - point_at).total_seconds() if point_at is not None else None
            found = health_rules.findings(
                state,
                rpo_seconds=rpo,
                copy_frequency_seconds=freq,
                rpo_alert_seconds=rpo_alert,
                primary_agent_ok=primary is not None and primary.ok,
                secondary_agent_ok=secondary is not None and secondary.ok,
                secondary_free_fraction=secondary.free_fraction if secondary is not None else None,
                storage_low_fraction=self.settings.storage_low_fraction,
            )
            if found:
                new_health, new_reason = found[0].health.value, found[0].reason
            else:
                new_health, new_reason = lifecycle.health(state).value, lifecycle.health_reason(state)
            if (new_health, new_reason) != (old_health, old_reason):
                changes.append({"id": item_id, "health": new_health, "health_reason": new_reason})
            for kind, message in item_alerts(state, found, details or {}).items():
                wanted[(kind, item_subject(vm_name))] = (message, item_id)
        to_raise = [k for k in wanted if k not in open_alerts]
        to_clear = [k for k in open_alerts if k not in wanted]
        if changes:
            with self.store.transaction() as s:
                # One executemany by primary key; only rows whose health changed.
                s.execute(update(ProtectedItem), changes)
            report.health_changed = len(changes)
        # Alerts in chunks: many at once (a site link down) must not hold the write lock
        # for long; each chunk is consistent on its own (an alert and its outbox rows).
        for i in range(0, len(to_raise), ALERT_CHUNK):
            with self.store.transaction() as s:
                for kind, subject in to_raise[i : i + ALERT_CHUNK]:
                    message, item_id = wanted[(kind, subject)]
                    alerts.raise_alert(
                        s, kind=kind, severity=ALERT_SEVERITY[kind], subject=subject, message=message,
                        item_id=item_id, now=now,
                    )
            report.alerts_raised += len(to_raise[i : i + ALERT_CHUNK])
        for i in range(0, len(to_clear), ALERT_CHUNK):
            with self.store.transaction() as s:
                for kind, subject in to_clear[i : i + ALERT_CHUNK]:
                    alerts.clear_alert(s, kind=kind, subject=subject, now=now)
            report.alerts_cleared += len(to_clear[i : i + ALERT_CHUNK])

    # ------------------------------------------------------------ 5. housekeeping

    def _purge_pass(self, now: datetime, report: TickReport) -> None:
        if self._last_purge is not None and now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        with self.store.transaction() as s:
            report.tasks_purged = tasks.purge_finished(s, before=now - FINISHED_TASK_RETENTION)

    # ------------------------------------------------------------ task results

    def apply_task_result(self, session: Session, task: AgentTask, now: datetime) -> None:
        """What a finished task means for its item (in the caller's transaction). Only
        cycle tasks change an item; other kinds are read by whoever enqueued them."""
        if task.kind != CYCLE or task.item_id is None or task.is_open:
            return
        try:
            item = items.get(session, task.item_id, lock=True)
        except NotFound:
            return  # the item was deleted while its cycle ran
        self._apply(session, item, CycleOutcome.of_task(task), now)

    def apply_cycle_reports(self, session: Session, reports: Iterable[CycleReport], now: datetime) -> tuple[int, int]:
        """Cycles an agent ran on its own timers (its desired state), in the caller's
        transaction, oldest first: the same consequences as a cycle task's result, except
        that the next cycle is the agent's to time and the prune its to run. (applied,
        ignored): a report applied before (a batch sent again) or whose item is gone is
        ignored. The batch's items are locked and read in one query."""
        batch = sorted(reports, key=lambda r: r.finished_at)
        locked = items.lock_many(session, (r.item_id for r in batch))
        applied = 0
        for report in batch:
            item = locked.get(report.item_id)
            if item is not None and self._apply_report(session, item, report, now):
                applied += 1
        return applied, len(batch) - applied

    def _apply_report(self, session: Session, item: ProtectedItem, report: CycleReport, now: datetime) -> bool:
        details = dict(item.details or {})
        seen = list(details.get("reported_cycles") or [])
        if report.cycle_id in seen:
            return False
        details["reported_cycles"] = (seen + [report.cycle_id])[-REPORTS_REMEMBERED:]
        # what a "replicate now" job waits for: a cycle that started after its request
        details["last_report"] = {"cycle_id": report.cycle_id, "started_at": report.started_at,
                                  "finished_at": report.finished_at, "ok": report.ok,
                                  "error": (report.error or "")[:500] or None,
                                  "bytes_sent": report.result.get("bytes_sent")}
        item.details = details
        self._apply(session, item, CycleOutcome.of_report(report, reverse=_state(item.state) is State.REVERSE_REPLICATING),
                    now)
        return True

    def _apply(self, s: Session, item: ProtectedItem, outcome: CycleOutcome, now: datetime) -> None:
        if outcome.state == "succeeded":
            self._cycle_succeeded(s, item, outcome, now)
        elif outcome.state in ("failed", "expired"):
            self._cycle_failed(s, item, outcome, now)
        else:  # cancelled: nothing was made; the next cycle is due as scheduled
            if item.next_cycle_at is None and self._replicates(item) and outcome.schedules:
                item.next_cycle_at = retry_at(item.policy.copy_frequency_seconds, now)

    @staticmethod
    def _replicates(item: ProtectedItem) -> bool:
        state = _state(item.state)
        return state is not None and lifecycle.is_replicating(state)

    def _cycle_succeeded(self, s: Session, item: ProtectedItem, o: CycleOutcome, now: datetime) -> None:
        result = o.result
        points = result.get("points") if isinstance(result.get("points"), dict) else {}
        point_id = summary_point_id(points or {})
        started = o.started
        policy = item.policy
        if point_id is None:  # "ok" with nothing committed: not a recovery point
            self._record_failure(s, item, "the cycle reported success but no disk committed a point", None, {},
                                 now, schedules=o.schedules)
            return
        point_at = parse_time(result.get("point_at")) or started
        bytes_sent = result.get("bytes_sent")
        items.record_cycle(
            item,
            recovery_point_id=point_id,
            recovery_point_at=point_at,
            bytes_sent=bytes_sent if isinstance(bytes_sent, int) and bytes_sent >= 0 else 0,
            next_cycle_at=next_cycle_after(started, policy.copy_frequency_seconds, now) if o.schedules else None,
            now=now,
        )
        details = dict(item.details or {})
        details["disk_ids"] = sorted(points)
        details["points_made"] = int(details.get("points_made") or 0) + 1  # every point this control plane heard of
        if isinstance(result.get("domain_xml"), str) and result["domain_xml"] and "disk_ids" not in o.params:
            # The source VM's configuration as of this point: a failover defines the replica from it.
            details["domain_xml"] = result["domain_xml"]
        scanned = bool(o.params.get("force_hash_scan"))
        if scanned:  # a cycle queued before a resync was asked for does not count as one
            details.pop("force_hash_scan", None)
            details.pop("auto_resyncs", None)
            # what a resynchronization step reports (a task's or an agent's own cycle alike)
            blocks = sum(int((d.get("result") or {}).get("data_blocks") or 0)
                         for d in result.get("disks") or [] if isinstance(d, dict))
            sent = result.get("bytes_sent")
            details["scans"] = [*(details.get("scans") or []),
                                {"started_at": started.isoformat(), "blocks": blocks,
                                 "bytes_sent": sent if isinstance(sent, int) else 0}][-SCANS_REMEMBERED:]
        details.pop("failed_cycles", None)
        if o.params.get("consistency") == "app" or result.get("consistency") == "app":
            details["last_app_consistent_at"] = point_at.isoformat()
        event = {
            State.INITIAL_REPLICATION: Event.INITIAL_REPLICATION_COMPLETED,
            State.RESYNCHRONIZING: Event.RESYNC_COMPLETED,
            State.REVERSE_REPLICATING: Event.REVERSE_REPLICATION_COMPLETED,
        }.get(_state(item.state))  # type: ignore[arg-type]
        if event is Event.RESYNC_COMPLETED and not scanned:
            event = None
        if event is not None:
            self._transition(s, item, event)
            if event is Event.RESYNC_COMPLETED:
                details.pop("resync_reason", None)
            if event is Event.REVERSE_REPLICATION_COMPLETED:
                details["reverse_in_sync"] = True
        item.details = details
        if not self._replicates(item):
            item.next_cycle_at = None  # paused (or failed over) while the cycle ran
        state = _state(item.state)
        if state is not None and should_prune(state) and o.prunes:
            self._enqueue_prune(s, item, o, details["disk_ids"], now)

    def _enqueue_prune(self, s: Session, item: ProtectedItem, cycle: CycleOutcome, disk_ids: list[str],
                       now: datetime) -> None:
        if tasks.open_task_for_item(s, item.id, PRUNE) is not None:
            return  # one prune at a time: the open one prunes up to now
        peer = cycle.params.get("peer") or {}
        try:
            target = agents_repo.get_agent(s, str(peer.get("name")))
        except NotFound:
            log.warning("item %s: no agent %r to prune recovery points on", item.id, peer.get("name"))
            return
        if target.state != "active":
            return
        policy = item.policy
        tasks.enqueue(
            s,
            agent_id=target.id,
            kind=PRUNE,
            params=prune_params(disk_ids, policy.recovery_point_retention_hours,
                                policy.app_consistent_interval_hours, policy.keep_all_points_minutes),
            item_id=item.id,
            deadline_seconds=self.settings.task_deadline_seconds,
            now=now,
        )

    def _cycle_failed(self, s: Session, item: ProtectedItem, o: CycleOutcome, now: datetime) -> None:
        error = o.error or "the replication cycle failed"
        if o.state == "expired":
            error = f"the agent did not finish the replication cycle by its deadline ({error})"
        self._record_failure(s, item, error, o.error_type, o.result, now, schedules=o.schedules)

    def _record_failure(self, s: Session, item: ProtectedItem, error: str, error_type: str | None,
                        result: Mapping[str, Any], now: datetime, *, schedules: bool = True) -> None:
        details = dict(item.details or {})
        details["failed_cycles"] = int(details.get("failed_cycles", 0)) + 1
        item.error = error
        if needs_resync(error_type, result):
            details["force_hash_scan"] = True
            state = _state(item.state)
            if state is not None and Event.CYCLE_FAILED_NEEDS_RESYNC in lifecycle.allowed_events(state):
                details["resync_reason"] = error
                self._transition(s, item, Event.CYCLE_FAILED_NEEDS_RESYNC)
                # Start the resynchronization at once (the next cycle scans every block),
                # unless automatic ones keep failing: then it waits for the operator.
                tries = int(details.get("auto_resyncs", 0))
                if tries >= AUTO_RESYNCS:
                    error = (f"{error} (automatic resynchronization failed {tries} times in a row: "
                             "resynchronize once the cause is fixed)")
                elif Event.RESYNC_STARTED in lifecycle.allowed_events(State(item.state)):
                    details["auto_resyncs"] = tries + 1
                    self._transition(s, item, Event.RESYNC_STARTED)
            item.error = error  # transitions reset the error field
        item.details = details
        if schedules:
            item.next_cycle_at = retry_at(item.policy.copy_frequency_seconds, now) if self._replicates(item) else None
        else:
            _released(item, now)
        item.updated_at = now

    @staticmethod
    def _transition(s: Session, item: ProtectedItem, event: Event) -> None:
        """Apply a lifecycle event under the item's row lock, if it still applies to the
        state found there (an operator may have moved the item while the cycle ran)."""
        ctx = ItemContext(vm=item.vm.name)
        s.flush()  # the row is read again under the lock: unflushed changes would be lost

        def next_state(current: str) -> str:
            cur = _state(current)
            if cur is None or event not in lifecycle.allowed_events(cur, ctx):
                return current
            return lifecycle.transition(cur, event, ctx).value

        items.transition(s, item.id, next_state, error=item.error)
