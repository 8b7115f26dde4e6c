"""The live fabric: the store's inventory as a `domain.fabric.Fabric`, checked by the
readiness engine (the same rules as a fabric file).

    with store.read() as s:
        report = live_readiness(s)              # GET /readiness
        report = live_readiness(s, vm=vm_row)   # before enabling protection of one VM

Where the facts come from:

- sites, servers, clouds (capabilities), networks, pairings and network mappings: the
  operator's rows and what registration created;
- hosts: the agents' inventory (`Host.facts` holds fabric `Host` fields: libvirt and QEMU
  versions, CPU, clock skew ...; `storage_free_bytes` and `replication_address` columns
  win over the copies in facts). Host groups: `Host.host_group`, or one implicit group per
  cloud for hosts reported without one;
- "reaches the control plane": the host has an active agent whose last heartbeat is
  within `heartbeat_timeout` (the agent's own claim is not enough: a silent agent does not);
- replication reachability: agents do not probe their peers yet, so a primary host is
  taken to reach the secondary hosts that have a live agent with a replication address,
  unless its facts carry `reaches_hosts`. An info finding says so;
- VMs: the inventory's disks and NICs (disk format, size, kind, encryption, qcow2 compat
  as discovery reported them). A NIC on a network the control plane does not define has
  no mapping: a warning says so.

What cannot be mapped (facts the fabric model refuses, a disk of unknown format) becomes a
`live.inventory` finding instead of being dropped silently. For one VM (`vm=`), the fabric
holds only that VM, and findings are kept when they concern it, its host, its cloud and
the paired secondary cloud with its hosts and servers, or the whole fabric.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.domain import fabric as fm
from standby.domain.health import heard_from
from standby.readiness import engine
from standby.readiness.common import cloud_subject, host_subject, server_subject, vm_subject
from standby.readiness.engine import Finding, Severity
from standby.errors import NotFound
from standby.orchestration.settings import ServerSettings
from standby.store.models import Agent, Cloud, CloudPairing, Host, Network, NetworkMapping, Server, Site, Vm
from standby.store.repo._common import now_or

ReadinessReport = engine.Report

GIB = 1 << 30
DEFAULT_HEARTBEAT_TIMEOUT = timedelta(seconds=30)
DEFAULT_ENDPOINT = "https://127.0.0.1:8443"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:@-]")
_DOTTED = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")
# Fabric Host fields an agent may report in facts (vms come from the VM rows).
_HOST_FACT_KEYS = frozenset(fm.Host.model_fields) - {"vms"}
# QEMU format names -> the fabric's (VHD is "vpc" to QEMU; LUKS is an encrypted raw image).
_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vpc": "vhd", "vhd": "vhd", "vhdx": "vhdx", "luks": "raw"}

RULE_INVENTORY = "live.inventory"
RULE_REACHABILITY = "live.replication-reachability"


def fabric_name(raw: str) -> str:
    """A valid fabric name for a stored name (libvirt allows more characters)."""
    if _NAME_OK.match(raw):
        return raw
    name = _NAME_BAD.sub("-", raw.strip())[:128] or "unnamed"
    return name if name[0].isalnum() else ("x" + name)[:128]


@dataclass
class LiveFabric:
    """A fabric built from the store, the findings about what could not be mapped, and the
    fabric names given to stored hosts and VMs."""

    fabric: fm.Fabric
    findings: list[Finding] = field(default_factory=list)
    host_names: dict[int, str] = field(default_factory=dict)  # Host.id -> fabric name
    vm_names: dict[int, str] = field(default_factory=dict)  # Vm.id -> fabric name


def _finding(subject: str, message: str, remedy: str, severity: Severity = Severity.WARNING,
             rule: str = RULE_INVENTORY) -> Finding:
    return Finding(rule, severity, subject, message, remedy)


def _disk(target: str, entry: Any, subject: str, out: list[Finding]) -> fm.Disk | None:
    if not isinstance(entry, dict):
        out.append(_finding(subject, f"disk {target!r} is reported as {entry!r}, not a disk description",
                            "rerun the agent's inventory (standby agent run)", Severity.ERROR))
        return None
    raw_format = entry.get("format") or "raw"
    fmt = _FORMATS.get(str(raw_format))
    if fmt is None:
        out.append(_finding(subject, f"disk {target!r} has format {raw_format!r}, which cannot be replicated",
                            "convert it to qcow2 v3 (qemu-img convert -O qcow2 -o compat=1.1)", Severity.ERROR))
        return None
    size_gib = entry.get("size_gib")
    if size_gib is None and isinstance(entry.get("size"), int) and entry["size"] > 0:
        size_gib = max(-(-entry["size"] * 1000 // GIB) / 1000, 0.001)
    try:
        return fm.Disk(format=fmt, size_gib=size_gib, kind=entry.get("kind") or "virtual",  # type: ignore[arg-type]
                       encrypted=bool(entry.get("encrypted") or raw_format == "luks"),
                       qcow2_compat=entry.get("qcow2_compat") if fmt == "qcow2" else None)
    except ValidationError as e:
        out.append(_finding(subject, f"disk {target!r} cannot be checked: {_errors(e)}",
                            "rerun the agent's inventory (standby agent run)", Severity.ERROR))
        return None


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()[:5])


def _vm(vm: Vm, host: str, name: str, networks: set[str], out: list[Finding]) -> fm.Vm:
    subject = vm_subject(host, name)
    disks: dict[str, fm.Disk] = {}
    for target, entry in sorted((vm.disks or {}).items()):
        disk = _disk(target, entry, subject, out)
        if disk is not None:
            disks[fabric_name(target)] = disk
    nics: list[fm.Nic] = []
    for i, entry in enumerate(vm.nics or []):
        entry = entry if isinstance(entry, dict) else {}
        network = entry.get("network")
        if network is not None and network not in networks:
            out.append(_finding(subject, f"NIC {i} is on network {network!r}, which the control plane does not "
                                "define, so it has no mapping: after failover it starts disconnected",
                                f"define it (POST /networks {{name: {network!r}, site}}) and map it"))
            network = None
        families = [f for f in ("ipv4", "ipv6") if f in (entry.get("address_families") or [])] or ["ipv4"]
        nics.append(fm.Nic(network=network, address_families=families))  # type: ignore[arg-type]
    return fm.Vm(disks=disks, nics=nics)


def build_live_fabric(
    session: Session,
    *,
    vm: Vm | None = None,
    heartbeat_timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT,
    endpoint: str = DEFAULT_ENDPOINT,
    now: datetime | None = None,
    listening_since: datetime | None = None,
) -> LiveFabric:
    """The store's inventory as a Fabric (with `vm`, that VM is the only one in it)."""
    now = now_or(now)
    out: list[Finding] = []

    sites = {s.name: fm.Site(description=s.description or "") for s in session.scalars(select(Site))}

    servers: dict[str, fm.Server] = {}
    for srv in session.scalars(select(Server).order_by(Server.name)):
        version = srv.version or ""
        if srv.platform == "kvm" and not _DOTTED.match(version):
            version = "0"  # no kvm rule reads a site manager's version; the model wants a dotted one
        elif srv.platform == "hyperv" and version not in fm.VMM_VERSIONS:
            out.append(_finding(server_subject(srv.name), f"System Center version {version!r} is not known, so the "
                                "server and its clouds are left out of the check",
                                f"record its release (one of {', '.join(fm.VMM_VERSIONS)})", Severity.ERROR))
            continue
        servers[srv.name] = fm.Server(site=srv.site.name, platform=fm.Platform(srv.platform), version=version)

    clouds_rows = [c for c in session.scalars(select(Cloud).order_by(Cloud.name)) if c.server.name in servers]
    cloud_names = {c.name for c in clouds_rows}
    members: dict[str, list[Host]] = {c.name: list(c.hosts) for c in clouds_rows}

    # Agents: who is alive on which host (reaches the control plane, can receive replicas).
    live_hosts: set[str] = set()
    addressed_hosts: set[str] = set()
    for agent in session.scalars(select(Agent).where(Agent.state == "active", Agent.kind == "agent")):
        if heard_from(agent.last_heartbeat_at or agent.registered_at, now, heartbeat_timeout, listening_since):
            live_hosts.add(agent.host_name)
            if agent.address:
                addressed_hosts.add(agent.host_name)

    host_rows = list(session.scalars(select(Host).order_by(Host.name)))
    lf = LiveFabric(fabric=fm.Fabric())
    taken: set[str] = set()
    for h in host_rows:
        name = fabric_name(h.name)
        while name in taken:
            name = fabric_name(f"{name[:120]}-{h.id}")
        taken.add(name)
        lf.host_names[h.id] = name

    # Host groups: a group name used by one cloud keeps its name; one shared by clouds is
    # qualified by the cloud (fabric groups are global, the store's are per host).
    group_clouds: dict[str, set[str]] = {}
    for cloud, hosts in members.items():
        for h in hosts:
            if h.host_group:
                group_clouds.setdefault(h.host_group, set()).add(cloud)
    host_groups: dict[str, list[str]] = {}
    cloud_groups: dict[str, list[str]] = {}
    for cloud, hosts in members.items():
        groups = cloud_groups.setdefault(cloud, [])
        for h in hosts:
            if h.host_group:
                g = h.host_group if len(group_clouds[h.host_group]) == 1 else f"{cloud}.{h.host_group}"
            else:
                g = f"{cloud}.hosts"  # hosts reported without a group: the cloud's implicit one
            g = fabric_name(g)
            if g not in groups:
                groups.append(g)
            host_groups.setdefault(g, [])
            if lf.host_names[h.id] not in host_groups[g]:
                host_groups[g].append(lf.host_names[h.id])

    networks: dict[str, fm.Network] = {}
    for net in session.scalars(select(Network).order_by(Network.name)):
        if net.site is None:
            out.append(_finding(f"network/{net.name}", "the network belongs to no site, so it is left out",
                                "give the network a site"))
            continue
        networks[net.name] = fm.Network(site=net.site.name)

    pairings: list[fm.Pairing] = []
    secondaries_of: dict[str, list[str]] = {}  # primary cloud -> secondary clouds
    for p in session.scalars(select(CloudPairing).order_by(CloudPairing.id)):
        if p.primary.name in cloud_names and p.secondary.name in cloud_names:
            pairings.append(fm.Pairing(primary=p.primary.name, secondary=p.secondary.name))
            secondaries_of.setdefault(p.primary.name, []).append(p.secondary.name)
    mappings = [
        fm.NetworkMapping(primary=m.primary.name, secondary=m.secondary.name)
        for m in session.scalars(select(NetworkMapping).order_by(NetworkMapping.id))
        if m.primary.name in networks and m.secondary.name in networks
    ]

    clouds_of_host: dict[int, list[str]] = {}
    for cloud, hosts in members.items():
        for h in hosts:
            clouds_of_host.setdefault(h.id, []).append(cloud)

    hosts: dict[str, fm.Host] = {}
    clusters: dict[str, fm.Cluster] = {}
    assumed_reach = False
    for h in host_rows:
        name = lf.host_names[h.id]
        facts = {k: v for k, v in (h.facts or {}).items() if k in _HOST_FACT_KEYS}
        ignored = sorted(set(h.facts or {}) - _HOST_FACT_KEYS)
        # Live values win over the agent's copies.
        facts["reaches_control_plane"] = h.name in live_hosts
        if h.storage_free_bytes is not None:
            facts["storage_free_gib"] = round(h.storage_free_bytes / GIB, 3)
        address = _ip_of(h.replication_address) or _ip_of(facts.get("replication_address"))
        facts["replication_address"] = address
        reported_reach = facts.pop("reaches_hosts", None)
        if isinstance(reported_reach, list):
            reach = [lf.host_names[o.id] for o in host_rows if o.name in reported_reach]
        else:
            reach = []
            for cloud in clouds_of_host.get(h.id, []):
                for sec in secondaries_of.get(cloud, []):
                    for o in members[sec]:
                        if o.name in addressed_hosts:
                            reach.append(lf.host_names[o.id])
                            assumed_reach = True
        facts["reaches_hosts"] = sorted(set(reach))
        vms: dict[str, fm.Vm] = {}
        for v in h.vms:
            if v.missing_since is not None:
                continue
            if vm is not None and v.id != vm.id:
                continue
            vname = fabric_name(v.name)
            while vname in vms:
                vname = fabric_name(f"{vname[:120]}-{v.id}")
            lf.vm_names[v.id] = vname
            vms[vname] = _vm(v, name, vname, set(networks), out)
        try:
            host = fm.Host(**facts, vms=vms)
        except ValidationError as e:
            out.append(_finding(host_subject(name), f"the facts the agent reported cannot be read: {_errors(e)}",
                                "update the agent and let it report its inventory again", Severity.ERROR))
            keep = {k: facts[k] for k in ("reaches_control_plane", "reaches_hosts", "replication_address",
                                          "storage_free_gib") if k in facts}
            host = fm.Host(**keep, vms=vms)
        if ignored:
            out.append(_finding(host_subject(name), f"facts not used by readiness: {', '.join(ignored)}",
                                "none needed", Severity.INFO))
        if host.cluster is not None:
            clusters.setdefault(host.cluster, fm.Cluster())
        hosts[name] = host

    if assumed_reach:
        out.append(_finding("fabric", "agents do not probe replication reachability yet: primary hosts are assumed "
                            "to reach every secondary host that has a live agent with a replication address",
                            "check TCP reachability of the secondary agents' replication port from the primary hosts",
                            Severity.INFO, rule=RULE_REACHABILITY))

    lf.fabric = fm.Fabric(
        control_plane=fm.ControlPlane(endpoint=endpoint),
        sites=sites,
        servers=servers,
        clouds={c.name: fm.Cloud(server=c.server.name, capabilities=[fm.Platform(x) for x in c.capabilities
                                                                      if x in ("kvm", "hyperv")],
                                 host_groups=cloud_groups.get(c.name, []))
                for c in clouds_rows},
        host_groups={g: fm.HostGroup(hosts=hs) for g, hs in host_groups.items()},
        hosts=hosts,
        clusters=clusters,
        networks=networks,
        pairings=pairings,
        network_mappings=mappings,
    )
    lf.findings = out
    return lf


def _ip_of(address: Any) -> str | None:
    """The IP of `IP`, `IP:PORT` or `[IPv6]:PORT` (None for a DNS name or nothing)."""
    if not isinstance(address, str) or not address:
        return None
    candidates = [address]
    if address.startswith("["):
        candidates.append(address[1:].split("]", 1)[0])
    elif address.count(":") == 1:
        candidates.append(address.rsplit(":", 1)[0])
    for c in candidates:
        try:
            return str(ipaddress.ip_address(c))
        except ValueError:
            continue
    return None


def _relevant_subjects(lf: LiveFabric, vm: Vm) -> set[str]:
    """Subjects that bear on protecting `vm`: the VM, its host, its clouds and their
    servers, the paired secondary clouds with their hosts and servers, pairings, fabric."""
    fab = lf.fabric
    host = lf.host_names[vm.host_id]
    subjects = {"fabric", vm_subject(host, lf.vm_names.get(vm.id, fabric_name(vm.name))), host_subject(host)}
    clouds = [c for c in fab.clouds if host in fab.hosts_of_cloud(c)]
    for c in clouds:
        for p in fab.pairings:
            if c in (p.primary, p.secondary):
                subjects.add(f"pairing/{p.primary}->{p.secondary}")
        pairing = fab.pairing_of_primary(c)
        related = [c] + ([pairing.secondary] if pairing is not None else [])
        for rc in related:
            subjects.add(cloud_subject(rc))
            subjects.add(server_subject(fab.clouds[rc].server))
            if rc != c:
                subjects.update(host_subject(h) for h in fab.hosts_of_cloud(rc))
    return subjects


def live_readiness(
    session: Session,
    *,
    vm: Vm | int | None = None,
    heartbeat_timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT,
    endpoint: str = DEFAULT_ENDPOINT,
    now: datetime | None = None,
    listening_since: datetime | None = None,
) -> ReadinessReport:
    """Readiness of the live fabric; with `vm` (a row or its id), of protecting that VM."""
    vm_row = session.get(Vm, vm) if isinstance(vm, int) else vm
    if isinstance(vm, int) and vm_row is None:
        raise NotFound(f"VM {vm} does not exist")
    lf = build_live_fabric(session, vm=vm_row, heartbeat_timeout=heartbeat_timeout, endpoint=endpoint, now=now,
                           listening_since=listening_since)
    report = engine.check(lf.fabric)
    findings: Iterable[Finding] = [*report.findings, *lf.findings]
    if vm_row is not None:
        keep = _relevant_subjects(lf, vm_row)
        findings = [f for f in findings if f.subject in keep]
    ordered = sorted(findings, key=lambda f: (f.subject, engine.SEVERITY_ORDER[f.severity], f.rule))
    return engine.Report(report.profiles, report.rules_run, ordered)


def live_readiness_for(session: Session, settings: ServerSettings, *, vm: Vm | int | None = None,
                       now: datetime | None = None) -> ReadinessReport:
    """`live_readiness` with a running control plane's settings (heartbeat timeout, the
    listener as the control plane's endpoint): what `GET /readiness` and protection use."""
    return live_readiness(session, vm=vm, heartbeat_timeout=timedelta(seconds=settings.heartbeat_timeout),
                          endpoint=f"https://{settings.listen}", now=now, listening_since=settings.started_at)


def findings_as_dicts(report: ReadinessReport) -> list[dict[str, str]]:
    """`{rule, severity, subject, message, remedy}` per finding (the API's shape)."""
    return [f.as_dict() for f in report.findings]


__all__ = ["LiveFabric", "ReadinessReport", "build_live_fabric", "fabric_name", "findings_as_dicts", "live_readiness",
           "live_readiness_for"]
