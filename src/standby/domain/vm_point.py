"""What a VM recovery point carries so that the secondary can start the VM on its own.

Every disk point of a VM's cycle holds, in its `meta` under `vm_point`, the same
manifest (one per cycle, written by the primary agent that ran the cycle):

    {"format": "standby-vm-point/1",
     "vm": "web01",                        the VM as the primary knows it
     "cycle": "standby-17",                the cycle key (the checkpoint): with `disks`,
                                           it names one point on each replica disk
     "disks": {"vda": "web01-vda", ...},   disk target -> replica disk id
     "domain_xml": "<domain ...>",         the VM's definition as replicated (libvirt)
     "networks": [{"mac": "52:54:..", "primary": "prod", "secondary": "dr-prod"}, ...],
                                           one per NIC, in order; `secondary` is the
                                           network mapping in force (null: not mapped)
     "policy": {"name": ..., "copy_frequency_seconds": ..., "retention_hours": ...,
                "app_consistent_interval_hours": ...},
     "item_id": 7}                         the control plane's protected item, if any

With it, the secondary's replica store alone is enough for a failover: which points
form a whole VM point, how to define the replica (the source's definition with the
overlays as disks and the mapped networks), and what policy was in force. The store
seals each point's meta with a digest (`replication/store.py`), checked by `verify`.

Pure: parsing and checking only. A manifest that does not parse is reported with the
field at fault (`BadManifest`), never half-used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from standby.errors import BadInput

FORMAT = "standby-vm-point/1"
META_KEY = "vm_point"
MAX_DOMAIN_XML = 48 * 1024  # the whole meta of a point travels in CYCLE_END (<= 64 KiB)

_TARGET = re.compile(r"^(vd|sd|hd|xvd)[a-z]{1,3}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class BadManifest(BadInput):
    """A point's VM manifest is missing a field or has a wrong one."""


@dataclass(frozen=True)
class NicMapping:
    mac: str | None
    primary: str | None  # the network the NIC is on at the primary (None: not a network NIC)
    secondary: str | None  # where the mapping puts it on the secondary (None: not mapped)

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "primary": self.primary, "secondary": self.secondary}


@dataclass(frozen=True)
class VmManifest:
    vm: str
    cycle: str
    disks: dict[str, str]  # target -> replica disk id
    domain_xml: str | None
    networks: tuple[NicMapping, ...] = ()
    policy: dict[str, Any] = field(default_factory=dict)
    item_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "vm": self.vm, "cycle": self.cycle, "disks": dict(self.disks),
                "domain_xml": self.domain_xml, "networks": [n.as_dict() for n in self.networks],
                "policy": dict(self.policy), "item_id": self.item_id}

    @property
    def startable(self) -> bool:
        """Whether the secondary can define the VM from this manifest alone."""
        return bool(self.domain_xml) and bool(self.disks)

    def secondary_networks(self) -> list[str | None]:
        """Per NIC, the secondary network the mapping names (None: leave it unconnected)."""
        return [n.secondary for n in self.networks]


def _str(d: Mapping[str, Any], key: str, *, optional: bool = False, limit: int = 256) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > limit:
        raise BadManifest(f"VM manifest: {key!r} must be a non-empty string of at most {limit} characters, "
                          f"not {v!r:.80}")
    return v


def parse(raw: Any) -> VmManifest:
    """A manifest from a point's `meta["vm_point"]`; BadManifest names the field at fault."""
    if not isinstance(raw, Mapping):
        raise BadManifest(f"VM manifest must be an object, not {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise BadManifest(f"VM manifest: format {raw.get('format')!r} is not {FORMAT!r}")
    vm = _str(raw, "vm")
    cycle = _str(raw, "cycle")
    disks_raw = raw.get("disks")
    if not isinstance(disks_raw, Mapping) or not disks_raw:
        raise BadManifest("VM manifest: 'disks' must be a non-empty object {target: disk id}")
    disks: dict[str, str] = {}
    for target, disk_id in disks_raw.items():
        if not isinstance(target, str) or not _TARGET.fullmatch(target):
            raise BadManifest(f"VM manifest: disk target {target!r} is not a target such as vda")
        if not isinstance(disk_id, str) or not disk_id:
            raise BadManifest(f"VM manifest: the disk id of {target} must be a non-empty string")
        disks[target] = disk_id
    xml = raw.get("domain_xml")
    if xml is not None and (not isinstance(xml, str) or not xml.lstrip().startswith("<domain")
                            or len(xml) > MAX_DOMAIN_XML):
        raise BadManifest("VM manifest: 'domain_xml' must be a libvirt <domain> definition "
                          f"of at most {MAX_DOMAIN_XML} characters")
    nets_raw = raw.get("networks")
    nets_raw = [] if nets_raw is None else nets_raw
    if not isinstance(nets_raw, list):
        raise BadManifest("VM manifest: 'networks' must be a list, one entry per NIC")
    nets = []
    for i, n in enumerate(nets_raw):
        if not isinstance(n, Mapping):
            raise BadManifest(f"VM manifest: networks[{i}] must be an object")
        mac = n.get("mac")
        if mac is not None and (not isinstance(mac, str) or not _MAC.fullmatch(mac)):
            raise BadManifest(f"VM manifest: networks[{i}].mac {mac!r} is not a MAC address")
        prim, sec = n.get("primary"), n.get("secondary")
        for key, v in (("primary", prim), ("secondary", sec)):
            if v is not None and (not isinstance(v, str) or not v or len(v) > 256):
                raise BadManifest(f"VM manifest: networks[{i}].{key} must be a network name or null")
        nets.append(NicMapping(mac, prim, sec))
    policy = raw.get("policy")
    policy = {} if policy is None else policy
    if not isinstance(policy, Mapping):
        raise BadManifest("VM manifest: 'policy' must be an object")
    item_id = raw.get("item_id")
    if item_id is not None and (not isinstance(item_id, int) or isinstance(item_id, bool)):
        raise BadManifest(f"VM manifest: 'item_id' must be an integer, not {item_id!r}")
    assert vm is not None and cycle is not None
    return VmManifest(vm, cycle, disks, xml, tuple(nets), dict(policy), item_id)


def of_meta(meta: Mapping[str, Any]) -> VmManifest | None:
    """The manifest a point's meta carries; None for points written before manifests."""
    raw = meta.get(META_KEY)
    return None if raw is None else parse(raw)


def build(vm: str, cycle: str, disks: Mapping[str, str], domain_xml: str | None, *,
          nics: list[tuple[str | None, str | None]] = (),  # type: ignore[assignment]
          network_map: Mapping[str, str | None] | None = None, policy: Mapping[str, Any] | None = None,
          item_id: int | None = None) -> VmManifest:
    """The manifest of one cycle: `nics` are the VM's (mac, primary network) in order,
    `network_map` the mapping in force (primary -> secondary network)."""
    mapping = network_map or {}
    nets = tuple(NicMapping(mac, net, mapping.get(net) if net else None) for mac, net in nics)
    xml = domain_xml if domain_xml and len(domain_xml) <= MAX_DOMAIN_XML else None
    m = VmManifest(vm, cycle, dict(disks), xml, nets, dict(policy or {}), item_id)
    parse(m.as_dict())  # what a secondary will read back must parse
    return m
