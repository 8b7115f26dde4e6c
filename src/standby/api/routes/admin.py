"""Tokens, registration keys, webhooks, alerts, status and readiness; and the public health check."""

from __future__ import annotations

import os

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy import func, select
from sqlalchemy.orm import load_only

from standby import __version__
from standby.api import deps, schemas
from standby.api.auth import Principal, authenticate, authorize
from standby.errors import Conflict, Refused
from standby.orchestration import livefabric
from standby.orchestration.settings import ServerSettings
from standby.store.base import utcnow
from standby.store.db import Store
from standby.store.models import Agent, Alert, ApiToken, Job, ProtectedItem, Webhook
from standby.store.repo import agents as agents_repo
from standby.store.repo import alerts as alerts_repo
from standby.store.repo import tokens as tokens_repo
from standby.store.states import JobState

public = APIRouter(tags=["public"])
router = APIRouter(dependencies=[Depends(authorize)])



@public.get("/health", response_model=schemas.HealthOut)
def health(services: deps.Services = Depends(deps.services)) -> schemas.HealthOut:
    """Liveness: the process answers (no authentication, no database access), and its role:
    active, or passive with the active control plane it knows of (`orchestration/role.py`)."""
    role = getattr(services, "role", None)
    view = role.last_view if role is not None else None
    return schemas.HealthOut(
        version=__version__, server_time=utcnow(),
        role="active" if getattr(services, "active", True) else "passive",
        name=role.name if role is not None else None,
        epoch=view.epoch if view is not None else None,
        active_url=view.active_url if view is not None else None,
        reason=role.reason if role is not None and not getattr(services, "active", True) else None,
        worker=os.getpid(), leader=bool(role.leader) if role is not None else None)


# ---------------------------------------------------------------- API tokens


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=schemas.TokenCreated, tags=["tokens"])
def create_token(
    body: schemas.TokenIn, principal: Principal = Depends(authenticate), store: Store = Depends(deps.store)
) -> schemas.TokenCreated:
    """A new API token. The secret is in this response only: the store keeps its hash."""
    now = utcnow()
    expires_at = now + timedelta(days=body.expires_days) if body.expires_days is not None else None
    with store.transaction() as s:
        if s.scalars(select(ApiToken.id).where(ApiToken.name == body.name)).first() is not None:
            raise Conflict(f"an API token named {body.name!r} exists already (names stay taken after a revoke)")
        token, secret = tokens_repo.create_token(
            s, body.name, role=body.role, created_by=principal.name, expires_at=expires_at, now=now
        )
        return schemas.TokenCreated(
            name=token.name, role=token.role, prefix=token.prefix, expires_at=token.expires_at, token=secret
        )


@router.get("/tokens", response_model=schemas.ListOut[schemas.TokenOut], tags=["tokens"])
def list_tokens(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.TokenOut]:
    with store.read() as s:
        return schemas.ListOut(items=[schemas.TokenOut.model_validate(t) for t in tokens_repo.list_tokens(s)])


@router.delete("/tokens/{name}", response_model=schemas.TokenOut, tags=["tokens"])
def revoke_token(name: str, store: Store = Depends(deps.store)) -> schemas.TokenOut:
    """Revoke a token: it stops working at once. The last operator token cannot be revoked
    (nobody could create another one)."""
    now = utcnow()
    with store.transaction() as s:
        token = tokens_repo.get_token(s, name)
        if token.role == "operator" and token.revoked_at is None:
            active_operators = s.scalar(
                select(func.count())
                .select_from(ApiToken)
                .where(
                    ApiToken.role == "operator",
                    ApiToken.revoked_at.is_(None),
                    (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now),
                )
            )
            if (active_operators or 0) <= 1:
                raise Refused(f"token {name!r} is the last valid operator token: create another one first")
        return schemas.TokenOut.model_validate(tokens_repo.revoke_token(s, name, now=now))


# ---------------------------------------------------------------- registration keys


@router.post(
    "/registration-keys",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.RegistrationKeyCreated,
    tags=["registration"],
)
def create_registration_key(
    body: schemas.RegistrationKeyIn, principal: Principal = Depends(authenticate), store: Store = Depends(deps.store)
) -> schemas.RegistrationKeyCreated:
    """A key agents and servers register with. The secret is in this response only."""
    with store.transaction() as s:
        key, secret = agents_repo.issue_registration_key(
            s, created_by=principal.name, description=body.description, validity=timedelta(days=body.valid_days)
        )
        return schemas.RegistrationKeyCreated(id=key.id, key=secret, prefix=key.prefix, expires_at=key.expires_at)


@router.get(
    "/registration-keys", response_model=schemas.ListOut[schemas.RegistrationKeyOut], tags=["registration"]
)
def list_registration_keys(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.RegistrationKeyOut]:
    with store.read() as s:
        keys = agents_repo.list_registration_keys(s)
        return schemas.ListOut(items=[schemas.RegistrationKeyOut.model_validate(k) for k in keys])


@router.delete("/registration-keys/{key_id}", response_model=schemas.RegistrationKeyOut, tags=["registration"])
def revoke_registration_key(key_id: schemas.IdPath, store: Store = Depends(deps.store)) -> schemas.RegistrationKeyOut:
    with store.transaction() as s:
        return schemas.RegistrationKeyOut.model_validate(agents_repo.revoke_registration_key(s, key_id))


# ---------------------------------------------------------------- webhooks


@router.post("/webhooks", status_code=status.HTTP_201_CREATED, response_model=schemas.WebhookOut, tags=["alerts"])
def add_webhook(body: schemas.WebhookIn, store: Store = Depends(deps.store)) -> schemas.WebhookOut:
    with store.transaction() as s:
        if s.scalars(select(Webhook.id).where(Webhook.name == body.name)).first() is not None:
            raise Conflict(f"webhook {body.name!r} exists already")
        hook = alerts_repo.add_webhook(
            s, body.name, body.url, secret=body.secret, kinds=body.kinds, min_severity=body.min_severity
        )
        return deps.webhook_out(hook)


@router.get("/webhooks", response_model=schemas.ListOut[schemas.WebhookOut], tags=["alerts"])
def list_webhooks(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.WebhookOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.webhook_out(h) for h in alerts_repo.list_webhooks(s)])


@router.delete("/webhooks/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["alerts"])
def remove_webhook(name: str, store: Store = Depends(deps.store)) -> Response:
    with store.transaction() as s:
        alerts_repo.remove_webhook(s, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- alerts


@router.get("/alerts", response_model=schemas.PageOut[schemas.AlertOut], tags=["alerts"])
def list_alerts(
    open_only: Annotated[bool, Query(alias="open", description="only alerts that are not cleared")] = False,
    kind: str | None = Query(default=None, max_length=40),
    limit: int = Query(default=200, ge=1, le=1000),
    before_id: Annotated[int | None, Query(ge=1, le=schemas.INT32_MAX, description="page: older than this id")] = None,
    store: Store = Depends(deps.store),
) -> schemas.PageOut[schemas.AlertOut]:
    """Newest first, a page at a time: `next` is the `before_id` of the next (older) page."""
    with store.read() as s:
        rows = alerts_repo.list_alerts(s, open_only=open_only, kind=kind, limit=limit + 1, before_id=before_id)
        more = len(rows) > limit
        rows = rows[:limit]
        return schemas.PageOut(items=[deps.alert_out(a) for a in rows], next=str(rows[-1].id) if more else None)


@router.post("/alerts/{alert_id}/clear", response_model=schemas.AlertOut, tags=["alerts"])
def clear_alert(alert_id: schemas.IdPath, store: Store = Depends(deps.store)) -> schemas.AlertOut:
    """Clear an alert by hand (the scheduler raises it again if its condition persists)."""
    with store.transaction() as s:
        return deps.alert_out(alerts_repo.clear_alert_by_id(s, alert_id))


# ---------------------------------------------------------------- status


@router.get("/status", response_model=schemas.StatusOut, tags=["status"])
def get_status(store: Store = Depends(deps.store), services: deps.Services = Depends(deps.services)) -> schemas.StatusOut:
    now = utcnow()
    with store.read() as s:
        by_health: dict[str, int] = {}
        by_state: dict[str, int] = {}
        for health, state, n in s.execute(select(ProtectedItem.health, ProtectedItem.state, func.count())
                                          .group_by(ProtectedItem.health, ProtectedItem.state)):
            by_health[health] = by_health.get(health, 0) + n
            by_state[state] = by_state.get(state, 0) + n
        agents = [
            schemas.AgentStatus(
                name=a.name,
                state=a.state,
                last_heartbeat_at=a.last_heartbeat_at,
                heartbeat_ok=deps.heartbeat_ok(a, services.settings, now),
            )
            # not their facts (inventory, replication lists): hundreds of agents' JSON per call
            for a in s.scalars(select(Agent).order_by(Agent.name).options(
                load_only(Agent.name, Agent.state, Agent.last_heartbeat_at, Agent.registered_at)))
        ]
        open_alerts = s.scalar(select(func.count()).select_from(Alert).where(Alert.cleared_at.is_(None))) or 0
        running = s.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.RUNNING.value)) or 0
    return schemas.StatusOut(
        version=__version__,
        items=schemas.ItemCounts(
            total=sum(by_health.values()),
            by_health={h: by_health.get(h, 0) for h in ("normal", "warning", "critical")},
            by_state={str(k): int(v) for k, v in by_state.items()},
        ),
        agents=agents,
        open_alerts=open_alerts,
        running_jobs=running,
    )


# ---------------------------------------------------------------- readiness


@router.get("/readiness", response_model=schemas.ReadinessOut, tags=["status"])
def get_readiness(
    store: Store = Depends(deps.store), settings: ServerSettings = Depends(deps.settings)
) -> schemas.ReadinessOut:
    """Readiness of the live fabric: the inventory the agents reported and the operator's
    pairings, policies and mappings, checked by the same rules as a fabric file."""
    with store.read() as s:
        report = livefabric.live_readiness_for(s, settings)
    return schemas.ReadinessOut.model_validate(report.as_dict())
