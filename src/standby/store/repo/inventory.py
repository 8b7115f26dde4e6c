"""Inventory: sites, servers, clouds, hosts, VMs and networks, synchronized from the
agents' discovery one cloud at a time (`sync_cloud`) or one agent's hosts (`sync_hosts`).

Digests: an agent sends, with each host's and VM's full entry, a digest of it (its own
hash, opaque here), which is stored beside the row (`inventory_digest`); a later report
lists an unchanged VM by name and digest only (`HostReport.vm_digests`) and leaves out an
unchanged host's own fields (`HostReport.brief`). A digest that does not match the row's
(a control plane restored from a backup, or another one after a site loss) is answered in
`SyncResult.resend` / `hosts_resend`: the agent sends those entries in full. An entry sent
in full without a digest (an older agent) stores none: the row is then never taken as
unchanged, and such agents send everything every time anyway."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from standby.errors import BadInput, Conflict, NotFound
from standby.store.models import (
    PLATFORMS,
    Cloud,
    Host,
    Network,
    NetworkMapping,
    ProtectedItem,
    Server,
    Site,
    Vm,
    cloud_hosts,
)
from standby.store.repo._common import by_name, now_or


def _platform(platform: str) -> str:
    if platform not in PLATFORMS:
        raise BadInput(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    return platform


def ensure_site(session: Session, name: str, *, description: str | None = None) -> Site:
    site = session.scalars(select(Site).where(Site.name == name)).one_or_none()
    if site is None:
        site = Site(name=name, description=description or "")
        session.add(site)
    elif description is not None:
        site.description = description
    session.flush()
    return site


def ensure_server(session: Session, name: str, *, site: str, platform: str = "kvm", version: str = "") -> Server:
    """Create or update a server (site manager) in `site` (created if new)."""
    site_row = ensure_site(session, site)
    server = session.scalars(select(Server).where(Server.name == name)).one_or_none()
    if server is None:
        server = Server(name=name, site_id=site_row.id, platform=_platform(platform), version=version)
        session.add(server)
    else:
        server.site_id = site_row.id
        server.platform = _platform(platform)
        server.version = version
    session.flush()
    return server


def ensure_cloud(session: Session, name: str, *, server: str, capabilities: Sequence[str] = ()) -> Cloud:
    server_row = by_name(session, Server, server, "server")
    cloud = session.scalars(select(Cloud).where(Cloud.name == name)).one_or_none()
    caps = [_platform(c) for c in capabilities]
    if cloud is None:
        cloud = Cloud(name=name, server_id=server_row.id, capabilities=caps)
        session.add(cloud)
    else:
        cloud.server_id = server_row.id
        cloud.capabilities = caps
    session.flush()
    return cloud


def ensure_network(session: Session, name: str, *, site: str | None = None) -> Network:
    site_id = ensure_site(session, site).id if site is not None else None
    net = session.scalars(select(Network).where(Network.name == name)).one_or_none()
    if net is None:
        net = Network(name=name, site_id=site_id)
        session.add(net)
    elif site is not None:
        net.site_id = site_id
    session.flush()
    return net


def get_site(session: Session, name: str) -> Site:
    return by_name(session, Site, name, "site")


def get_server(session: Session, name: str) -> Server:
    return by_name(session, Server, name, "server")


def get_cloud(session: Session, name: str) -> Cloud:
    return by_name(session, Cloud, name, "cloud")


def get_host(session: Session, name: str) -> Host:
    return by_name(session, Host, name, "host")


def get_network(session: Session, name: str) -> Network:
    return by_name(session, Network, name, "network")


def list_sites(session: Session) -> list[Site]:
    return list(session.scalars(select(Site).order_by(Site.name)))


def list_servers(session: Session) -> list[Server]:
    return list(session.scalars(select(Server).order_by(Server.name)))


def list_clouds(session: Session, *, server: str | None = None) -> list[Cloud]:
    q = select(Cloud).order_by(Cloud.name)
    if server is not None:
        q = q.join(Server, Cloud.server_id == Server.id).where(Server.name == server)
    return list(session.scalars(q))


def list_hosts(session: Session, *, cloud: str | None = None) -> list[Host]:
    q = select(Host).order_by(Host.name)
    if cloud is not None:
        q = q.join(cloud_hosts, cloud_hosts.c.host_id == Host.id).join(Cloud, Cloud.id == cloud_hosts.c.cloud_id)
        q = q.where(Cloud.name == cloud)
    return list(session.scalars(q))


def list_vms(
    session: Session, *, host: str | None = None, cloud: str | None = None, present_only: bool = False,
    after: int | None = None, limit: int | None = None,
) -> list[Vm]:
    """VMs by host and name; with `after` or `limit`, a page in id order (ids above `after`)."""
    q = select(Vm).join(Host, Vm.host_id == Host.id).options(selectinload(Vm.host))
    if after is not None or limit is not None:
        q = q.order_by(Vm.id)
        if after is not None:
            q = q.where(Vm.id > after)
        if limit is not None:
            q = q.limit(limit)
    else:
        q = q.order_by(Host.name, Vm.name)
    if host is not None:
        q = q.where(Host.name == host)
    if cloud is not None:
        q = q.join(cloud_hosts, cloud_hosts.c.host_id == Host.id).join(Cloud, Cloud.id == cloud_hosts.c.cloud_id)
        q = q.where(Cloud.name == cloud)
    if present_only:
        q = q.where(Vm.missing_since.is_(None))
    return list(session.scalars(q))


def list_networks(session: Session) -> list[Network]:
    return list(session.scalars(select(Network).order_by(Network.name)))


def get_vm(session: Session, host: str, name: str) -> Vm:
    vm = session.scalars(
        select(Vm).join(Host, Vm.host_id == Host.id).where(Host.name == host, Vm.name == name)
    ).one_or_none()
    if vm is None:
        raise NotFound(f"VM {name!r} on host {host!r} does not exist")
    return vm


def clouds_of_host(session: Session, host: str) -> list[Cloud]:
    q = (
        select(Cloud)
        .join(cloud_hosts, cloud_hosts.c.cloud_id == Cloud.id)
        .join(Host, Host.id == cloud_hosts.c.host_id)
        .where(Host.name == host)
        .order_by(Cloud.name)
    )
    return list(session.scalars(q))


# ---------------------------------------------------------------- sync from discovery


@dataclass(frozen=True)
class VmReport:
    name: str
    uuid: str | None = None
    power_state: str | None = None
    disks: dict[str, Any] = field(default_factory=dict)
    nics: list[Any] = field(default_factory=list)
    digest: str | None = None  # the agent's digest of this entry, stored with it


@dataclass(frozen=True)
class HostReport:
    """One host as an agent's discovery reports it: its own fields (unless `brief`: the
    same as when the agent sent `digest`), the VMs that changed in full (`vms`) and the
    others by name and digest (`vm_digests`)."""

    name: str
    platform: str = "kvm"
    host_group: str | None = None
    replication_address: str | None = None
    storage_free_bytes: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    vms: Sequence[VmReport] = ()
    digest: str | None = None
    brief: bool = False  # the host's own fields left out: unchanged since `digest`
    vm_digests: Mapping[str, str] = field(default_factory=dict)  # VM name -> digest: unchanged


@dataclass
class SyncResult:
    hosts_added: list[str] = field(default_factory=list)
    hosts_updated: list[str] = field(default_factory=list)
    hosts_removed: list[str] = field(default_factory=list)  # left the cloud (the host row stays)
    vms_added: list[str] = field(default_factory=list)  # "host/vm"
    vms_updated: list[str] = field(default_factory=list)
    vms_removed: list[str] = field(default_factory=list)
    vms_missing: list[str] = field(default_factory=list)  # gone but protected: kept, marked missing
    vms_replaced: list[str] = field(default_factory=list)  # same host and name, another UUID
    vms_unchanged: int = 0  # listed by a digest that matched: present, rows not rewritten
    resend: list[str] = field(default_factory=list)  # "host/vm" listed by a digest that did not match
    hosts_resend: list[str] = field(default_factory=list)  # brief hosts whose digest did not match


def _names_unique(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise BadInput(f"discovery reported {what} {n!r} twice")
        seen.add(n)


def sync_cloud(session: Session, cloud: str, hosts: Sequence[HostReport], *, now: datetime | None = None) -> SyncResult:
    """Make the store's view of `cloud` what discovery reported: exactly these hosts, and
    on each exactly these VMs. VMs are matched by UUID (so one that moved between hosts
    keeps its row and its protection), then by host and name (a new UUID under a known
    name is listed in `vms_replaced`, for health to judge). A VM that disappeared is
    deleted, unless it is protected: then it is kept with `missing_since` set."""
    cloud_row = get_cloud(session, cloud)
    member_ids = set(session.scalars(select(cloud_hosts.c.host_id).where(cloud_hosts.c.cloud_id == cloud_row.id)))
    reported = {h.name for h in hosts}
    drop = {h.id for h in session.scalars(select(Host).where(Host.id.in_(member_ids))) if h.name not in reported}
    return sync_hosts(session, cloud, hosts, drop_host_ids=drop, now=now)


def sync_hosts(session: Session, cloud: str, hosts: Sequence[HostReport], *, drop_host_ids: Iterable[int] = (),
               now: datetime | None = None) -> SyncResult:
    """Sync these hosts (and exactly their VMs, as `sync_cloud` does) into `cloud`, and take
    the hosts `drop_host_ids` out of it; the cloud's other hosts are not read. What an
    agent's report costs is its own host's, however big the cloud."""
    now = now_or(now)
    res = SyncResult()
    cloud_row = get_cloud(session, cloud)
    _names_unique("host", (h.name for h in hosts))
    member_ids = set(session.scalars(select(cloud_hosts.c.host_id).where(cloud_hosts.c.cloud_id == cloud_row.id)))
    known = {h.name: h for h in session.scalars(select(Host).where(Host.name.in_([r.name for r in hosts])))}
    for report in hosts:
        host = known.get(report.name)
        if host is None:
            host = Host(name=report.name)
            session.add(host)
            res.hosts_added.append(report.name)
        else:
            res.hosts_updated.append(report.name)
        host.server_id = cloud_row.server_id
        if not report.brief:
            host.platform = _platform(report.platform)
            host.host_group = report.host_group
            host.replication_address = report.replication_address
            host.storage_free_bytes = report.storage_free_bytes
            host.facts = dict(report.facts)
            host.inventory_digest = report.digest
        elif host.inventory_digest != report.digest:  # a brief host always has a digest
            res.hosts_resend.append(report.name)  # its fields as they are until the agent sends them
        host.synced_at = now
        session.flush()
        if host.id not in member_ids:
            session.execute(cloud_hosts.insert().values(cloud_id=cloud_row.id, host_id=host.id))
            member_ids.add(host.id)
        _sync_vms(session, host, report.vms, report.vm_digests, now, res)

    for host_id in sorted(set(drop_host_ids) & member_ids):
        session.execute(
            cloud_hosts.delete().where(cloud_hosts.c.cloud_id == cloud_row.id, cloud_hosts.c.host_id == host_id)
        )
        res.hosts_removed.append(session.get_one(Host, host_id).name)
    cloud_row.synced_at = now
    session.flush()
    session.expire(cloud_row, ["hosts"])
    return res


def _sync_vms(session: Session, host: Host, reports: Sequence[VmReport], digests: Mapping[str, str], now: datetime,
              res: SyncResult) -> None:
    """The host's VMs: one query for those it has, one for those the report's UUIDs name,
    one for which of them are protected; rows written only where something changed, and
    `synced_at` of the ones seen in one statement. A VM listed in `digests` (name ->
    digest) whose row here has that digest is present and unchanged; one whose row does
    not is listed in `res.resend` (and its row, if any, kept as it is until it comes)."""
    _names_unique(f"on host {host.name} VM", [*(v.name for v in reports), *digests])
    existing = {vm.name: vm for vm in session.scalars(select(Vm).where(Vm.host_id == host.id))}
    uuids = [r.uuid for r in reports if r.uuid is not None]
    by_uuid = {vm.uuid: vm for vm in session.scalars(select(Vm).where(Vm.uuid.in_(uuids)))} if uuids else {}
    ids = {vm.id for vm in existing.values()} | {vm.id for vm in by_uuid.values()}
    protected = set(session.scalars(select(ProtectedItem.vm_id).where(ProtectedItem.vm_id.in_(ids)))) if ids else set()
    seen: list[Vm] = []
    for report in reports:
        key = f"{host.name}/{report.name}"
        here = existing.get(report.name)
        vm = by_uuid.get(report.uuid) if report.uuid is not None else None
        if vm is not None and vm.host_id != host.id:  # moved here from another host
            if here is not None:
                if here.id in protected:
                    raise Conflict(
                        f"VM {report.name!r} moved to host {host.name!r}, where a protected VM of that name "
                        "is still recorded: disable its protection first"
                    )
                session.delete(here)
                session.flush()
                res.vms_removed.append(key)
                existing.pop(report.name)
            vm.host_id = host.id
        if vm is None and here is not None:
            vm = here
            if here.uuid is not None and report.uuid is not None and here.uuid != report.uuid:
                res.vms_replaced.append(key)  # same name, another machine
        if vm is None:
            vm = Vm(host_id=host.id, name=report.name, synced_at=now)
            session.add(vm)
            res.vms_added.append(key)
        else:
            res.vms_updated.append(key)
        # assigned only when different: an unchanged VM costs no UPDATE of its own
        for attr, value in (("name", report.name), ("uuid", report.uuid), ("power_state", report.power_state),
                            ("disks", dict(report.disks)), ("nics", list(report.nics)), ("missing_since", None),
                            ("inventory_digest", report.digest)):
            if getattr(vm, attr) != value:
                setattr(vm, attr, value)
        seen.append(vm)
    kept: set[int] = set()  # listed by a digest this store does not know: not gone, not synced
    for name, digest in digests.items():
        vm = existing.get(name)
        if vm is not None and vm.inventory_digest == digest:  # digests are never empty
            if vm.missing_since is not None:
                vm.missing_since = None
            seen.append(vm)
            res.vms_unchanged += 1
        else:
            res.resend.append(f"{host.name}/{name}")
            if vm is not None:
                kept.add(vm.id)
    session.flush()
    seen_ids = {vm.id for vm in seen}
    for vm in existing.values():
        if vm.id in seen_ids or vm.id in kept or vm.host_id != host.id:
            continue
        key = f"{host.name}/{vm.name}"
        if vm.id in protected:
            vm.missing_since = vm.missing_since or now
            res.vms_missing.append(key)
        else:
            session.delete(vm)
            res.vms_removed.append(key)
    if seen_ids:
        session.execute(update(Vm).where(Vm.id.in_(seen_ids)).values(synced_at=now)
                        .execution_options(synchronize_session=False))
        for vm in seen:
            set_committed_value(vm, "synced_at", now)
    session.flush()


def network_mappings(session: Session) -> dict[str, str]:
    """Every network mapping, primary network name -> secondary network name (one query)."""
    primary, secondary = aliased(Network), aliased(Network)
    q = (select(primary.name, secondary.name).select_from(NetworkMapping)
         .join(primary, primary.id == NetworkMapping.primary_network_id)
         .join(secondary, secondary.id == NetworkMapping.secondary_network_id))
    return {p: s for p, s in session.execute(q)}


def vm_networks(vm: Vm) -> list[str | None]:
    """The network of each of the VM's NICs as the inventory has it, in order."""
    out: list[str | None] = []
    for nic in vm.nics or []:
        net = nic.get("network") if isinstance(nic, dict) else None
        out.append(str(net) if net else None)
    return out
