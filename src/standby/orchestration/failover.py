"""Failover operations: the jobs that drive `domain.failover` workflows with agent tasks.

    item_id, job_id = start_test_failover(store, runner, item="web01", network="isolated")
    item_id, job_id = cleanup_test_failover(store, runner, item="web01", notes="app answered")
    item_id, job_id = start_failover(store, runner, item="web01", type="planned")
    item_id, job_id = commit_failover(store, runner, item="web01")
    item_id, job_id = reverse_replicate(store, runner, item="web01")
    item_id, job_id = failback(store, runner, item="web01")

Each job has one runner step that loops `domain.failover.next_action` over the
`RunState` kept in the job's payload (`payload["run"]`): the step is persisted as running
(`begin`) before it acts, and as done together with its lifecycle events (`finish`) in
one transaction. A control plane killed in the middle leaves the job running; the next
runner requeues it (`jobs.recover_at_startup`) and `next_action` decides, from the
persisted rows alone, whether the interrupted step runs again or a rollback finishes.
The agent tasks a step hands out are recorded in the payload with the step, so a
resumed step waits for the same task (a task that failed meanwhile is handed out again).

Ops map to agent tasks (docs/recovery.md, "Wiring"): stop_vm / start_vm / define_vm /
undefine_vm, materialize / release, create_network / delete_network, list_points,
adopt_disk / restore_disk and `cycle` (a final sync of the last changes, or, for reverse
replication and the forward resync after a failback, cycles the scheduler dispatches).
The VM never runs on both sites: the workflow's order (the source stopped before the
target starts; a rollback stops the target before the source starts again) is what the
job follows, step by step.

Per-step seconds and bytes moved are in the job's result (`steps`), also when it fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.domain import lifecycle
from standby.domain.failover import (
    Action,
    ActionKind,
    Done,
    FailoverOptions,
    Kind,
    Op,
    Outcome,
    RunState,
    TestNetwork,
    begin,
    check_start,
    fail,
    finish,
    next_action,
    request_cancel,
    workflow,
)
from standby.domain.lifecycle import Event, Site, State
from standby.domain.recovery_points import (
    DiskPoint,
    PointChoice,
    choose_point,
    disk_points_from_listing,
    point_of_cycle,
)
from standby.errors import BadInput, NotFound, Refused, RemoteError, StandbyError
from standby.orchestration import agents as agents_svc
from standby.orchestration.protection import item_context, resolve_item
from standby.contract import (AdoptDiskParams, CycleParams, DefineVmParams, DiskIdsParams, MaterializeParams,
                              NamedParams, PruneParams, ReleaseParams, RestoreDiskParams, StartVmParams, StopVmParams,
                              VmParams, build_params, disk_id_for)
from standby.orchestration.runner import JobCancelled, JobHandler, JobRunner, RunnerStopping, Step, StepContext
from standby.orchestration.scheduler import SENDER_TIMEOUT_SECONDS, parse_time
from standby.store import Store
from standby.store.base import utcnow
from standby.store.models import Agent, Job, Network, ProtectedItem
from standby.store.repo import agents, inventory, items, jobs, tasks
from standby.store.states import JobState

__all__ = [
    "FAILOVER_JOB_KINDS",
    "cancel_failover",
    "cleanup_test_failover",
    "commit_failover",
    "failback",
    "handlers",
    "replica_vm_name",
    "reverse_replicate",
    "start_failover",
    "start_test_failover",
    "test_vm_name",
]

log = logging.getLogger("standby.failover")

FAILOVER_JOB_KINDS = tuple(k.value for k in Kind)
MATERIALIZE_ATTEMPTS = 3   # a point chosen by rule, pruned before materialize pinned it: chosen again
STOP_TIMEOUT = 120.0        # a guest shutdown, forced off after this (stop_vm's timeout_seconds)
FENCE_DEADLINE = 300.0      # an unplanned failover waits this long for an unreachable source
QUIESCE_TIMEOUT = 120.0     # an agent running its own cycles has this long to say it stopped a VM's
RESYNC_TIMEOUT = 24 * 3600.0
OPEN = ("queued", "claimed")
# Events the scheduler records itself when a cycle succeeds: the step records them only
# if they still apply (the scheduler may have been first).
SCHEDULER_EVENTS = frozenset({Event.RESYNC_COMPLETED, Event.REVERSE_REPLICATION_COMPLETED})


# ---------------------------------------------------------------- names


def replica_vm_name(prefix: str, vm: str) -> str:
    return f"{prefix}{vm}"


def test_vm_name(prefix: str, vm: str) -> str:
    return f"{prefix}{vm}-test"


test_vm_name.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _prefix(agent: Agent) -> str:
    # The agent reports its agent.json `vm_prefix` in its heartbeat (kept under "reported").
    facts = agent.facts or {}
    reported = facts.get("reported") or {}
    return str(reported.get("vm_prefix") or facts.get("vm_prefix") or "")


def _disk_map(item: ProtectedItem) -> dict[str, str]:
    """{target: replica disk id} of the item's VM (the original disks' ids)."""
    return {t: disk_id_for(item.vm.name, t) for t in sorted(item.vm.disks or {})}


# ---------------------------------------------------------------- public operations


def _busy_job(s: Session, item_id: int) -> Job | None:
    q = (select(Job).where(Job.target == f"item:{item_id}", Job.kind.in_(FAILOVER_JOB_KINDS),
                           Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])).limit(1))
    return s.scalars(q).first()


def _create(store: Store, runner: JobRunner, kind: Kind, ref: int | str, options: FailoverOptions,
            created_by: str | None, extra_check: Any = None, **payload: Any) -> tuple[int, int]:
    wf = workflow(kind, options)
    with store.transaction() as s:
        item = resolve_item(s, ref, lock=True)
        busy = _busy_job(s, item.id)
        if busy is not None:
            raise Refused(f"VM {item.vm.name} has a {busy.kind} job running (job {busy.id}): wait for it to end")
        if extra_check is not None:
            extra_check(s, item)
        if any(ev for st in wf.steps for ev in st.events):
            check_start(wf, State(item.state), item_context(item))
        state = RunState.start(wf)
        job = runner.create_job(s, kind=kind.value, target=f"item:{item.id}", created_by=created_by,
                                payload={"item_id": item.id, "vm": item.vm.name, "run": state.to_json(),
                                         "extra": {}, **payload})
        return item.id, job.id


def start_test_failover(store: Store, runner: JobRunner, *, item: int | str, point: str = "latest",
                        network: str = "isolated", network_name: str | None = None,
                        created_by: str | None = None) -> tuple[int, int]:
    """A test failover (one per VM at a time): the point as a copy-on-write overlay, the
    test VM `<prefix><vm>-test` started on the secondary; replication keeps running."""
    opts = FailoverOptions(point=point or "latest", network=network, network_name=network_name)  # type: ignore[arg-type]
    return _create(store, runner, Kind.TEST_FAILOVER, item, opts, created_by)


def cleanup_test_failover(store: Store, runner: JobRunner, *, item: int | str, notes: str = "",
                          created_by: str | None = None) -> tuple[int, int]:
    """Remove the test VM, its network and overlay; the notes go to the job's result and
    the item's details (`last_test_failover`)."""
    with store.read() as s:
        row = resolve_item(s, item)
        test = (row.details or {}).get("test_failover") or {}
        if not (row.details or {}).get("test_failover_active"):
            raise Refused(f"VM {row.vm.name} has no test failover to clean up")
    opts = FailoverOptions(network=test.get("network", "isolated"), network_name=test.get("network_name"),
                           notes=notes or "")
    return _create(store, runner, Kind.TEST_CLEANUP, item, opts, created_by)


def start_failover(store: Store, runner: JobRunner, *, item: int | str, type: str,  # noqa: A002
                   point: str | None = None, shutdown_source: bool = True,
                   created_by: str | None = None) -> tuple[int, int]:
    """A planned (zero data loss; refused until initial replication completed) or
    unplanned failover (`point`: latest, latest_processed, latest_app_consistent or an
    id; `shutdown_source`: try to shut the source down and sync first)."""
    if type == "planned":
        if point not in (None, "", PointChoice.LATEST.value):
            raise BadInput(f"point: a planned failover fails over to the point of its final sync, not {point!r} "
                           "(use an unplanned failover to choose a point)")
        return _create(store, runner, Kind.PLANNED_FAILOVER, item, FailoverOptions(), created_by)
    if type == "unplanned":
        opts = FailoverOptions(point=point or PointChoice.LATEST.value, shutdown_and_sync=bool(shutdown_source))
        return _create(store, runner, Kind.UNPLANNED_FAILOVER, item, opts, created_by)
    raise BadInput(f"type: {type!r} is not planned or unplanned")


def commit_failover(store: Store, runner: JobRunner, *, item: int | str,
                    created_by: str | None = None) -> tuple[int, int]:
    """Commit a failover: older recovery points may go (pruned down to the failed-over one)."""
    return _create(store, runner, Kind.COMMIT, item, FailoverOptions(), created_by)


def _check_cancel(s: Session, item: ProtectedItem) -> None:
    lifecycle.transition(State(item.state), Event.CANCEL_FAILOVER, item_context(item))


def cancel_failover(store: Store, runner: JobRunner, *, item: int | str,
                    created_by: str | None = None) -> tuple[int, int]:
    """Undo a completed, uncommitted failover: the replica stopped and removed, the source
    started again (replication stays paused)."""
    return _create(store, runner, Kind.CANCEL, item, FailoverOptions(), created_by, extra_check=_check_cancel)


def reverse_replicate(store: Store, runner: JobRunner, *, item: int | str,
                      created_by: str | None = None) -> tuple[int, int]:
    """Replicate from the replica VM back to the old primary, the old disks as the base
    (a hash scan first: only differing blocks move)."""
    return _create(store, runner, Kind.REVERSE_REPLICATION, item, FailoverOptions(), created_by)


def failback(store: Store, runner: JobRunner, *, item: int | str,
             created_by: str | None = None) -> tuple[int, int]:
    """Return to the primary: replica stopped, last changes synced and restored onto the
    original disks, original VM started, forward replication resumed by hash scan."""
    return _create(store, runner, Kind.FAILBACK, item, FailoverOptions(), created_by)


# ---------------------------------------------------------------- the job


class _Run:
    """One job's workflow: the state, the step extras, and how each Op is done."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.item_id = int(ctx.payload["item_id"])
        self.state = RunState.from_json(ctx.payload["run"])
        self.extra: dict[str, Any] = dict(ctx.payload.get("extra") or {})
        self.extra.setdefault("tasks", {})
        self.extra.setdefault("steps", {})
        self.wf = self.state.workflow

    # ---------------------------------------------------------- persistence

    def _write(self, s: Session) -> None:
        job = jobs.get(s, self.ctx.job_id, lock=True)
        job.payload = {**(job.payload or {}), "run": self.state.to_json(), "extra": self.extra}
        s.flush()

    def persist(self, events: tuple[Event, ...] = ()) -> None:
        with self.store.transaction() as s:
            for ev in events:
                self._record(s, ev)
            self._write(s)

    def _record(self, s: Session, event: Event) -> None:
        item = items.get(s, self.item_id, lock=True)
        ctx = item_context(item)
        current = State(item.state)
        if event in SCHEDULER_EVENTS and event not in lifecycle.allowed_events(current, ctx):
            return  # the scheduler recorded it (the cycle's result) first
        items.transition(s, item.id, lambda cur: lifecycle.transition(State(cur), event, ctx).value)
        details = dict(item.details or {})
        if event is Event.TEST_FAILOVER_STARTED:
            details["test_failover_active"] = True
            details["test_failover"] = {**self.extra.get("test", {}), "job": self.ctx.job_id}
        elif event is Event.TEST_FAILOVER_CLEANED_UP:
            last = {**(details.get("test_failover") or {}), "cleaned_up_at": utcnow().isoformat(),
                    "cleanup_job": self.ctx.job_id, "notes": self.wf.options.notes}
            details["test_failover_active"] = False
            details.pop("test_failover", None)
            details["last_test_failover"] = last
        elif event is Event.FAILOVER_COMPLETED:
            details["failover"] = {**self.extra.get("failover", {}), "job": self.ctx.job_id}
        elif event is Event.CANCEL_FAILOVER:
            details.pop("failover", None)
        elif event is Event.FAILBACK_COMPLETED:
            details.pop("replica_vm", None)
            details.pop("replica_disk_ids", None)
            details["reverse_in_sync"] = False
        if event in (Event.PLANNED_FAILOVER_STARTED, Event.UNPLANNED_FAILOVER_STARTED, Event.FAILBACK_STARTED):
            item.next_cycle_at = None  # switching: no cycles but the job's own
        item.details = details
        s.flush()

    def save_result(self, done: Done | None) -> dict[str, Any]:
        steps = []
        total = restored = 0
        for st, rec in zip(self.wf.steps, self.state.records, strict=True):
            info = self.extra["steps"].get(st.name, {})
            total += int(info.get("bytes", 0) or 0)
            restored += int(info.get("bytes_restored", 0) or 0)
            steps.append({"name": st.name, "status": rec.status.value, "attempts": rec.attempts,
                          "seconds": info.get("seconds"), "bytes": info.get("bytes", 0), "error": rec.error,
                          "undo_error": rec.undo_error, **({"note": info["note"]} if info.get("note") else {}),
                          **({"bytes_restored": info["bytes_restored"]} if info.get("bytes_restored") else {})})
        # bytes_moved: what crossed the network between the sites; bytes_restored: what a
        # failback wrote from the local replica into the VM's own disk on the same host.
        result: dict[str, Any] = {"kind": self.wf.kind.value, "item_id": self.item_id, "steps": steps,
                                  "bytes_moved": total, "bytes_restored": restored}
        if done is not None:
            result.update(outcome=done.outcome.value, message=done.message, failed=list(done.failed))
        for key in ("point", "replica_vm", "test_vm", "notes", "declared_lost"):
            if key in self.extra:
                result[key] = self.extra[key]
        with self.store.transaction() as s:
            job = jobs.get(s, self.ctx.job_id, lock=True)
            job.result = result
            s.flush()
        return result

    # ---------------------------------------------------------- loop

    def run(self) -> None:
        while True:
            if not self.state.cancel_requested and self.ctx.cancel_requested():
                self.state = request_cancel(self.state)
                self.persist()
            a = next_action(self.state)
            if isinstance(a, Done):
                break
            if self.ctx.runner.stopping:
                raise RunnerStopping()
            self.state = begin(self.state, a)
            self.persist()
            self.ctx.report(int(100 * a.index / max(len(self.wf.steps), 1)),
                            ("undo: " if a.kind is ActionKind.UNDO else "") + a.label)
            started = time.monotonic()
            try:
                if a.kind is not ActionKind.SKIP:
                    self.perform(a)
            except (RunnerStopping, JobCancelled):
                raise
            except StandbyError as e:
                log.warning("job %d (%s): %s failed: %s", self.ctx.job_id, self.wf.kind, a.label, e.message)
                self._timing(a, started)
                self.state = fail(self.state, a, e.message or type(e).__name__)
                self.persist()
                continue
            self._timing(a, started)
            self.state = finish(self.state, a)
            self.persist(a.events)
        result = self.save_result(a)
        self.ctx.result.update(result)
        if a.outcome is Outcome.COMPLETED:
            return
        if a.outcome is Outcome.CANCELLED:
            raise JobCancelled()
        raise Refused(a.message, details={"failed": list(a.failed)})

    def _timing(self, a: Action, started: float) -> None:
        info = self.extra["steps"].setdefault(a.step, {})
        key = "undo_seconds" if a.kind is ActionKind.UNDO else "seconds"
        info[key] = round(float(info.get(key) or 0) + time.monotonic() - started, 3)

    def _add_bytes(self, a: Action, n: int, *, key: str = "bytes") -> None:
        info = self.extra["steps"].setdefault(a.step, {})
        info[key] = int(info.get(key, 0) or 0) + max(0, int(n or 0))

    def _note(self, a: Action, note: str) -> None:
        self.extra["steps"].setdefault(a.step, {})["note"] = note

    # ---------------------------------------------------------- agents and tasks

    def _agent(self, s: Session, site: Site) -> Agent:
        item = items.get(s, self.item_id)
        if site is Site.PRIMARY:
            host = item.vm.host.name
        else:
            if item.secondary_host is None:
                raise Refused(f"VM {item.vm.name} has no secondary host")
            host = item.secondary_host.name
        try:
            return agents.agent_for_host(s, host)
        except NotFound:
            raise Refused(f"no active agent on host {host} ({site})") from None

    def task(self, a: Action, site: Site, kind: str, params: dict[str, Any], *, key: str = "",
             deadline: float | None = None, item_task: bool = False) -> dict[str, Any]:
        """Hand a task to the site's agent (or reuse the one this step recorded, unless it
        ended without success) and wait for its result."""
        tkey = f"{a.index}:{a.kind.value}:{kind}:{key}"
        deadline = deadline or self.ctx.settings.task_deadline_seconds
        with self.store.transaction() as s:
            task_id = self.extra["tasks"].get(tkey)
            if task_id is not None:
                try:
                    old = tasks.get(s, int(task_id))
                    if old.state not in OPEN and old.state != "succeeded":
                        task_id = None
                except NotFound:
                    task_id = None
            if task_id is None:
                agent = self._agent(s, site)
                t = tasks.enqueue(s, agent_id=agent.id, kind=kind, params=params,
                                  item_id=self.item_id if item_task else None, job_id=self.ctx.job_id,
                                  deadline_seconds=deadline)
                task_id = t.id
                self.extra["tasks"][tkey] = task_id
                self._write(s)
        return self.wait_task(int(task_id), f"{kind} on the {site}", deadline + 60)

    def wait_task(self, task_id: int, what: str, timeout: float) -> dict[str, Any]:
        # Not ctx.wait_until: a cancel request must not interrupt a rollback's undo.
        end = time.monotonic() + timeout
        while True:
            with self.store.read() as s:
                t = tasks.get(s, task_id)
                state, result, error, etype = t.state, dict(t.result or {}), t.error, t.error_type
                agent = s.get(Agent, t.agent_id)
                who = agent.name if agent is not None else f"agent {t.agent_id}"
            if state == "succeeded":
                return result
            if state not in OPEN:
                kind = f" ({etype})" if etype else ""
                raise RemoteError(f"{what} {state} on {who}: {error or 'no reason given'}{kind}",
                                  details={"error_type": etype} if etype else None)
            if time.monotonic() > end:
                raise RemoteError(f"gave up waiting for {what} after {timeout:g} s")
            if self.ctx.runner.wait_stopping(self.ctx.settings.tick_seconds):
                raise RunnerStopping()

    def _item(self) -> dict[str, Any]:
        """Plain values of the item for building task parameters."""
        with self.store.read() as s:
            item = items.get(s, self.item_id)
            primary, secondary = self._agent_or_none(s, Site.PRIMARY), self._agent_or_none(s, Site.SECONDARY)
            mappings = inventory.network_mappings(s)
            nets = [mappings.get(net) if net else None for net in inventory.vm_networks(item.vm)]
            return {"vm": item.vm.name, "state": item.state, "details": dict(item.details or {}),
                    "disk_map": _disk_map(item), "disk_paths": _disk_paths(item), "networks": nets,
                    "primary": _agent_view(primary), "secondary": _agent_view(secondary),
                    "compress": bool(item.policy.compression)}

    def _agent_or_none(self, s: Session, site: Site) -> Agent | None:
        # An unplanned failover goes on without the primary's agent.
        try:
            return self._agent(s, site)
        except Refused:
            return None

    # ---------------------------------------------------------- ops

    def perform(self, a: Action) -> None:
        op = a.op
        assert op is not None
        site = a.site
        it = self._item()
        vm = it["vm"]
        replica = replica_vm_name(it["secondary"]["prefix"], vm)
        test_vm = test_vm_name(it["secondary"]["prefix"], vm)
        self.extra.setdefault("test", {})
        if op is Op.RECORD:
            if self.wf.kind is Kind.TEST_FAILOVER and a.kind is ActionKind.DO:
                self.extra["test"].update(vm=test_vm, tag=f"test-{self.item_id}",
                                          network=self.wf.options.network.value,
                                          network_name=self._test_network_name())
            return
        if op is Op.CHOOSE_POINT:
            self._choose_point(a, it)
        elif op in (Op.MATERIALIZE_OVERLAY, Op.MATERIALIZE_TEST_OVERLAY):
            test = op is Op.MATERIALIZE_TEST_OVERLAY
            point = self.extra.get("point")
            if not point:
                raise Refused("no recovery point was chosen")
            tag = f"test-{self.item_id}" if test else f"failover-{self.item_id}"
            for attempt in range(1, MATERIALIZE_ATTEMPTS + 1):
                try:
                    res = self.task(a, Site.SECONDARY, "materialize",
                                    build_params(MaterializeParams, vm=vm, disk_ids=it["disk_map"],
                                                 point=point["disks"], purpose="test" if test else "failover",
                                                 tag=tag))
                    break
                except RemoteError as e:
                    # Replication goes on during a test failover, and retention may prune the
                    # point chosen (not pinned yet) in between: a point chosen by rule is
                    # chosen again; one the operator named is not replaced.
                    pruned = e.details.get("error_type") == NotFound.__name__
                    if attempt == MATERIALIZE_ATTEMPTS or not self._rechoosable() or not pruned:
                        raise
                    self._note(a, f"point {point['id']} went before it was pinned; choosing again")
                    self._choose_point(a, it, key=f"again-{attempt}")
                    point = self.extra["point"]
            overlays = dict(res.get("overlays") or {})
            if test:
                self.extra["test"].update(overlays=overlays, tag=tag)
            else:
                self.extra["failover"] = {"tag": tag, "overlays": overlays, "replica_vm": replica,
                                          "point": point}
                self.extra["replica_vm"] = replica
        elif op in (Op.DELETE_OVERLAY, Op.DELETE_TEST_OVERLAY):
            test = op is Op.DELETE_TEST_OVERLAY
            tag = f"test-{self.item_id}" if test else f"failover-{self.item_id}"
            self.task(a, Site.SECONDARY, "release", build_params(ReleaseParams, tag=tag))
        elif op is Op.CREATE_TEST_NETWORK:
            self.task(a, Site.SECONDARY, "create_network", build_params(NamedParams, name=self._test_network_name()))
        elif op is Op.DELETE_TEST_NETWORK:
            self.task(a, Site.SECONDARY, "delete_network", build_params(NamedParams, name=self._test_network_name()))
        elif op is Op.CHECK_TEST_NETWORK:
            name = self.wf.options.network_name
            with self.store.read() as s:
                if s.scalars(select(Network).where(Network.name == name)).first() is None:
                    raise NotFound(f"test network {name!r} is not a known network of the secondary site")
        elif op is Op.DEFINE_TEST_VM:
            xml = it["details"].get("domain_xml")
            if not xml:
                raise Refused(f"no domain XML of VM {vm} has been replicated yet (the next cycle carries it)")
            n = max(1, len(it["networks"]))
            mode = self.wf.options.network
            net_name = self._test_network_name()
            self.task(a, Site.SECONDARY, "define_vm", build_params(
                DefineVmParams, name=test_vm, template_xml=xml, disks=self._overlays(test=True),
                networks=[None if mode is TestNetwork.NONE else net_name] * n,
                isolated_network=net_name if mode is TestNetwork.ISOLATED else None))
            self.extra["test_vm"] = test_vm
        elif op is Op.START_TEST_VM:
            self.task(a, Site.SECONDARY, "start_vm",
                      build_params(StartVmParams, name=test_vm, timeout_seconds=STOP_TIMEOUT))
        elif op is Op.STOP_TEST_VM:
            self.task(a, Site.SECONDARY, "stop_vm",
                      build_params(StopVmParams, name=test_vm, timeout_seconds=STOP_TIMEOUT))
        elif op is Op.UNDEFINE_TEST_VM:
            self.task(a, Site.SECONDARY, "undefine_vm",
                      build_params(VmParams, name=test_vm, timeout_seconds=STOP_TIMEOUT))
        elif op is Op.RECORD_NOTES:
            self.extra["notes"] = self.wf.options.notes
        elif op in (Op.SHUT_DOWN_VM, Op.STOP_VM, Op.START_VM, Op.FENCE_SOURCE):
            assert site is not None
            self._power(a, op, site, vm, replica)
        elif op is Op.DEFINE_VM:
            assert site is not None
            if site is Site.SECONDARY:
                xml = it["details"].get("domain_xml")
                if not xml:
                    raise Refused(f"no domain XML of VM {vm} has been replicated yet (the next cycle carries it)")
                self.task(a, Site.SECONDARY, "define_vm",
                          build_params(DefineVmParams, name=replica, template_xml=xml,
                                       disks=self._overlays(test=False), networks=it["networks"]))
            else:
                # Failback: the primary keeps the VM's definition; its own disks get the
                # last point the final sync committed to the primary.
                committed = self.extra.get("committed") or {}
                for target, disk_id in it["disk_map"].items():
                    path = it["disk_paths"].get(target)
                    if not path:
                        raise Refused(f"VM {vm}: the inventory has no image path for disk {target}")
                    res = self.task(a, Site.PRIMARY, "restore_disk",
                                    build_params(RestoreDiskParams, disk_id=disk_id, point=committed.get(disk_id),
                                                 image=path),
                                    key=disk_id)
                    self._add_bytes(a, int(res.get("bytes", 0) or 0), key="bytes_restored")
        elif op is Op.UNDEFINE_VM:
            assert site is not None
            self.task(a, site, "undefine_vm", build_params(VmParams, name=replica if site is Site.SECONDARY else vm,
                                                           timeout_seconds=STOP_TIMEOUT))
        elif op is Op.FINAL_SYNC:
            self._final_sync(a, it, replica)
        elif op is Op.RELEASE_POINTS:
            point = (it["details"].get("failover") or {}).get("point") or {}
            res = self.task(a, Site.SECONDARY, "prune",
                            build_params(PruneParams, disk_ids=sorted(it["disk_map"].values()), retention_hours=0,
                                         app_consistent_interval_hours=0, keep=point.get("disks", {})))
            self._note(a, f"released {sum(len(v) for v in (res.get('removed') or {}).values())} older point(s)")
        elif op is Op.PREPARE_REVERSE_REPLICA:
            self._prepare_reverse(a, it, replica)
        elif op is Op.PREPARE_FORWARD_REPLICA:
            self._prepare_forward(a, it)
        elif op is Op.RESYNC:
            self._resync(a)
        else:  # pragma: no cover - every Op of domain.failover is handled above
            raise BadInput(f"operation {op} is not implemented")

    def _test_network_name(self) -> str | None:
        o = self.wf.options
        if o.network is TestNetwork.EXISTING:
            return o.network_name
        if o.network is TestNetwork.NONE:
            return None
        stored = (self.extra.get("test") or {}).get("network_name")
        if stored:
            return str(stored)
        if self.wf.kind is Kind.TEST_CLEANUP:
            with self.store.read() as s:
                t = (items.get(s, self.item_id).details or {}).get("test_failover") or {}
                if t.get("network_name"):
                    return str(t["network_name"])
        return f"sb-test-{self.item_id}"

    def _overlays(self, *, test: bool) -> dict[str, str]:
        src = self.extra.get("test" if test else "failover") or {}
        overlays = src.get("overlays")
        if not overlays:
            raise Refused("no overlay was materialized")
        return dict(overlays)

    def _power(self, a: Action, op: Op, site: Site, vm: str, replica: str) -> None:
        name = vm if site is Site.PRIMARY else replica
        if op is Op.START_VM:
            # the VM starts with its host again as it did before the switch (if it did)
            autostart = bool(self._autostart_was().get(name))
            self.task(a, site, "start_vm",
                      build_params(StartVmParams, name=name, timeout_seconds=STOP_TIMEOUT, autostart=autostart))
            return
        # A VM stopped for a switch must not start again with its host (a site that comes
        # back after a disaster would run it beside its replica): autostart off.
        if op is Op.SHUT_DOWN_VM and self.wf.kind is Kind.UNPLANNED_FAILOVER:
            self._source_must_answer(site)  # the optional "try to shut down": no wait on a lost site
        if op is not Op.FENCE_SOURCE:
            self._stopped(self.task(a, site, "stop_vm", build_params(
                StopVmParams, name=name, disable_autostart=True, timeout_seconds=STOP_TIMEOUT)), name)
            return
        # Power off if the source answers, else record it as lost (the operator's declaration).
        if not self._source_answers(site):
            self.extra["declared_lost"] = True
            self._note(a, f"the {site} agent is unreachable: the source is declared lost (its agent fences it "
                          "if its site comes back)")
            return
        deadline = float(self.ctx.payload.get("fence_timeout") or FENCE_DEADLINE)
        try:
            self._stopped(self.task(a, site, "stop_vm", build_params(
                StopVmParams, name=name, disable_autostart=True, timeout_seconds=min(STOP_TIMEOUT, deadline)),
                deadline=deadline), name)
        except RemoteError as e:
            self.extra["declared_lost"] = True
            self._note(a, f"the source did not power off ({e.message}): declared lost")

    def _source_must_answer(self, site: Site) -> None:
        if not self._source_answers(site):
            raise RemoteError(f"the {site} agent does not answer (its site may be lost): skipped, the failover "
                              "goes on from the secondary's latest recovery point")

    def _source_answers(self, site: Site) -> bool:
        """Whether the source's agent is heard from by this control plane. A heartbeat from
        before this control plane became active (a promotion after a site loss) proves
        nothing: it waits up to two heartbeat intervals for a fresh one, then says no."""
        settings = self.ctx.settings
        end = time.monotonic() + 2 * float(settings.heartbeat_seconds or 10.0)
        while True:
            with self.store.read() as s:
                try:
                    agent = self._agent(s, site)
                except Refused:
                    return False
                seen = agent.last_heartbeat_at or agent.registered_at
            if seen is None or (utcnow() - seen).total_seconds() > settings.heartbeat_timeout:
                return False
            if seen >= settings.started_at:
                return True
            if time.monotonic() > end:
                return False
            if self.ctx.runner.wait_stopping(0.5):
                raise RunnerStopping()

    def _autostart_was(self) -> dict[str, bool]:
        with self.store.read() as s:
            return dict((items.get(s, self.item_id).details or {}).get("autostart_was") or {})

    def _stopped(self, result: dict[str, Any], name: str) -> None:
        """Remember a VM's autostart setting the first time a switch turns it off."""
        if result.get("autostart_was") is None or name in self._autostart_was():
            return
        with self.store.transaction() as s:
            item = items.get(s, self.item_id, lock=True)
            details = dict(item.details or {})
            details["autostart_was"] = {**(details.get("autostart_was") or {}), name: bool(result["autostart_was"])}
            item.details = details

    def _rechoosable(self) -> bool:
        """The point was chosen by a rule (latest ...), not named, nor a final sync's."""
        return self.wf.options.point in {c.value for c in PointChoice} and not (
            self.extra.get("point") or {}).get("how") == "final sync"

    def _choose_point(self, a: Action, it: dict[str, Any], key: str = "") -> None:
        disk_ids = sorted(it["disk_map"].values())
        res = self.task(a, Site.SECONDARY, "list_points", build_params(DiskIdsParams, disk_ids=disk_ids), key=key)
        points = _disk_points(res.get("points") or {})
        committed = self.extra.get("committed")
        # A planned failover takes its final sync's point (zero loss); an unplanned one only
        # when the operator asked for the latest: an older point chosen stays chosen.
        takes_sync = self.wf.kind is Kind.PLANNED_FAILOVER or (
            self.wf.kind is Kind.UNPLANNED_FAILOVER and self.wf.options.point == PointChoice.LATEST.value)
        if committed and takes_sync:
            p = point_of_cycle(points, committed, disks=disk_ids)   # zero loss: the final sync's point
            chosen = {"id": p.id, "disks": dict(p.disks), "created_at": p.created_at, "how": "final sync"}
        else:
            sel = choose_point(points, self.wf.options.point, now=time.time(), disks=disk_ids)
            chosen = {"id": sel.point.id, "disks": dict(sel.point.disks), "created_at": sel.point.created_at,
                      "how": sel.choice, "age_seconds": sel.age_seconds}
            if sel.wait_for_newer:
                self._note(a, f"newer cycle(s) on some disks only ({', '.join(sel.newer_partial)}): not chosen")
        self.extra["point"] = chosen

    def _quiesce_cycles(self) -> None:
        """Cycles the scheduler queued before the switch: cancelled, and waited for."""
        with self.store.transaction() as s:
            for t in tasks.list_tasks(s, item_id=self.item_id, kind="cycle", states=OPEN):
                if t.job_id != self.ctx.job_id:
                    tasks.cancel(s, t.id)

        def others_open() -> bool:
            with self.store.read() as s:
                return any(t.job_id != self.ctx.job_id
                           for t in tasks.list_tasks(s, item_id=self.item_id, kind="cycle", states=OPEN))

        end = time.monotonic() + self.ctx.settings.task_deadline_seconds + 60
        while others_open():
            if time.monotonic() > end:
                raise RemoteError("a replication cycle that was running did not end")
            if self.ctx.runner.wait_stopping(self.ctx.settings.tick_seconds):
                raise RunnerStopping()
        # An agent that runs its own cycles stops this VM's when its desired state no longer
        # lists it; it says so in its reports (a cycle in flight ends first).
        end = time.monotonic() + QUIESCE_TIMEOUT
        while True:
            with self.store.read() as s:
                item = items.get(s, self.item_id)
                since = item.state_changed_at or item.updated_at
                source = self._cycle_source(s, item)
                if source is None or not agents_svc.owns_cycles(source) \
                        or agents_svc.replication_stopped(source, self.item_id, since):
                    return
            if time.monotonic() > end:
                log.warning("item %s: agent %s did not report its cycles stopped within %.0f s; going on (its "
                            "next cycle of this VM waits for the VM's lock)", self.item_id, source.name,
                            QUIESCE_TIMEOUT)
                return
            if self.ctx.runner.wait_stopping(self.ctx.settings.tick_seconds):
                raise RunnerStopping()

    def _cycle_source(self, s: Session, item: ProtectedItem) -> Agent | None:
        """The agent that ran the item's cycles before the switch (None: gone)."""
        site = Site.SECONDARY if self.wf.kind in (Kind.FAILBACK,) else Site.PRIMARY
        try:
            return self._agent(s, site)
        except Refused:
            return None

    def _final_sync(self, a: Action, it: dict[str, Any], replica: str) -> None:
        source = a.site
        assert source is not None
        if self.wf.kind is Kind.UNPLANNED_FAILOVER:
            self._source_must_answer(source)
        self._quiesce_cycles()
        if source is Site.PRIMARY:
            peer, vm = it["secondary"], it["vm"]
            disk_ids = None
        else:  # failback: from the replica VM to the primary, naming the original disks
            peer, vm = it["primary"], replica
            disk_ids = it["details"].get("replica_disk_ids") or it["disk_map"]
        if not peer.get("address"):
            raise Refused(f"agent {peer['name']} has no replication address")
        params = build_params(CycleParams, item_id=self.item_id, vm=vm,
                              peer={"name": peer["name"], "address": peer["address"]}, consistency="crash",
                              compress=it["compress"], force_hash_scan=False,
                              timeout_seconds=SENDER_TIMEOUT_SECONDS, final_sync=True, disk_ids=disk_ids)
        res = self.task(a, source, "cycle", params, item_task=True)
        committed = res.get("points") if isinstance(res.get("points"), dict) else {}
        if not committed:
            raise RemoteError("the final sync committed no recovery point")
        self.extra["committed"] = dict(committed)
        self._add_bytes(a, int(res.get("bytes_sent", 0) or 0))

    def _prepare_reverse(self, a: Action, it: dict[str, Any], replica: str) -> None:
        # The old disks on the old primary become the base of a replica of the original
        # disk ids: the first reverse cycle compares hashes against them.
        for target, disk_id in it["disk_map"].items():
            path = it["disk_paths"].get(target)
            if not path:
                raise Refused(f"VM {it['vm']}: the inventory has no image path for disk {target}")
            res = self.task(a, Site.PRIMARY, "adopt_disk", build_params(AdoptDiskParams, disk_id=disk_id, image=path),
                            key=disk_id)
            self._add_bytes(a, 0)
            self.extra.setdefault("adopted", {})[disk_id] = res.get("point_id")
        with self.store.transaction() as s:
            items.update_details(s, self.item_id, replica_vm=replica, replica_disk_ids=it["disk_map"],
                                 force_hash_scan=True, reverse_in_sync=False)
            self._write(s)

    def _prepare_forward(self, a: Action, it: dict[str, Any]) -> None:
        failover = it["details"].get("failover") or {}
        overlays = failover.get("overlays") or {}
        for target, disk_id in it["disk_map"].items():
            image = overlays.get(target)
            if not image:
                raise Refused(f"VM {it['vm']}: no overlay of disk {target} is known on the secondary")
            self.task(a, Site.SECONDARY, "adopt_disk", build_params(AdoptDiskParams, disk_id=disk_id, image=image),
                      key=disk_id)
        if failover.get("tag"):
            self.task(a, Site.SECONDARY, "release", build_params(ReleaseParams, tag=failover["tag"]))
        with self.store.transaction() as s:
            item = items.get(s, self.item_id, lock=True)
            details = dict(item.details or {})
            details.pop("failover", None)
            details["force_hash_scan"] = True
            item.details = details
            s.flush()

    def _resync(self, a: Action) -> None:
        """Let the scheduler run the item's cycles with a forced hash scan first; done when
        one succeeded (reverse: in sync; forward: protected again). Bytes: those cycles'."""
        info = self.extra["steps"].setdefault(a.step, {})
        since = info.get("since")
        if since is None:
            since = utcnow().isoformat()
            info["since"] = since
            self.persist()
        since_t = parse_time(since)
        reverse = self.wf.kind is Kind.REVERSE_REPLICATION
        with self.store.transaction() as s:
            item = items.get(s, self.item_id, lock=True)
            if lifecycle.is_replicating(State(item.state)) and tasks.open_task_for_item(s, item.id, "cycle") is None \
                    and item.next_cycle_at is None:
                items.schedule(s, item.id, utcnow())
        end = time.monotonic() + float(self.ctx.payload.get("resync_timeout") or RESYNC_TIMEOUT)
        while True:
            with self.store.read() as s:
                item = items.get(s, self.item_id)
                state, details = State(item.state), dict(item.details or {})
            # hash-scan cycles that started since this step did (a task's, or the agent's own)
            scans = [sc for sc in details.get("scans") or []
                     if since_t is not None and (parse_time(sc.get("started_at")) or since_t) >= since_t]
            moved = sum(int(sc.get("bytes_sent") or 0) for sc in scans)
            blocks = sum(int(sc.get("blocks") or 0) for sc in scans)
            done = (details.get("reverse_in_sync") if reverse else state is State.PROTECTED) and scans
            if done:
                info["bytes"] = moved
                info["blocks"] = blocks
                where = "the primary" if reverse else "the secondary"
                self._note(a, f"{blocks} block(s) differed and were sent to {where} (the other blocks already "
                              "matched: no full copy); writes the old copy made after its last point are "
                              "overwritten")
                return
            if reverse and state is not State.REVERSE_REPLICATING:
                raise Refused(f"reverse replication stopped: the item is {state.value}")
            if not reverse and state not in (State.RESYNCHRONIZING, State.RESYNC_REQUIRED, State.PROTECTED):
                raise Refused(f"the forward resynchronization stopped: the item is {state.value}")
            if time.monotonic() > end:
                raise RemoteError("gave up waiting for the resynchronization")
            if self.ctx.runner.wait_stopping(self.ctx.settings.tick_seconds):
                raise RunnerStopping()


def _agent_view(agent: Agent | None) -> dict[str, Any]:
    if agent is None:
        return {"name": None, "address": None, "prefix": ""}
    return {"name": agent.name, "address": agent.address, "prefix": _prefix(agent)}


def _disk_paths(item: ProtectedItem) -> dict[str, str]:
    out = {}
    for target, d in (item.vm.disks or {}).items():
        if isinstance(d, Mapping) and d.get("path"):
            out[target] = str(d["path"])
    return out


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    t = parse_time(value)
    if t is None:
        raise RemoteError(f"a recovery point's created_at {value!r} is not a time")
    return t.timestamp()


def _disk_points(listing: Mapping[str, Any]) -> list[DiskPoint]:
    # list_points gives ISO 8601 times; the domain reads epoch seconds.
    rows = {d: [{**r, "created_at": _epoch(r.get("created_at"))} for r in (v or [])] for d, v in listing.items()}
    return disk_points_from_listing(rows)


def _run_step(ctx: StepContext) -> None:
    _Run(ctx).run()


def _ended(ctx: StepContext, state: JobState, error: str) -> None:
    """A job that errored (a bug) or was stopped: its open tasks are withdrawn."""
    if state is JobState.CANCELLED:
        return
    with ctx.store.transaction() as s:
        for t in tasks.list_tasks(s, job_id=ctx.job_id, states=OPEN, limit=1000):
            if t.kind != "cycle":
                tasks.cancel(s, t.id)


def handlers() -> dict[str, JobHandler]:
    """The job handlers of the failover family, by job kind."""
    return {k: JobHandler([Step("run workflow", _run_step)], resumable=True, on_end=_ended)
            for k in FAILOVER_JOB_KINDS}

