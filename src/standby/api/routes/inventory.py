"""Inventory as the agents' discovery reported it: sites, servers, clouds, hosts, VMs,
and the VM networks operators declare for network mappings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy import select

from standby.api import deps, schemas
from standby.api.auth import authorize
from standby.errors import Conflict
from standby.store.db import Store
from standby.store.models import Network, ProtectedItem
from standby.store.repo import inventory

router = APIRouter(dependencies=[Depends(authorize)], tags=["inventory"])

NameQuery = Annotated[str | None, Query(max_length=128)]


@router.get("/sites", response_model=schemas.ListOut[schemas.SiteOut])
def list_sites(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.SiteOut]:
    with store.read() as s:
        return schemas.ListOut(items=[schemas.SiteOut.model_validate(x) for x in inventory.list_sites(s)])


@router.get("/servers", response_model=schemas.ListOut[schemas.ServerOut])
def list_servers(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.ServerOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.server_out(x) for x in inventory.list_servers(s)])


@router.get("/clouds", response_model=schemas.ListOut[schemas.CloudOut])
def list_clouds(server: NameQuery = None, store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.CloudOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.cloud_out(x) for x in inventory.list_clouds(s, server=server)])


@router.get("/hosts", response_model=schemas.ListOut[schemas.HostOut])
def list_hosts(cloud: NameQuery = None, store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.HostOut]:
    with store.read() as s:
        servers = {x.id: x.name for x in inventory.list_servers(s)}
        return schemas.ListOut(items=[deps.host_out(h, servers) for h in inventory.list_hosts(s, cloud=cloud)])


VMS_PAGE = 1000


@router.get("/vms", response_model=schemas.PageOut[schemas.VmOut])
def list_vms(
    cloud: NameQuery = None,
    host: NameQuery = None,
    present: Annotated[bool, Query(description="leave out protected VMs discovery no longer sees")] = False,
    limit: Annotated[int, Query(ge=1, le=VMS_PAGE)] = VMS_PAGE,
    after: Annotated[int | None, Query(ge=0, le=schemas.INT32_MAX,
                                       description="page: VMs after this id (the previous page's `next`)")] = None,
    store: Store = Depends(deps.store),
) -> schemas.PageOut[schemas.VmOut]:
    """VMs in id order, a page at a time: `next` is the `after` of the next page."""
    with store.read() as s:
        vms = inventory.list_vms(s, host=host, cloud=cloud, present_only=present, after=after, limit=limit + 1)
        more = len(vms) > limit
        vms = vms[:limit]
        ids = [vm.id for vm in vms]
        item_ids = {vm_id: item_id for vm_id, item_id in
                    s.execute(select(ProtectedItem.vm_id, ProtectedItem.id).where(ProtectedItem.vm_id.in_(ids)))}
        return schemas.PageOut(items=[deps.vm_out(vm, item_ids) for vm in vms], next=str(vms[-1].id) if more else None)


@router.get("/networks", response_model=schemas.ListOut[schemas.NetworkOut])
def list_networks(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.NetworkOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.network_out(n) for n in inventory.list_networks(s)])


@router.post("/networks", status_code=status.HTTP_201_CREATED, response_model=schemas.NetworkOut)
def create_network(body: schemas.NetworkIn, store: Store = Depends(deps.store)) -> schemas.NetworkOut:
    """A VM network of a site (sites come from registration: an unknown site is refused)."""
    with store.transaction() as s:
        if s.scalars(select(Network.id).where(Network.name == body.name)).first() is not None:
            raise Conflict(f"network {body.name!r} exists already")
        if body.site is not None:
            inventory.get_site(s, body.site)
        return deps.network_out(inventory.ensure_network(s, body.name, site=body.site))
