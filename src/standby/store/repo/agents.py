"""Registration keys, agents and servers that registered with them, and heartbeats.

A registration key is a random token shown once to the operator; the store keeps its
SHA-256. It may be used by several servers and agents until it expires (five days by
default, as in the reference) or is revoked.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from standby.errors import BadInput, NotFound, Refused
from standby.store.models import AGENT_KINDS, Agent, RegistrationKey
from standby.store.repo._common import by_name, get, hash_secret, new_secret, now_or

REGISTRATION_KEY_VALIDITY = timedelta(days=5)


class RegistrationRefused(Refused):
    """A registration key that is unknown, expired or revoked."""

    http_status = 403


def issue_registration_key(
    session: Session,
    *,
    created_by: str | None = None,
    description: str = "",
    validity: timedelta = REGISTRATION_KEY_VALIDITY,
    now: datetime | None = None,
) -> tuple[RegistrationKey, str]:
    """A new key and its secret (shown once: the store keeps only its hash)."""
    if validity <= timedelta(0):
        raise BadInput("a registration key must be valid for some time")
    now = now_or(now)
    secret, prefix = new_secret("sbk")
    key = RegistrationKey(
        prefix=prefix,
        key_hash=hash_secret(secret),
        description=description,
        created_by=created_by,
        created_at=now,
        expires_at=now + validity,
        use_count=0,
    )
    session.add(key)
    session.flush()
    return key, secret


def redeem_registration_key(session: Session, secret: str, *, now: datetime | None = None) -> RegistrationKey:
    """The key `secret` stands for, counted as used; `RegistrationRefused` if it is
    unknown, revoked or expired (the message says which, never the secret)."""
    now = now_or(now)
    key = session.scalars(
        select(RegistrationKey).where(RegistrationKey.key_hash == hash_secret(secret)).with_for_update()
    ).one_or_none()
    if key is None:
        raise RegistrationRefused("unknown registration key")
    if key.revoked_at is not None:
        raise RegistrationRefused(f"registration key {key.prefix}... was revoked")
    if now >= key.expires_at:
        raise RegistrationRefused(
            f"registration key {key.prefix}... expired at {key.expires_at.isoformat(timespec='seconds')}: "
            "issue a new one"
        )
    key.use_count += 1
    key.last_used_at = now
    session.flush()
    return key


def list_registration_keys(session: Session, *, valid_at: datetime | None = None) -> list[RegistrationKey]:
    """All keys, newest first; with `valid_at`, only those usable then."""
    q = select(RegistrationKey).order_by(RegistrationKey.id.desc())
    if valid_at is not None:
        q = q.where(RegistrationKey.revoked_at.is_(None), RegistrationKey.expires_at > valid_at)
    return list(session.scalars(q))


def revoke_registration_key(session: Session, key_id: int, *, now: datetime | None = None) -> RegistrationKey:
    key = get(session, RegistrationKey, key_id, "registration key", lock=True)
    key.revoked_at = key.revoked_at or now_or(now)
    session.flush()
    return key


# ---------------------------------------------------------------- agents


def register_agent(
    session: Session,
    *,
    name: str,
    host_name: str,
    kind: str = "agent",
    address: str | None = None,
    version: str = "",
    cert_fingerprint: str | None = None,
    cert_serial: str | None = None,
    cert_not_after: datetime | None = None,
    registration_key_id: int | None = None,
    facts: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Agent:
    """Record a registration. Registering an existing name again (a re-installed agent, a
    renewed certificate) replaces its certificate and reactivates it."""
    if kind not in AGENT_KINDS:
        raise BadInput(f"agent kind {kind!r} is not one of {', '.join(AGENT_KINDS)}")
    now = now_or(now)
    agent = session.scalars(select(Agent).where(Agent.name == name).with_for_update()).one_or_none()
    if agent is None:
        agent = Agent(name=name)
        session.add(agent)
    agent.kind = kind
    agent.host_name = host_name
    agent.address = address
    agent.version = version
    agent.state = "active"
    agent.cert_fingerprint = cert_fingerprint
    agent.cert_serial = cert_serial
    agent.cert_not_after = cert_not_after
    agent.registration_key_id = registration_key_id
    agent.registered_at = now
    agent.last_heartbeat_at = now
    agent.facts = dict(facts or {})
    session.flush()
    return agent


def get_agent(session: Session, name: str) -> Agent:
    return by_name(session, Agent, name, "agent")


def agent_by_fingerprint(session: Session, fingerprint: str) -> Agent | None:
    """The active agent holding the certificate with this fingerprint (mTLS identity)."""
    return session.scalars(
        select(Agent).where(Agent.cert_fingerprint == fingerprint, Agent.state == "active")
    ).one_or_none()


def agent_for_host(session: Session, host_name: str) -> Agent:
    """The active agent on `host_name`: where work for that host is dispatched."""
    agent = session.scalars(
        select(Agent)
        .where(Agent.host_name == host_name, Agent.kind == "agent", Agent.state == "active")
        .order_by(Agent.registered_at.desc())
    ).first()
    if agent is None:
        raise NotFound(f"no agent is registered on host {host_name!r}")
    return agent


def list_agents(session: Session, *, kind: str | None = None, active_only: bool = False) -> list[Agent]:
    q = select(Agent).order_by(Agent.name)
    if kind is not None:
        q = q.where(Agent.kind == kind)
    if active_only:
        q = q.where(Agent.state == "active")
    return list(session.scalars(q))


def heartbeat(
    session: Session,
    name: str,
    *,
    address: str | None = None,
    facts: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Agent:
    agent = get_agent(session, name)
    if agent.state != "active":
        raise Refused(f"agent {name!r} is {agent.state}: register it again")
    agent.last_heartbeat_at = now_or(now)
    if address is not None:
        agent.address = address
    if facts is not None:
        agent.facts = dict(facts)
    session.flush()
    return agent


def stale_agents(session: Session, *, timeout: timedelta, now: datetime | None = None) -> list[Agent]:
    """Active agents not heard from for `timeout` (a heartbeat_lost alert each)."""
    cutoff = now_or(now) - timeout
    q = (
        select(Agent)
        .where(
            Agent.state == "active",
            or_(
                Agent.last_heartbeat_at < cutoff,
                Agent.last_heartbeat_at.is_(None) & (Agent.registered_at < cutoff),
            ),
        )
        .order_by(Agent.name)
    )
    return list(session.scalars(q))


def revoke_agent(session: Session, name: str) -> Agent:
    """Stop trusting an agent: its certificate no longer identifies it."""
    agent = get_agent(session, name)
    agent.state = "revoked"
    session.flush()
    return agent
