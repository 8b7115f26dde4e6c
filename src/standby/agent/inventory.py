"""What an agent reports of its host: the body of `PUT /agent/inventory` and the storage
figures of its heartbeat.

The host is what the libvirt driver discovers (`host_facts`: versions, CPU, each domain's
disks as the readiness rules see them; `list_vms`: UUID, power state, disk paths and
sizes, NIC MACs), narrowed to the domains this agent owns (its --domains globs: two agents
may share one libvirtd). Storage is that of the replica store's file system, where this
agent keeps replicas as a secondary.

`facts` holds fabric `Host` fields only (`standby.domain.fabric.Host`, without `vms`), so
the control plane can rebuild the fabric the readiness rules check from the inventory.

Digests (`Digests`): each host's own fields and each VM's entry go with a digest of them;
an entry whose digest the control plane acknowledged is sent as its digest only (a VM in
the host's `vm_digests`, a host without its own fields), the others in full. The control
plane answers with the digests it does not know (`resend`, `hosts_resend`), which are sent
in full at once. What it acknowledged is kept in memory only: a restarted agent sends
everything the first time, and an answer without `digests_known` (an older control plane,
which would take a VM left out of `vms` as gone) makes every report a full one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from standby.agent.config import AgentConfig
from standby.domain.fabric import Host, Vm
from standby.drivers.base import VmInfo

log = logging.getLogger("standby.agent")

GIB = 1 << 30


def storage(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the file system holding `path` (its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def replication_ip(listen_host: str) -> str | None:
    """The fabric's replication_address (an IP) from the listen host; None for a wildcard
    or a DNS name (the agent's registered address still carries it)."""
    try:
        ip = ipaddress.ip_address(listen_host)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def vm_entry(info: VmInfo, fabric_vm: Vm | None) -> dict[str, Any]:
    """One VM of the inventory: the driver's view (uuid, state, paths) plus, per disk and
    NIC, what the readiness rules need (format, size in GiB, kind, encryption, qcow2
    compat, address families) from discovery."""
    disks: dict[str, Any] = {}
    fdisks = fabric_vm.disks if fabric_vm is not None else {}
    for d in info.disks:
        entry: dict[str, Any] = {"path": d.path, "size": d.size, "format": d.format}
        fd = fdisks.get(d.target)
        if fd is not None:
            entry.update(size_gib=fd.size_gib, kind=str(fd.kind), encrypted=fd.encrypted,
                         qcow2_compat=fd.qcow2_compat)
        disks[d.target] = entry
    fnics = fabric_vm.nics if fabric_vm is not None else []
    nics = []
    for i, n in enumerate(info.nics):
        entry = {"mac": n.mac, "network": n.network}
        if len(fnics) == len(info.nics):  # same domain XML, same order
            entry["address_families"] = list(fnics[i].address_families)
        nics.append(entry)
    return {"name": info.name, "uuid": info.uuid, "power_state": str(info.state), "disks": disks, "nics": nics,
            "has_guest_agent": info.has_guest_agent}


def host_entry(cfg: AgentConfig, host: Host, vms: list[VmInfo], free: int,
               clock_skew_seconds: float | None = None) -> dict[str, Any]:
    """The inventory's host: this agent's host with the VMs it owns."""
    owned = [v for v in vms if cfg.owns(v.name)]
    address = replication_ip(cfg.listen_host)
    # defaults left out: what a KVM host does not report (Windows updates, roles) stays unsaid
    facts = host.model_dump(mode="json", exclude={"vms"}, exclude_none=True, exclude_defaults=True)
    facts.update(reaches_control_plane=True, storage_free_gib=round(free / GIB, 2))
    if address is not None:
        facts["replication_address"] = address
    if clock_skew_seconds is not None:
        facts["clock_skew_seconds"] = round(clock_skew_seconds, 3)
    return {"name": cfg.host, "platform": "kvm", "host_group": cfg.host_group, "replication_address": address,
            "storage_free_bytes": free, "facts": facts,
            "vms": [vm_entry(v, host.vms.get(v.name)) for v in sorted(owned, key=lambda v: v.name)]}


def collect(cfg: AgentConfig, driver: Any, clock_skew_seconds: float | None = None) -> dict[str, Any]:
    """The body of PUT /agent/inventory, from the driver (libvirt I/O)."""
    host = driver.host_facts(only=cfg.owns)
    vms = driver.list_vms(only=cfg.owns)
    free, _total = storage(cfg.replicas_dir)
    return {"hosts": [host_entry(cfg, host, vms, free, clock_skew_seconds)]}


def digest(entry: Mapping[str, Any]) -> str:
    """A stable digest of an inventory entry: sha256 of its canonical JSON (sorted keys, no
    spaces), the first 24 hex digits."""
    raw = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class Digests:
    """The digests the control plane said it stored, per host (its own fields) and per VM,
    and the reports built from them."""

    def __init__(self) -> None:
        self.hosts: dict[str, str] = {}  # host -> digest of its own fields
        self.vms: dict[str, dict[str, str]] = {}  # host -> VM name -> digest of its entry

    def report(self, full: Mapping[str, Any]) -> dict[str, Any]:
        """The body to send for `full` (`collect`'s): every entry with its digest, in full
        only where the digest is not the acknowledged one."""
        hosts = []
        for h in full["hosts"]:
            own = {k: v for k, v in h.items() if k != "vms"}
            hd = digest(own)
            entry: dict[str, Any] = ({"name": h["name"], "digest": hd} if self.hosts.get(h["name"]) == hd
                                     else {**own, "digest": hd})
            acked = self.vms.get(h["name"], {})
            vms, unchanged = [], {}
            for v in h["vms"]:
                vd = digest(v)
                if acked.get(v["name"]) == vd:
                    unchanged[v["name"]] = vd
                else:
                    vms.append({**v, "digest": vd})
            hosts.append({**entry, "vms": vms, "vm_digests": unchanged})
        return {"hosts": hosts}

    def acknowledge(self, sent: Mapping[str, Any], answer: Any) -> None:
        """Take the control plane's answer to `sent`: what it sent is acknowledged but for
        what the answer asks for again; nothing is unless the answer says it stores digests."""
        self.hosts, self.vms = {}, {}
        if not isinstance(answer, dict) or answer.get("digests_known") is not True:
            return
        resend = set(answer.get("resend") or [])
        hosts_resend = set(answer.get("hosts_resend") or [])
        for h in sent["hosts"]:
            name = h["name"]
            if name not in hosts_resend:
                self.hosts[name] = h["digest"]
            vms = {**{v["name"]: v["digest"] for v in h["vms"]}, **h["vm_digests"]}
            self.vms[name] = {n: d for n, d in vms.items() if f"{name}/{n}" not in resend}
