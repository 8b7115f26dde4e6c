"""What each agent should do: its desired state (`contract.DesiredState`), computed from the
store, and the notices that tell waiting agents it may have changed.

    state = desired_state(session, settings, agent)      # versioned by its content
    notifier.wait(since_generation, timeout)             # a long-poll's wait

An agent's desired state lists the items whose cycles it runs (the source side of the
lifecycle's replication direction: the primary's agent, or the secondary's during reverse
replication), each with `scheduler.cycle_plan`'s parameters and its policy's timing, the
replicas it holds as the target (their retention, for its own pruning) and the bandwidth
schedule of their pairings (the first one set; one schedule per agent).

Changes: `ChangeNotifier` counts commits that touched what desired states are made of
(an item's state, policy, hosts or replication flags; policies, pairings, network
mappings, agents' addresses, VMs' hosts), from SQLAlchemy's flush events on the store's
sessions, and wakes the long-polls; each agent's last answer is remembered until the next
such commit (`ChangeNotifier.remembered`). A report applying a cycle's point does not
count: it changes nothing an agent is told. With several API workers on PostgreSQL, a commit in
one is announced to the others with NOTIFY (`standby_desired`); each worker LISTENs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, inspect, select, union
from sqlalchemy.orm import Session, selectinload

from standby.contract import DesiredReplica, DesiredState, DesiredVm
from standby.domain.lifecycle import Site
from standby.orchestration import scheduler as sched
from standby.orchestration.settings import ServerSettings
from standby.store.db import Store
from standby.store.models import (
    Agent,
    CloudPairing,
    Host,
    NetworkMapping,
    Policy,
    PolicyPairing,
    ProtectedItem,
    Vm,
)
from standby.store.repo import inventory as inventory_repo

log = logging.getLogger("standby.desired")

# The item fields an agent's desired state is made of (a cycle's point is not one of them).
_ITEM_FIELDS = ("state", "policy_id", "secondary_host_id", "vm_id", "pairing_id")
_DETAIL_KEYS = ("force_hash_scan", "run_now", "replica_vm", "replica_disk_ids")
_ALWAYS = (Policy, CloudPairing, NetworkMapping, PolicyPairing)
NOTIFY_CHANNEL = "standby_desired"


def desired_state(session: Session, settings: ServerSettings, agent: Agent, now: datetime) -> DesiredState:
    """The agent's desired state now (see the module doc), with its version."""
    host = agent.host_name
    agents_by_host = sched.agents_by_host(session, settings, now)
    mappings = inventory_repo.network_mappings(session)
    # The agent's items by index (VMs on its hosts, replicas held there): a join filtered by
    # host name on either side would read every item of the store for each answer.
    host_ids = select(Host.id).where(Host.name == host).scalar_subquery()
    mine = union(select(ProtectedItem.id).join(Vm, Vm.id == ProtectedItem.vm_id).where(Vm.host_id.in_(host_ids)),
                 select(ProtectedItem.id).where(ProtectedItem.secondary_host_id.in_(host_ids)))
    q = (select(ProtectedItem)
         .where(ProtectedItem.id.in_(select(mine.subquery().c.id)))
         .order_by(ProtectedItem.id)
         .options(selectinload(ProtectedItem.vm).selectinload(Vm.host), selectinload(ProtectedItem.policy),
                  selectinload(ProtectedItem.secondary_host), selectinload(ProtectedItem.pairing)))
    vms: list[DesiredVm] = []
    replicas: list[DesiredReplica] = []
    bandwidth: str | None = None
    for item in session.scalars(q):
        state = sched._state(item.state)
        sites = sched.cycle_sites(state) if state is not None else None
        if state is None or sites is None:
            continue
        policy = item.policy
        hosts = {Site.PRIMARY: item.vm.host.name,
                 Site.SECONDARY: item.secondary_host.name if item.secondary_host is not None else None}
        released = item.last_recovery_point_id is not None or item.next_cycle_at is not None
        if hosts[sites[0]] == host and released:  # an offline seed in progress holds it back
            # the schedule of the pair this agent sends for (a host sends for one pair: its cloud's;
            # reverse replication uses the pair it came from)
            bandwidth = bandwidth or item.pairing.bandwidth_schedule
            plan = sched.cycle_plan(item, agents_by_host, now, mappings)
            if isinstance(plan, tuple):
                _source, params = plan
                start = (item.next_cycle_at.timestamp() if item.last_recovery_point_id is None
                         and item.next_cycle_at is not None and item.next_cycle_at > now else None)
                cycle = params.model_copy(update={"consistency": "auto"})  # the agent times app-consistent points
                vms.append(DesiredVm(item_id=item.id, state=state.value, cycle=cycle,
                                     copy_frequency_seconds=policy.copy_frequency_seconds,
                                     app_consistent_interval_hours=policy.app_consistent_interval_hours,
                                     run_now=int((item.details or {}).get("run_now") or 0), start_at=start))
        if hosts[sites[1]] == host and sched.should_prune(state):
            disk_ids = sorted((item.details or {}).get("disk_ids") or [])
            if disk_ids:
                replicas.append(DesiredReplica(item_id=item.id, disk_ids=disk_ids,
                                               retention_hours=policy.recovery_point_retention_hours,
                                               app_consistent_interval_hours=policy.app_consistent_interval_hours,
                                               keep_all_points_minutes=policy.keep_all_points_minutes))
    return DesiredState(agent=agent.name, vms=vms, replicas=replicas, bandwidth=bandwidth).with_version()


@dataclass(frozen=True)
class Rendered:
    """A desired state as answered: its version and its JSON. Remembered so, not as models:
    a fleet's worth of model objects made every full pass of the cyclic collector longer."""

    version: str
    body: bytes

    @classmethod
    def of(cls, state: DesiredState) -> Rendered:
        return cls(state.version, state.model_dump_json().encode())


def _relevant(session: Session) -> bool:
    """Whether this flush touches what desired states are made of."""
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, _ALWAYS):
            return True
        if isinstance(obj, ProtectedItem):
            if obj in session.new or obj in session.deleted:
                return True
            st = inspect(obj)
            for name in _ITEM_FIELDS:
                if st.attrs[name].history.has_changes():
                    return True
            hist = st.attrs["details"].history
            if hist.has_changes():
                before = (hist.deleted or [{}])[0] or {}
                after = (hist.added or [{}])[0] or {}
                if any(before.get(k) != after.get(k) for k in _DETAIL_KEYS):
                    return True
        elif isinstance(obj, Agent):
            st = inspect(obj)
            if obj in session.new or any(st.attrs[n].history.has_changes() for n in ("address", "state", "host_name")):
                return True
        elif isinstance(obj, Vm):
            if obj in session.new or inspect(obj).attrs["host_id"].history.has_changes():
                return True
    return False


class ChangeNotifier:
    """A generation counter bumped by commits that may change a desired state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0
        self._pg_notify: Any = None  # set by listen_postgres: NOTIFY to the other workers
        self._remembered: dict[int, tuple[int, float, Rendered]] = {}  # agent id -> (generation, when, answer)

    @property
    def current(self) -> int:
        return self.generation

    def bump(self, *, announce: bool = True) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()
        if announce and self._pg_notify is not None:
            try:
                self._pg_notify()
            except Exception:  # noqa: BLE001 - the other workers catch up at their next poll
                log.warning("NOTIFY %s failed", NOTIFY_CHANNEL, exc_info=True)

    def remembered(self, agent_id: int, generation: int, max_age: float, compute: Callable[[], Rendered]) -> Rendered:
        """The agent's desired state as computed at `generation` (read before computing:
        a commit during the computation moves it on) if not older than `max_age` seconds,
        else `compute()`, remembered. Long-polls that wake or time out with nothing changed
        answer from here instead of reading the agent's items again; `max_age` bounds how
        long what no commit here announces (another process's writes, the clock) goes unseen."""
        now = time.monotonic()
        with self._cond:
            hit = self._remembered.get(agent_id)
        if hit is not None and hit[0] == generation and now - hit[1] <= max_age:
            return hit[2]
        rendered = compute()
        with self._cond:
            self._remembered[agent_id] = (generation, now, rendered)
        return rendered

    def wait(self, since: int, timeout: float) -> int:
        """Wait until the generation moves past `since` (or `timeout`); the generation."""
        with self._cond:
            self._cond.wait_for(lambda: self.generation != since, timeout)
            return self.generation

    def install(self, store: Store) -> None:
        """Watch the store's write sessions: a commit that touched desired states bumps."""
        target = store.write_sessions

        def before_flush(session: Session, _ctx: Any, _instances: Any) -> None:
            if not session.info.get("standby_desired") and _relevant(session):
                session.info["standby_desired"] = True

        def after_commit(session: Session) -> None:
            if session.info.pop("standby_desired", False):
                self.bump()

        def after_rollback(session: Session) -> None:
            session.info.pop("standby_desired", None)

        self._listeners = [(target, "before_flush", before_flush), (target, "after_commit", after_commit),
                           (target, "after_rollback", after_rollback)]
        for t, name, fn in self._listeners:
            event.listen(t, name, fn)

    def uninstall(self) -> None:
        for t, name, fn in getattr(self, "_listeners", []):
            if event.contains(t, name, fn):
                event.remove(t, name, fn)
        self._listeners = []



class PgChangeRelay:
    """Several API workers on PostgreSQL: this worker's changes are announced with NOTIFY
    on `NOTIFY_CHANNEL`, and the others' wake this worker's long-polls (LISTEN, on a
    connection of its own). A notice may come back to the worker that sent it: a long-poll
    woken for nothing computes the same version and waits on."""

    def __init__(self, notifier: ChangeNotifier, store: Store) -> None:
        self.notifier = notifier
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.conninfo = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _notify(self) -> None:
        from sqlalchemy import text

        with self.store.engine.connect() as conn:
            conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
            conn.commit()

    def start(self) -> None:
        self.notifier._pg_notify = self._notify
        self._thread = threading.Thread(target=self._listen, name="standby-desired-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.notifier._pg_notify = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _listen(self) -> None:
        import psycopg

        backoff = 1.0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = 1.0
                    self.notifier.bump(announce=False)  # whatever changed while not listening
                    while not self._stop.is_set():
                        if any(True for _ in conn.notifies(timeout=1.0)):
                            self.notifier.bump(announce=False)
            except Exception as exc:  # noqa: BLE001 - the database may be away for a while
                log.warning("LISTEN %s: %s; again in %.0f s", NOTIFY_CHANNEL, type(exc).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
