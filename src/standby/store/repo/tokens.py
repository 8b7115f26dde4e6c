"""API tokens: a random secret shown once, stored as its SHA-256, with a role
(operator may change things, viewer may only read)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.errors import BadInput
from standby.store.models import ROLES, ApiToken
from standby.store.repo._common import by_name, hash_secret, new_secret, now_or

# last_used_at is written at most this often per token: not a write per API request.
TOUCH_INTERVAL = timedelta(minutes=1)


def create_token(
    session: Session,
    name: str,
    *,
    role: str,
    created_by: str | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """A new token and its secret (shown once: the store keeps only its hash)."""
    if role not in ROLES:
        raise BadInput(f"role {role!r} is not one of {', '.join(ROLES)}")
    now = now_or(now)
    secret, prefix = new_secret("sbt")
    token = ApiToken(
        name=name,
        prefix=prefix,
        token_hash=hash_secret(secret),
        role=role,
        created_by=created_by,
        created_at=now,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    return token, secret


def authenticate(session: Session, secret: str, *, now: datetime | None = None) -> ApiToken | None:
    """The valid token `secret` stands for, or None (unknown, revoked or expired)."""
    now = now_or(now)
    token = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))).one_or_none()
    if token is None or token.revoked_at is not None:
        return None
    if token.expires_at is not None and now >= token.expires_at:
        return None
    if token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL:
        token.last_used_at = now
        session.flush()
    return token


def get_token(session: Session, name: str) -> ApiToken:
    return by_name(session, ApiToken, name, "API token")


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def revoke_token(session: Session, name: str, *, now: datetime | None = None) -> ApiToken:
    token = get_token(session, name)
    token.revoked_at = token.revoked_at or now_or(now)
    session.flush()
    return token
