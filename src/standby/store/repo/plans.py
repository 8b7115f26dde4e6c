"""Recovery plans: stored documents, by name. Validation is the domain's
(`domain.plans.load_plan`): the orchestration validates before it calls `save`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.errors import Conflict
from standby.store.models import RecoveryPlan
from standby.store.repo._common import by_name, now_or


def save(session: Session, name: str, document: dict[str, Any], *, replace: bool = False,
         created_by: str | None = None, now: datetime | None = None) -> RecoveryPlan:
    """Store a plan; an existing name is `Conflict` unless `replace`."""
    now = now_or(now)
    row = session.scalars(select(RecoveryPlan).where(RecoveryPlan.name == name)).one_or_none()
    if row is not None:
        if not replace:
            raise Conflict(f"recovery plan {name!r} already exists")
        row.document = dict(document)
        row.updated_at = now
    else:
        row = RecoveryPlan(name=name, document=dict(document), created_by=created_by, created_at=now,
                           updated_at=now)
        session.add(row)
    session.flush()
    return row


def get(session: Session, name: str) -> RecoveryPlan:
    return by_name(session, RecoveryPlan, name, "recovery plan")


def list_plans(session: Session) -> list[RecoveryPlan]:
    return list(session.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name)))


def delete(session: Session, name: str) -> None:
    session.delete(get(session, name))
    session.flush()
