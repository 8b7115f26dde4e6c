"""Protected items: a VM, the pairing and policy protecting it, its lifecycle state,
health and replication progress.

The lifecycle's rules live in the domain state machine; the store keeps the state as a
string and changes it under a row lock, either checked against the state the caller
expects (`set_state`) or computed from the current one (`transition`, given the domain's
pure transition function).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased, joinedload, selectinload

from standby.domain import lifecycle
from standby.errors import BadInput, Conflict, NotFound, Refused
from standby.store.models import HEALTHS, Cloud, CloudPairing, Host, ProtectedItem, Vm
from standby.store.repo._common import get as _get
from standby.store.repo._common import now_or
from standby.store.repo.policies import is_associated

DISABLED = "disabled"


def create(
    session: Session,
    *,
    vm_id: int,
    pairing_id: int,
    policy_id: int,
    state: str = "ready",
    secondary_host_id: int | None = None,
    details: dict[str, Any] | None = None,
    next_cycle_at: datetime | None = None,
    now: datetime | None = None,
) -> ProtectedItem:
    """Protect a VM. A VM has one item; a disabled item of the same VM is replaced."""
    now = now_or(now)
    _get(session, Vm, vm_id, "VM")
    if not is_associated(session, policy_id, pairing_id):
        raise Refused(f"policy {policy_id} is not associated with pairing {pairing_id}")
    old = by_vm(session, vm_id)
    if old is not None:
        if old.state != DISABLED:
            raise Conflict(f"VM {vm_id} is already protected (item {old.id}, {old.state})")
        session.delete(old)
        session.flush()
    item = ProtectedItem(
        vm_id=vm_id,
        pairing_id=pairing_id,
        policy_id=policy_id,
        secondary_host_id=secondary_host_id,
        state=state,
        state_changed_at=now,
        health="normal",
        health_reason="",
        bytes_replicated=0,
        details=dict(details or {}),
        next_cycle_at=next_cycle_at,
        created_at=now,
        updated_at=now,
    )
    session.add(item)
    session.flush()
    return item


def get(session: Session, item_id: int, *, lock: bool = False) -> ProtectedItem:
    return _get(session, ProtectedItem, item_id, "protected item", lock=lock)


def shown(session: Session, item_id: int) -> ProtectedItem:
    """The item with what `api.deps.item_out` shows of its relations, in one query."""
    q = select(ProtectedItem).where(ProtectedItem.id == item_id).options(
        joinedload(ProtectedItem.vm).joinedload(Vm.host),
        joinedload(ProtectedItem.pairing).joinedload(CloudPairing.primary),
        joinedload(ProtectedItem.pairing).joinedload(CloudPairing.secondary),
        joinedload(ProtectedItem.policy),
        joinedload(ProtectedItem.secondary_host),
    )
    item = session.scalars(q).unique().one_or_none()
    if item is None:
        raise NotFound(f"protected item {item_id} does not exist")
    return item


def lock_many(session: Session, item_ids: Iterable[int]) -> dict[int, ProtectedItem]:
    """The items of `item_ids` that exist, locked for this transaction and refreshed (as
    `get(lock=True)`, in one query; rows locked in id order, as every batch does)."""
    ids = sorted(set(item_ids))
    if not ids:
        return {}
    q = (select(ProtectedItem).where(ProtectedItem.id.in_(ids)).order_by(ProtectedItem.id).with_for_update()
         .options(selectinload(ProtectedItem.policy)).execution_options(populate_existing=True))
    return {item.id: item for item in session.scalars(q)}


def by_vm(session: Session, vm_id: int) -> ProtectedItem | None:
    return session.scalars(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).one_or_none()


def list_items(
    session: Session,
    *,
    pairing_id: int | None = None,
    policy_id: int | None = None,
    states: Iterable[str] | None = None,
    health: str | None = None,
    cloud: str | None = None,
    host: str | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> list[ProtectedItem]:
    """Items in id order, filtered in the database; a page of `limit` after id `after`.
    Their VM, host, pairing's clouds, policy and secondary host come in a bounded number
    of queries (one per relation), not one per item."""
    q = select(ProtectedItem).order_by(ProtectedItem.id).options(
        selectinload(ProtectedItem.vm).selectinload(Vm.host),
        selectinload(ProtectedItem.pairing).selectinload(CloudPairing.primary),
        selectinload(ProtectedItem.pairing).selectinload(CloudPairing.secondary),
        selectinload(ProtectedItem.policy),
        selectinload(ProtectedItem.secondary_host),
    )
    if pairing_id is not None:
        q = q.where(ProtectedItem.pairing_id == pairing_id)
    if policy_id is not None:
        q = q.where(ProtectedItem.policy_id == policy_id)
    if states is not None:
        q = q.where(ProtectedItem.state.in_(list(states)))
    if health is not None:
        q = q.where(ProtectedItem.health == health)
    if cloud is not None:
        primary = aliased(Cloud)
        q = q.join(CloudPairing, CloudPairing.id == ProtectedItem.pairing_id).join(
            primary, primary.id == CloudPairing.primary_cloud_id).where(primary.name == cloud)
    if host is not None:
        q = q.join(Vm, Vm.id == ProtectedItem.vm_id).join(Host, Host.id == Vm.host_id).where(Host.name == host)
    if after is not None:
        q = q.where(ProtectedItem.id > after)
    if limit is not None:
        q = q.limit(limit)
    return list(session.scalars(q))


def set_state(
    session: Session,
    item_id: int,
    new_state: str,
    *,
    expected: str | Collection[str] | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> ProtectedItem:
    """Set the lifecycle state if the item is in `expected` (a state or a set of them);
    otherwise `Conflict` (someone moved it meanwhile). `error` is recorded (or cleared)."""
    item = get(session, item_id, lock=True)
    if expected is not None:
        allowed = {expected} if isinstance(expected, str) else set(expected)
        if item.state not in allowed:
            raise Conflict(f"protected item {item.id} is {item.state}, not {' or '.join(sorted(allowed))}")
    _apply_state(item, new_state, error, now_or(now))
    session.flush()
    return item


def transition(
    session: Session,
    item_id: int,
    next_state: Callable[[str], str],
    *,
    error: str | None = None,
    now: datetime | None = None,
) -> ProtectedItem:
    """Set the state to `next_state(current)`, the current state read under the row lock.
    `next_state` is the domain's pure transition function; what it raises propagates."""
    item = get(session, item_id, lock=True)
    _apply_state(item, next_state(item.state), error, now_or(now))
    session.flush()
    return item


def _apply_state(item: ProtectedItem, new_state: str, error: str | None, now: datetime) -> None:
    if not new_state or len(new_state) > 40:
        raise BadInput(f"{new_state!r} is not a lifecycle state")
    if new_state != item.state:
        item.state = new_state
        item.state_changed_at = now
        # Health starts as the new state's own, so state and reason never disagree until
        # the scheduler's next health tick refines it (RPO, agents, storage).
        known = _state_health(new_state)
        if known is not None:
            item.health, item.health_reason = known
    item.error = error
    item.updated_at = now


def _state_health(state: str) -> tuple[str, str] | None:
    try:
        parsed = lifecycle.State(state)
    except ValueError:
        return None
    return lifecycle.health(parsed).value, lifecycle.health_reason(parsed)


def set_health(
    session: Session, item_id: int, health: str, reason: str = "", *, now: datetime | None = None
) -> ProtectedItem:
    if health not in HEALTHS:
        raise BadInput(f"health {health!r} is not one of {', '.join(HEALTHS)}")
    item = get(session, item_id, lock=True)
    item.health = health
    item.health_reason = reason
    item.updated_at = now_or(now)
    session.flush()
    return item


def record_cycle(
    item: ProtectedItem,
    *,
    recovery_point_id: str,
    recovery_point_at: datetime,
    bytes_sent: int,
    next_cycle_at: datetime | None,
    rpo_seconds: float | None = None,
    now: datetime | None = None,
) -> None:
    """A replication cycle made a recovery point (the item locked in the caller's
    transaction): remember it, count the bytes, schedule the next cycle. `rpo_seconds`
    defaults to the age of the new point at `now`."""
    if bytes_sent < 0:
        raise BadInput("bytes_sent cannot be negative")
    now = now_or(now)
    # A point older than the one known (a report that arrives after a newer one) counts its
    # bytes but does not take the item's latest point back.
    if item.last_recovery_point_at is None or recovery_point_at >= item.last_recovery_point_at:
        item.last_recovery_point_id = recovery_point_id
        item.last_recovery_point_at = recovery_point_at
        item.rpo_seconds = (rpo_seconds if rpo_seconds is not None
                            else max(0.0, (now - recovery_point_at).total_seconds()))
    item.bytes_replicated += bytes_sent
    item.last_cycle_at = now
    item.next_cycle_at = next_cycle_at
    item.error = None
    item.updated_at = now


def schedule(
    session: Session, item_id: int, next_cycle_at: datetime | None, *, now: datetime | None = None
) -> ProtectedItem:
    """When the next cycle is due (None: not scheduled, e.g. paused)."""
    item = get(session, item_id, lock=True)
    item.next_cycle_at = next_cycle_at
    item.updated_at = now_or(now)
    session.flush()
    return item


def due(session: Session, *, now: datetime | None = None, limit: int = 500) -> list[ProtectedItem]:
    """Items whose next cycle is due, most overdue first (the scheduler's queue)."""
    now = now_or(now)
    q = (
        select(ProtectedItem)
        .where(ProtectedItem.next_cycle_at.is_not(None), ProtectedItem.next_cycle_at <= now)
        .order_by(ProtectedItem.next_cycle_at, ProtectedItem.id)
        .limit(limit)
    )
    return list(session.scalars(q))


def update_details(session: Session, item_id: int, *, now: datetime | None = None, **details: Any) -> ProtectedItem:
    """Merge keys into the item's agent-side details."""
    item = get(session, item_id, lock=True)
    item.details = {**item.details, **details}
    item.updated_at = now_or(now)
    session.flush()
    return item


def delete(session: Session, item_id: int) -> None:
    """Forget an item (its alerts stay, detached from it)."""
    item = get(session, item_id, lock=True)
    session.delete(item)
    session.flush()
