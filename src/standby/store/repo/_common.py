"""Helpers every repository module shares: lookups that raise NotFound, secrets."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.errors import NotFound
from standby.store.base import utcnow

T = TypeVar("T")


def now_or(now: datetime | None) -> datetime:
    return utcnow() if now is None else now


def get(session: Session, model: type[T], ident: int, what: str, *, lock: bool = False) -> T:
    """The row with primary key `ident`; with `lock`, locked for this transaction
    (SELECT ... FOR UPDATE on PostgreSQL; SQLite write transactions hold the database
    lock already) and refreshed from the database."""
    row = session.get(model, ident, with_for_update=lock or None, populate_existing=lock)
    if row is None:
        raise NotFound(f"{what} {ident} does not exist")
    return row


def by_name(session: Session, model: type[T], name: str, what: str) -> T:
    row = session.scalars(select(model).where(model.name == name)).one_or_none()  # type: ignore[attr-defined]
    if row is None:
        raise NotFound(f"{what} {name!r} does not exist")
    return row


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy random token (a salt adds nothing to 256 random bits)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(kind: str) -> tuple[str, str]:
    """(secret, prefix): a random token such as `sbk_...` and the part shown to operators."""
    secret = f"{kind}_{secrets.token_urlsafe(32)}"
    return secret, secret[: len(kind) + 9]


def fields(obj: Any, **changes: Any) -> None:
    """Set attributes on `obj`, refusing names the model does not have."""
    for key, value in changes.items():
        if not hasattr(type(obj), key) or key.startswith("_") or key == "id":
            raise AttributeError(f"{type(obj).__name__} has no settable field {key!r}")
        setattr(obj, key, value)
