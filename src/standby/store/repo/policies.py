"""Replication policies, cloud pairings, policy-to-pairing associations and network
mappings: the operator's intent. Values are checked here with clear messages (the
database's CHECK constraints are the backstop)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from standby.errors import BadInput, Conflict, NotFound
from standby.store.models import (
    AUTHENTICATIONS,
    COPY_FREQUENCIES,
    INITIAL_REPLICATION,
    KEEP_ALL_POINTS_MAX_MINUTES,
    CloudPairing,
    NetworkMapping,
    Policy,
    PolicyPairing,
    ProtectedItem,
)
from standby.store.repo._common import by_name, fields, get, now_or
from standby.store.repo.inventory import get_cloud, get_network

POLICY_FIELDS = frozenset(
    {
        "description",
        "copy_frequency_seconds",
        "recovery_point_retention_hours",
        "app_consistent_interval_hours",
        "compression",
        "authentication",
        "replication_port",
        "initial_replication",
        "initial_replication_at",
        "offline_export_path",
        "offline_import_path",
        "delete_replica_on_disable",
        "rpo_alert_seconds",
        "keep_all_points_minutes",
    }
)


def _check_policy(p: Policy) -> None:
    problems = []
    if p.copy_frequency_seconds not in COPY_FREQUENCIES:
        problems.append(
            f"copy frequency {p.copy_frequency_seconds} s is not one of 30, 300 or 900 s (or 0 for continuous)"
        )
    if p.recovery_point_retention_hours < 0:
        problems.append("recovery point retention cannot be negative")
    if p.app_consistent_interval_hours < 0:
        problems.append("the app-consistent snapshot interval cannot be negative")
    if p.authentication not in AUTHENTICATIONS:
        problems.append(f"authentication {p.authentication!r} is not one of {', '.join(AUTHENTICATIONS)}")
    if not 1 <= p.replication_port <= 65535:
        problems.append(f"replication port {p.replication_port} is not between 1 and 65535")
    if p.initial_replication not in INITIAL_REPLICATION:
        problems.append(f"initial replication {p.initial_replication!r} is not one of {', '.join(INITIAL_REPLICATION)}")
    if p.initial_replication == "scheduled" and p.initial_replication_at is None:
        problems.append("a scheduled initial replication needs its start time")
    if p.initial_replication == "offline" and not (p.offline_export_path and p.offline_import_path):
        problems.append("an offline initial replication needs the export and import paths")
    if p.rpo_alert_seconds is not None and (isinstance(p.rpo_alert_seconds, bool) or p.rpo_alert_seconds <= 0):
        problems.append(f"the RPO alert threshold {p.rpo_alert_seconds!r} s must be a positive number of seconds")
    keep_all = p.keep_all_points_minutes
    if isinstance(keep_all, bool) or not isinstance(keep_all, int) or not 0 <= keep_all <= KEEP_ALL_POINTS_MAX_MINUTES:
        problems.append(f"keep_all_points_minutes {keep_all!r} must be a whole number of minutes "
                        f"between 0 and {KEEP_ALL_POINTS_MAX_MINUTES}")
    if problems:
        raise BadInput(f"policy {p.name!r}: " + "; ".join(problems))


def create_policy(session: Session, name: str, *, now: datetime | None = None, **settings: Any) -> Policy:
    """A policy; unspecified settings take the reference's defaults (see `Policy`)."""
    unknown = set(settings) - POLICY_FIELDS
    if unknown:
        raise BadInput(f"unknown policy settings: {', '.join(sorted(unknown))}")
    if session.scalars(select(Policy.id).where(Policy.name == name)).first() is not None:
        raise Conflict(f"policy {name!r} exists already")
    now = now_or(now)
    policy = Policy(name=name, created_at=now, updated_at=now)
    for col in Policy.__table__.columns:  # Python-side defaults, so the checks see them
        if col.name in POLICY_FIELDS and col.default is not None and col.name not in settings:
            setattr(policy, col.name, col.default.arg)  # type: ignore[union-attr]
    fields(policy, **settings)
    _check_policy(policy)
    session.add(policy)
    session.flush()
    return policy


def update_policy(session: Session, name: str, *, now: datetime | None = None, **changes: Any) -> Policy:
    unknown = set(changes) - POLICY_FIELDS
    if unknown:
        raise BadInput(f"unknown policy settings: {', '.join(sorted(unknown))}")
    policy = get_policy(session, name)
    fields(policy, **changes)
    _check_policy(policy)
    policy.updated_at = now_or(now)
    session.flush()
    return policy


def get_policy(session: Session, name: str) -> Policy:
    return by_name(session, Policy, name, "policy")


def list_policies(session: Session) -> list[Policy]:
    return list(session.scalars(select(Policy).order_by(Policy.name)))


def _items_using(session: Session, *, policy_id: int | None = None, pairing_id: int | None = None) -> int:
    q = select(func.count()).select_from(ProtectedItem)
    if policy_id is not None:
        q = q.where(ProtectedItem.policy_id == policy_id)
    if pairing_id is not None:
        q = q.where(ProtectedItem.pairing_id == pairing_id)
    return session.scalar(q) or 0


def delete_policy(session: Session, name: str) -> None:
    policy = get_policy(session, name)
    n = _items_using(session, policy_id=policy.id)
    if n:
        raise Conflict(f"policy {name!r} protects {n} item(s): disable their protection first")
    session.delete(policy)
    session.flush()


# ---------------------------------------------------------------- pairings


def pair_clouds(session: Session, primary: str, secondary: str, bandwidth: str | None = None) -> CloudPairing:
    if primary == secondary:
        raise BadInput(f"cloud {primary!r} cannot be paired with itself")
    p, s = get_cloud(session, primary), get_cloud(session, secondary)
    existing = pairing_of_primary(session, primary)
    if existing is not None:
        raise Conflict(f"cloud {primary!r} is already paired with {existing.secondary.name!r}")
    pairing = CloudPairing(primary_cloud_id=p.id, secondary_cloud_id=s.id, bandwidth_schedule=bandwidth)
    session.add(pairing)
    session.flush()
    return pairing


def pairing_of_primary(session: Session, primary: str) -> CloudPairing | None:
    cloud = get_cloud(session, primary)
    return session.scalars(select(CloudPairing).where(CloudPairing.primary_cloud_id == cloud.id)).one_or_none()


def get_pairing(session: Session, pairing_id: int) -> CloudPairing:
    return get(session, CloudPairing, pairing_id, "cloud pairing")


def list_pairings(session: Session) -> list[CloudPairing]:
    return list(session.scalars(select(CloudPairing).order_by(CloudPairing.id)))


def unpair(session: Session, pairing_id: int) -> None:
    pairing = get_pairing(session, pairing_id)
    n = _items_using(session, pairing_id=pairing.id)
    if n:
        raise Conflict(f"pairing {pairing.id} has {n} protected item(s): disable their protection first")
    session.delete(pairing)
    session.flush()


def associate(session: Session, policy: str, pairing_id: int, *, now: datetime | None = None) -> PolicyPairing:
    """Associate a policy with a pairing (idempotent)."""
    pol = get_policy(session, policy)
    pairing = get_pairing(session, pairing_id)
    row = session.get(PolicyPairing, (pairing.id, pol.id))
    if row is None:
        row = PolicyPairing(pairing_id=pairing.id, policy_id=pol.id, created_at=now_or(now))
        session.add(row)
        session.flush()
        session.expire(pol, ["pairings"])
        session.expire(pairing, ["policies"])
    return row


def dissociate(session: Session, policy: str, pairing_id: int) -> None:
    pol = get_policy(session, policy)
    row = session.get(PolicyPairing, (pairing_id, pol.id))
    if row is None:
        raise NotFound(f"policy {policy!r} is not associated with pairing {pairing_id}")
    n = session.scalar(
        select(func.count())
        .select_from(ProtectedItem)
        .where(ProtectedItem.policy_id == pol.id, ProtectedItem.pairing_id == pairing_id)
    )
    if n:
        raise Conflict(
            f"policy {policy!r} protects {n} item(s) of pairing {pairing_id}: disable their protection first"
        )
    session.delete(row)
    session.flush()
    session.expire(pol, ["pairings"])


def is_associated(session: Session, policy_id: int, pairing_id: int) -> bool:
    return session.get(PolicyPairing, (pairing_id, policy_id)) is not None


# ---------------------------------------------------------------- network mappings


def map_network(session: Session, primary: str, secondary: str) -> NetworkMapping:
    if primary == secondary:
        raise BadInput(f"network {primary!r} cannot be mapped to itself")
    p, s = get_network(session, primary), get_network(session, secondary)
    existing = session.scalars(select(NetworkMapping).where(NetworkMapping.primary_network_id == p.id)).one_or_none()
    if existing is not None:
        raise Conflict(f"network {primary!r} is already mapped to {existing.secondary.name!r}")
    mapping = NetworkMapping(primary_network_id=p.id, secondary_network_id=s.id)
    session.add(mapping)
    session.flush()
    return mapping


def mapping_for(session: Session, primary: str) -> NetworkMapping | None:
    p = get_network(session, primary)
    return session.scalars(select(NetworkMapping).where(NetworkMapping.primary_network_id == p.id)).one_or_none()


def list_mappings(session: Session) -> list[NetworkMapping]:
    return list(session.scalars(select(NetworkMapping).order_by(NetworkMapping.id)))


def unmap_network(session: Session, primary: str) -> None:
    mapping = mapping_for(session, primary)
    if mapping is None:
        raise NotFound(f"network {primary!r} is not mapped")
    session.delete(mapping)
    session.flush()
