"""Agents: registration (a registration key), the agent API (the client certificate
issued at registration: heartbeat, inventory, tasks) and the operators' view of agents."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from standby.api import deps, schemas
from standby.api.auth import AgentIdentity, authorize, require_agent
from standby.api.errors import Unauthorized
from standby.contract import DesiredState, ReportAck, ReportBatch
from standby.orchestration import agents as agents_svc
from standby.orchestration import breakglass
from standby.orchestration import desired as desired_mod
from standby.orchestration import registration
from standby.orchestration.settings import ServerSettings
from standby.store.base import utcnow
from standby.store.db import Store
from standby.store.models import Agent
from standby.store.repo import agents as agents_repo
from standby.store.repo import tasks as tasks_repo

# No credentials: the body carries the registration key.
public = APIRouter(tags=["agents"])
# The agent API: the client certificate.
agent_router = APIRouter(prefix="/agent", dependencies=[Depends(require_agent)], tags=["agent API"])
# Operators.
router = APIRouter(dependencies=[Depends(authorize)], tags=["agents"])


@public.post("/agents/register", response_model=schemas.RegisterOut)
def register(
    body: schemas.RegisterIn, store: Store = Depends(deps.store), settings: ServerSettings = Depends(deps.settings)
) -> schemas.RegisterOut:
    """Register an agent (or register it again: a new certificate replaces the old one).
    The agent sends a CSR; its private key never leaves it."""
    with store.transaction() as s:
        res = registration.register(
            s,
            settings,
            key=body.key,
            name=body.name,
            kind=body.kind,
            host=body.host,
            site=body.site,
            server=body.server,
            cloud=body.cloud,
            host_group=body.host_group,
            address=body.address,
            csr_pem=body.csr_pem,
            version=body.version,
        )
    return schemas.RegisterOut(**asdict(res))


# ---------------------------------------------------------------- the agent API


def _agent_row(session: Session, ident: AgentIdentity) -> Agent:
    """The calling agent's row, locked for this transaction, checked again under the lock
    (it may have been revoked or re-registered since the request was authenticated)."""
    agent = session.get(Agent, ident.id, with_for_update=True, populate_existing=True)
    if agent is None or agent.state != "active" or agent.cert_fingerprint != ident.fingerprint:
        raise Unauthorized(f"agent {ident.name!r} is no longer registered with this certificate: register it again")
    return agent


@agent_router.post("/heartbeat", response_model=schemas.HeartbeatOut)
def heartbeat(
    body: schemas.HeartbeatIn,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
    settings: ServerSettings = Depends(deps.settings),
    services: deps.Services = Depends(deps.services),
) -> schemas.HeartbeatOut:
    now = utcnow()
    role = getattr(services, "role", None)
    view = role.last_view if role is not None else None
    with store.transaction() as s:
        agent = _agent_row(s, ident)
        agents_svc.heartbeat(
            s,
            agent,
            version=body.version,
            storage_free_bytes=body.storage_free_bytes,
            storage_total_bytes=body.storage_total_bytes,
            facts=body.facts,
            now=now,
        )
        fence = agents_svc.fenced_vms(s, agent)
    return schemas.HeartbeatOut(heartbeat_seconds=settings.heartbeat_seconds, server_time=now,
                                epoch=view.epoch if view is not None else None, fence=fence)


DESIRED_WAIT_MAX = 30.0
DESIRED_REMEMBERED_S = 120.0  # a remembered desired state is read again after this, changed or not
DESIRED_POLL = 0.25  # how often a long-poll looks at the change counter (no database access)


@agent_router.get("/desired", response_model=DesiredState,
                  responses={204: {"description": "with `if_changed`: still the version the agent has"}})
async def desired(
    request: Request,
    have: Annotated[str | None, Query(max_length=64, description="the version the agent has")] = None,
    wait: Annotated[float, Query(ge=0, le=DESIRED_WAIT_MAX, description="seconds to wait for a change")] = 0,
    if_changed: Annotated[bool, Query(description="answer 204 without a body when the version is still `have`")
                          ] = False,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> DesiredState | Response:
    """The agent's desired state (contract.DesiredState). With `have` and `wait`: answered
    as soon as it differs from `have`, or after `wait` seconds with the same version (a
    long-poll: an agent hears of a change within a second, without polling for it); with
    `if_changed` too, that last answer is an empty 204 (most long-polls end so, and a fleet
    of agents need not be sent what it has every 25 s)."""
    notifier = services.desired
    deadline = time.monotonic() + wait

    def compute(generation: int) -> desired_mod.Rendered:
        with store.read() as s:
            agent = s.get(Agent, ident.id)
            if agent is None or agent.state != "active" or agent.cert_fingerprint != ident.fingerprint:
                raise Unauthorized(f"agent {ident.name!r} is no longer registered with this certificate")

            def fresh() -> desired_mod.Rendered:
                return desired_mod.Rendered.of(desired_mod.desired_state(s, services.settings, agent, utcnow()))

            if have is None:  # an agent (re)starting reads it afresh
                return fresh()
            return notifier.remembered(agent.id, generation, DESIRED_REMEMBERED_S, fresh)

    server = getattr(request.app.state, "uvicorn", None)

    def exiting() -> bool:  # a stopping server answers its long-polls at once
        return bool(server is not None and server.should_exit)

    while True:
        seen = notifier.current
        state = await run_in_threadpool(compute, seen)  # rendered there, not on the event loop
        ended = time.monotonic() >= deadline or exiting()
        if state.version != have or (ended and not if_changed):
            return Response(state.body, media_type="application/json")
        if ended:
            return Response(status_code=204)
        while notifier.current == seen and time.monotonic() < deadline and not exiting():
            await asyncio.sleep(DESIRED_POLL)


@agent_router.post("/reports", response_model=ReportAck)
def reports(
    body: ReportBatch,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> ReportAck:
    """The cycles the agent ran on its own timers, and what it replicates now: applied in
    one transaction (a report already applied is ignored)."""
    now = utcnow()
    with store.transaction() as s:
        agent = _agent_row(s, ident)
        applied, ignored = services.scheduler.apply_cycle_reports(s, body.cycles, now)
        agents_svc.record_replication(s, agent, desired_version=body.desired_version, active=body.active,
                                      running=body.running, now=now)
    return ReportAck(applied=applied, ignored=ignored)


@agent_router.post("/fenced", response_model=schemas.Empty)
def fenced(body: schemas.FencedIn, ident: AgentIdentity = Depends(require_agent),
           store: Store = Depends(deps.store)) -> schemas.Empty:
    """The agent stopped (or kept off) a failed-over VM on its host (the heartbeat's
    `fence` list): an alert says so."""
    with store.transaction() as s:
        agents_svc.record_fenced(s, _agent_row(s, ident), body.vm, was_running=body.was_running,
                                 autostart_was=body.autostart_was)
    return schemas.Empty()


@agent_router.put("/inventory", response_model=schemas.SyncOut, response_model_exclude_none=True)
def put_inventory(
    body: schemas.InventoryIn, ident: AgentIdentity = Depends(require_agent), store: Store = Depends(deps.store)
) -> schemas.SyncOut:
    """What the agent's discovery sees, synced into the agent's cloud. VMs and hosts may
    come as digests of what the agent sent before (docs/control-plane.md, REST API): the
    answer then says which to send in full; an older agent's full report (no digests) gets
    the answer it knows."""
    with store.transaction() as s:
        result = agents_svc.sync_inventory(s, _agent_row(s, ident),
                                           [{**h.model_dump(), "brief": h.brief} for h in body.hosts])
    out = asdict(result)
    if any(h.uses_digests for h in body.hosts):
        out["digests_known"] = True
    else:
        for key in ("vms_unchanged", "resend", "hosts_resend"):
            del out[key]
    return schemas.SyncOut.model_validate(out)


@agent_router.post("/tasks/claim", response_model=schemas.ClaimOut)
def claim_tasks(
    body: schemas.ClaimIn, ident: AgentIdentity = Depends(require_agent), store: Store = Depends(deps.store)
) -> schemas.ClaimOut:
    """Queued tasks for this agent, and those it claimed before and has not finished."""
    with store.transaction() as s:
        agent = _agent_row(s, ident)
        tasks = tasks_repo.claim(s, agent.id, max=body.max)
        return schemas.ClaimOut(tasks=[schemas.TaskOut.model_validate(t) for t in tasks])


@agent_router.post("/tasks/{task_id}/progress", response_model=schemas.ProgressOut)
def task_progress(
    task_id: schemas.IdPath,
    body: schemas.ProgressIn,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
) -> schemas.ProgressOut:
    with store.transaction() as s:
        agent = _agent_row(s, ident)
        task = tasks_repo.progress(s, agent.id, task_id, body.progress, body.message, bytes_done=body.bytes_done)
        return schemas.ProgressOut(cancel_requested=tasks_repo.cancel_requested(task))


@agent_router.post("/tasks/{task_id}/result", response_model=schemas.Empty)
def task_result(
    task_id: schemas.IdPath,
    body: schemas.ResultIn,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.Empty:
    """Idempotent: a result for a task that has ended already is ignored (200)."""
    now = utcnow()
    with store.transaction() as s:
        agent = _agent_row(s, ident)
        task, changed = tasks_repo.finish(
            s, agent.id, task_id, ok=body.ok, result=body.result, error=body.error, error_type=body.error_type, now=now
        )
        if changed:
            # In the same transaction: the item never shows a finished cycle without its outcome.
            services.scheduler.apply_task_result(s, task, now)
    return schemas.Empty()


@agent_router.post("/breakglass", response_model=schemas.BreakGlassOut)
def break_glass(
    body: schemas.BreakGlassIn,
    ident: AgentIdentity = Depends(require_agent),
    store: Store = Depends(deps.store),
) -> schemas.BreakGlassOut:
    """A failover this agent ran alone while no control plane answered: the item becomes
    failed over as if the control plane had run it (idempotent)."""
    with store.transaction() as s:
        out = breakglass.take_report(s, _agent_row(s, ident), body.model_dump())
    return schemas.BreakGlassOut(**out)


# ---------------------------------------------------------------- operators


@router.get("/agents", response_model=schemas.ListOut[schemas.AgentOut])
def list_agents(
    store: Store = Depends(deps.store), settings: ServerSettings = Depends(deps.settings)
) -> schemas.ListOut[schemas.AgentOut]:
    now = utcnow()
    with store.read() as s:
        return schemas.ListOut(items=[deps.agent_out(a, settings, now) for a in agents_repo.list_agents(s)])


@router.get("/agents/{name}", response_model=schemas.AgentOut)
def get_agent(
    name: str, store: Store = Depends(deps.store), settings: ServerSettings = Depends(deps.settings)
) -> schemas.AgentOut:
    with store.read() as s:
        return deps.agent_out(agents_repo.get_agent(s, name), settings, utcnow())


@router.delete("/agents/{name}", response_model=schemas.AgentOut)
def revoke_agent(
    name: str, request: Request, store: Store = Depends(deps.store),
    settings: ServerSettings = Depends(deps.settings)
) -> schemas.AgentOut:
    """Stop trusting an agent: its certificate is refused from now on (register it again
    with a new key to bring it back)."""
    with store.transaction() as s:
        out = deps.agent_out(agents_repo.revoke_agent(s, name), settings, utcnow())
    getattr(request.app.state, "agent_idents", {}).clear()  # refused from the first check on, here at once
    return out
