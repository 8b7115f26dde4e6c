"""Protected items: enable protection, the operations on an item (pause, resume,
replicate now, resync, disable) and its recovery points. Items are addressed by id or
by VM name (`/items/7`, `/items/web01`).

Operations check at once what they can (the VM, its pairing and policy, readiness, the
lifecycle) so a refusal is an immediate 409 with its reason; then a job does the work
and the response (202) names it.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from fastapi import Path as PathParam
from pydantic import ValidationError

from standby.api import deps, schemas
from standby.api.auth import Principal, authenticate, authorize
from standby.contract import DiskIdsParams, build_params
from standby.errors import NotFound, Refused, RemoteError
from standby.orchestration import protection
from standby.store.db import Store
from standby.store.repo import agents as agents_repo
from standby.store.repo import items as items_repo
from standby.store.repo import jobs as jobs_repo
from standby.store.repo import tasks as tasks_repo

router = APIRouter(dependencies=[Depends(authorize)], tags=["items"])

POINTS_TASK = "list_points"
POINTS_POLL_SECONDS = 0.2

Ref = Annotated[str, PathParam(max_length=200, description="an item id or its VM's name")]


def item_ref(ref: str) -> int | str:
    """An id (ASCII digits) or a VM name. An id no item can have is simply not found."""
    if re.fullmatch(r"[0-9]+", ref):
        n = int(ref)
        if n > schemas.INT32_MAX:
            raise NotFound(f"protected item {ref} does not exist")
        return n
    if ref.isdigit():  # other scripts' digits ("²", "٣"): no VM name, and no id either
        raise NotFound(f"no protected item for VM {ref!r}")
    return ref


def _item_and_job(store: Store, item_id: int, job_id: int | None) -> schemas.ItemJobOut:
    with store.read() as s:
        item = deps.item_out(items_repo.get(s, item_id))
        job = deps.job_out(jobs_repo.get(s, job_id)) if job_id is not None else None
    return schemas.ItemJobOut(item=item, job=job)


@router.post("/items", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def enable_protection(
    body: schemas.ItemIn,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Protect a VM. The live fabric's readiness is checked first: any error finding refuses
    it (409, the findings in `details.findings`). Then a `protect` job places the replica,
    runs the initial replication and waits for the first recovery point."""
    item_id, job_id = protection.enable_protection(
        store,
        services.runner,
        vm=body.vm,
        host=body.host,
        policy=body.policy,
        secondary_host=body.secondary_host,
        created_by=principal.name,
    )
    return _item_and_job(store, item_id, job_id)


DEFAULT_PAGE = 500
MAX_PAGE = 1000


@router.get("/items", response_model=schemas.PageOut[schemas.ItemOut])
def list_items(
    state: Annotated[list[str] | None, Query(max_length=20, description="repeat for several states")] = None,
    health: Annotated[schemas.Health | None, Query()] = None,
    cloud: Annotated[str | None, Query(max_length=128, description="the primary cloud")] = None,
    host: Annotated[str | None, Query(max_length=128, description="the VM's host")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    after: Annotated[int | None, Query(ge=0, le=schemas.INT32_MAX, description="page: items after this id "
                                                                                 "(the previous page's `next`)")] = None,
    store: Store = Depends(deps.store),
) -> schemas.PageOut[schemas.ItemOut]:
    """Items in id order, a page at a time: `next` is the `after` of the next page."""
    with store.read() as s:
        rows = items_repo.list_items(s, states=state, health=health, cloud=cloud, host=host, after=after,
                                     limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return schemas.PageOut(items=[deps.item_out(i) for i in rows], next=str(rows[-1].id) if more else None)


@router.get("/items/{ref}", response_model=schemas.ItemOut)
def get_item(ref: Ref, store: Store = Depends(deps.store)) -> schemas.ItemOut:
    """State, health and its reason, RPO, the last recovery point, bytes replicated, the next cycle."""
    with store.read() as s:
        ref_ = item_ref(ref)
        item_id = ref_ if isinstance(ref_, int) else protection.resolve_item(s, ref_).id
        return deps.item_out(items_repo.shown(s, item_id))


@router.post("/items/{ref}/pause", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def pause(
    ref: Ref,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Stop replicating (an open cycle is asked to stop); health shows a warning while paused."""
    item_id, job_id = protection.pause(store, services.runner, item=item_ref(ref), created_by=principal.name)
    return _item_and_job(store, item_id, job_id)


@router.post("/items/{ref}/resume", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def resume(
    ref: Ref,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Replicate again; the next cycle is due at once."""
    item_id, job_id = protection.resume(store, services.runner, item=item_ref(ref), created_by=principal.name)
    return _item_and_job(store, item_id, job_id)


@router.post("/items/{ref}/replicate-now", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def replicate_now(
    ref: Ref,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Run a cycle now; the job ends with the cycle's outcome."""
    item_id, job_id = protection.replicate_now(store, services.runner, item=item_ref(ref), created_by=principal.name)
    return _item_and_job(store, item_id, job_id)


@router.post("/items/{ref}/resync", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def resync(
    ref: Ref,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Resynchronize: the next cycle compares every block by hash."""
    item_id, job_id = protection.resync(store, services.runner, item=item_ref(ref), created_by=principal.name)
    return _item_and_job(store, item_id, job_id)


@router.delete("/items/{ref}", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def disable_protection(
    ref: Ref,
    delete_replica: Annotated[
        bool | None, Query(description="delete the replica on the secondary (default: the policy's setting)")
    ] = None,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Stop protecting the VM; its recovery points are deleted only when asked."""
    item_id, job_id = protection.disable_protection(
        store, services.runner, item=item_ref(ref), delete_replica=delete_replica, created_by=principal.name
    )
    return _item_and_job(store, item_id, job_id)


@router.get("/items/{ref}/points", response_model=schemas.PointsOut)
def list_points(
    ref: Ref,
    timeout: Annotated[float, Query(gt=0, le=120, description="seconds to wait for the secondary's agent")] = 30.0,
    store: Store = Depends(deps.store),
) -> schemas.PointsOut:
    """The recovery points of the item's replica, as the secondary host's agent lists them
    (a `list_points` task: this waits for the agent's answer, up to `timeout` seconds)."""
    with store.transaction() as s:
        item = protection.resolve_item(s, item_ref(ref))
        if item.secondary_host is None:
            raise Refused(f"VM {item.vm.name} has no replica yet (no secondary host is placed)")
        host = item.secondary_host.name
        agent = agents_repo.agent_for_host(s, host)
        disk_ids = protection.disk_ids_of(item)
        task = tasks_repo.enqueue(
            s,
            agent_id=agent.id,
            kind=POINTS_TASK,
            params=build_params(DiskIdsParams, disk_ids=disk_ids),
            item_id=item.id,
            deadline_seconds=timeout,
        )
        task_id, item_id, agent_name = task.id, item.id, agent.name
    deadline = time.monotonic() + timeout
    while True:
        with store.read() as s:
            task = tasks_repo.get(s, task_id)
            state, result, error = task.state, task.result, task.error
        if state == "succeeded":
            break
        if state in ("failed", "cancelled", "expired"):
            raise RemoteError(f"agent {agent_name} could not list the recovery points: {error or state}")
        if time.monotonic() >= deadline:
            with store.transaction() as s:
                tasks_repo.cancel(s, task_id)
            raise RemoteError(f"agent {agent_name} on {host} did not list the recovery points within {timeout:g} s")
        time.sleep(POINTS_POLL_SECONDS)
    try:
        return schemas.PointsOut(item_id=item_id, secondary_host=host, points=(result or {}).get("points", {}))
    except ValidationError as e:
        raise RemoteError(f"agent {agent_name} answered list_points with something else than points: {e}") from None
