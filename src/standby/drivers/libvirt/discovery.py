"""Discovery: a libvirt host as a fabric `Host`, and libvirt hosts as a fabric document.

The parsing of what libvirt and QEMU report (capabilities, domain, network and volume
XML, `qemu-img info --output=json`) is done by pure functions returning plain data, so it
is tested on captured samples (tests/golden/libvirt/). The I/O (`host_facts`,
`discover_fabric`) only asks libvirt and `qemu-img` and feeds those functions.

What discovery reports, per host: libvirt and QEMU versions, the CPU (vendor, model,
features) from the host capabilities, free storage (the pools holding the VMs' disks, else
the default pool, else on a local connection the file systems of the VMs' disks or the
default images directory), and every domain with its disks (format from the domain's
driver type, qcow2 compat and virtual size from `qemu-img info` where the image is
readable here, else from the storage volume or libvirt's block info) and NICs (network
or bridge; address families from the libvirt network's `<ip>` elements, or from the
guest agent of a running VM, else IPv4).

What it cannot know, and leaves at the model's defaults for the operator to fill in:
reachability (control plane, replication peers), the replication address and clock skew.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from standby.domain.fabric import CpuInfo, Disk, DiskKind, Host, Nic, Vm
from standby.errors import BadInput, StandbyError

log = logging.getLogger(__name__)

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
DEFAULT_IMAGES_DIR = Path("/var/lib/libvirt/images")
GIB = 1 << 30

# ---------------------------------------------------------------------------------------
# Plain data parsed from libvirt and QEMU


@dataclass(frozen=True)
class DomainDisk:
    target: str  # vda, sdb, ...
    device: str  # disk, cdrom, floppy, lun
    source_type: str  # file, block, network, volume, ...
    path: str | None  # file or device path, network name, pool/volume; None when empty
    format: str | None  # the driver type (qcow2, raw, ...); None when not given
    bus: str | None = None
    shareable: bool = False
    readonly: bool = False
    encrypted: bool = False  # an <encryption> element (on the disk or its source)


@dataclass(frozen=True)
class DomainNic:
    mac: str | None
    type: str  # network, bridge, ethernet, user, direct, ...
    source: str | None  # the network name (type network), bridge (type bridge), device (direct)
    model: str | None = None
    link_up: bool = True

    @property
    def attachment(self) -> str | None:
        """The libvirt network or bridge this NIC is attached to (None: not attached to one)."""
        return self.source if self.type in ("network", "bridge") else None


@dataclass(frozen=True)
class DomainFacts:
    name: str
    uuid: str
    type: str  # kvm, qemu, ...
    running: bool  # the XML is a live one (it has an id)
    disks: list[DomainDisk] = field(default_factory=list)
    nics: list[DomainNic] = field(default_factory=list)
    has_guest_agent: bool = False


@dataclass(frozen=True)
class ImageFacts:
    format: str  # as QEMU names it: qcow2, raw, vpc (VHD), vhdx, luks, ...
    virtual_size: int
    compat: str | None = None  # qcow2 only: "0.10" (v2) or "1.1" (v3)
    encrypted: bool = False
    backing: str | None = None


@dataclass(frozen=True)
class NetworkFacts:
    name: str
    bridge: str | None
    forward: str | None  # None: isolated
    families: list[str] = field(default_factory=list)  # from its <ip> elements


@dataclass(frozen=True)
class HostCaps:
    cpu: CpuInfo | None
    arch: str | None
    domain_types: dict[str, list[str]] = field(default_factory=dict)  # guest arch -> [qemu, kvm]


# ---------------------------------------------------------------------------------------
# Pure parsing


def version_string(number: int) -> str:
    """libvirt's encoded version (major * 1,000,000 + minor * 1,000 + micro) as '9.0.0'."""
    if number < 0:
        raise ValueError(f"not a version number: {number}")
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise BadInput(f"{what}: not well-formed XML ({exc})") from None


def parse_capabilities(xml: str) -> HostCaps:
    """The host CPU and the domain types offered per guest architecture."""
    root = _xml(xml, "host capabilities")
    cpu_el = root.find("host/cpu")
    cpu = None
    arch = None
    if cpu_el is not None:
        arch = (cpu_el.findtext("arch") or "").strip() or None
        vendor = (cpu_el.findtext("vendor") or "").strip()
        model = (cpu_el.findtext("model") or "").strip()
        features = sorted({f.get("name", "") for f in cpu_el.findall("feature")} - {""})
        if vendor or model:
            cpu = CpuInfo(vendor=vendor or "unknown", model=model or "unknown", features=features)
    types: dict[str, list[str]] = {}
    for guest in root.findall("guest"):
        if (guest.findtext("os_type") or "").strip() != "hvm":
            continue
        arch_el = guest.find("arch")
        if arch_el is None:
            continue
        offered = types.setdefault(arch_el.get("name", ""), [])
        for dom in arch_el.findall("domain"):
            t = dom.get("type")
            if t and t not in offered:
                offered.append(t)
    return HostCaps(cpu=cpu, arch=arch, domain_types=types)


def _disk_source(disk: ET.Element, source_type: str) -> str | None:
    src = disk.find("source")
    if src is None:
        return None
    if source_type == "file":
        return src.get("file")
    if source_type == "block":
        return src.get("dev")
    if source_type == "dir":
        return src.get("dir")
    if source_type == "volume":
        pool, vol = src.get("pool"), src.get("volume")
        return f"{pool}/{vol}" if pool and vol else None
    if source_type == "network":
        name = src.get("name")
        return f"{src.get('protocol', 'network')}:{name}" if name else None
    return src.get("file") or src.get("dev") or src.get("name")


def parse_domain_xml(xml: str) -> DomainFacts:
    """Disks, NICs and the guest agent channel of a domain (live or inactive XML)."""
    root = _xml(xml, "domain XML")
    if root.tag != "domain":
        raise BadInput(f"domain XML: the root element is <{root.tag}>, not <domain>")
    disks = []
    nics = []
    agent = False
    devices = root.find("devices")
    for disk in devices.findall("disk") if devices is not None else []:
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            continue
        source_type = disk.get("type", "file")
        driver = disk.find("driver")
        disks.append(DomainDisk(
            target=dev, device=disk.get("device", "disk"), source_type=source_type,
            path=_disk_source(disk, source_type),
            format=driver.get("type") if driver is not None else None,
            bus=target.get("bus") if target is not None else None,
            shareable=disk.find("shareable") is not None, readonly=disk.find("readonly") is not None,
            encrypted=disk.find("encryption") is not None or disk.find("source/encryption") is not None))
    for iface in devices.findall("interface") if devices is not None else []:
        kind = iface.get("type", "")
        src = iface.find("source")
        source = None
        if src is not None:
            source = {"network": src.get("network"), "bridge": src.get("bridge"),
                      "direct": src.get("dev")}.get(kind) or src.get("network") or src.get("bridge")
        mac = iface.find("mac")
        model = iface.find("model")
        link = iface.find("link")
        nics.append(DomainNic(mac=mac.get("address") if mac is not None else None, type=kind, source=source,
                              model=model.get("type") if model is not None else None,
                              link_up=link is None or link.get("state", "up") != "down"))
    for channel in devices.findall("channel") if devices is not None else []:
        target = channel.find("target")
        if target is not None and target.get("type") == "virtio" and target.get("name") == GUEST_AGENT_CHANNEL:
            agent = True
    return DomainFacts(name=(root.findtext("name") or "").strip(), uuid=(root.findtext("uuid") or "").strip(),
                       type=root.get("type", ""), running=root.get("id") not in (None, "-1"),
                       disks=disks, nics=nics, has_guest_agent=agent)


def parse_qemu_img_info(text: str) -> ImageFacts:
    """`qemu-img info --output=json` of one image."""
    try:
        info = json.loads(text)
        fmt = str(info["format"])
        size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"qemu-img info: unexpected output ({exc})") from None
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    compat = data.get("compat") if specific.get("type") == "qcow2" else None
    encrypted = bool(info.get("encrypted")) or fmt == "luks" or "encrypt" in data
    return ImageFacts(format=fmt, virtual_size=size, compat=str(compat) if compat is not None else None,
                      encrypted=encrypted, backing=info.get("full-backing-filename") or info.get("backing-filename"))


def parse_volume_xml(xml: str) -> ImageFacts:
    """A storage volume's format, capacity and (qcow2) compat."""
    root = _xml(xml, "volume XML")
    cap = root.find("capacity")
    try:
        size = int((cap.text or "0").strip()) * _unit(cap.get("unit", "bytes")) if cap is not None else 0
    except ValueError:
        size = 0
    fmt_el = root.find("target/format")
    compat = (root.findtext("target/compat") or "").strip() or None
    fmt = fmt_el.get("type", "raw") if fmt_el is not None else "raw"
    encrypted = root.find("target/encryption") is not None
    if fmt == "qcow2" and compat is None:
        compat = "0.10"  # libvirt writes <compat> for qcow2 v3 only
    return ImageFacts(format=fmt, virtual_size=size, compat=compat if fmt == "qcow2" else None, encrypted=encrypted)


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}


def _unit(unit: str) -> int:
    return _UNITS.get(unit.lower(), 1)


def parse_network_xml(xml: str) -> NetworkFacts:
    root = _xml(xml, "network XML")
    bridge = root.find("bridge")
    forward = root.find("forward")
    families: list[str] = []
    for ip in root.findall("ip"):
        fam = ip.get("family", "ipv4")
        if fam in ("ipv4", "ipv6") and fam not in families:
            families.append(fam)
    return NetworkFacts(name=(root.findtext("name") or "").strip(),
                        bridge=bridge.get("name") if bridge is not None else None,
                        forward=forward.get("mode", "nat") if forward is not None else None,
                        families=families)


def families_of_addresses(addresses: Iterable[str]) -> list[str]:
    """['ipv4', 'ipv6'] as present among addresses (link-local IPv6 does not count)."""
    out: list[str] = []
    for addr in addresses:
        fam = "ipv6" if ":" in addr else "ipv4"
        if fam == "ipv6" and addr.lower().startswith("fe80:"):
            continue
        if fam not in out:
            out.append(fam)
    return sorted(out)


# ---------------------------------------------------------------------------------------
# Pure mapping to the fabric model

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:@-]")


def fabric_name(raw: str, fallback: str = "unnamed") -> str:
    """A valid fabric name for a libvirt name (invalid characters become '-')."""
    name = _NAME_BAD.sub("-", raw.strip())[:128]
    if not name:
        return fallback
    if not name[0].isalnum():
        name = ("x" + name)[:128]
    return name


def _unique(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    if name not in taken:
        return name
    n = 2
    while f"{name[:120]}-{n}" in taken:
        n += 1
    return f"{name[:120]}-{n}"


# QEMU's format names -> the fabric's (VHD is "vpc" to QEMU).
_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vpc": "vhd", "vhd": "vhd", "vhdx": "vhdx", "luks": "raw"}


def size_gib(size_bytes: int) -> float:
    """Bytes as GiB for the fabric: 3 decimals, rounded up so a tiny disk is never 0."""
    gib = -(-size_bytes * 1000 // GIB) / 1000
    return max(gib, 0.001)


def disk_to_fabric(disk: DomainDisk, image: ImageFacts | None, warnings: list[str], vm: str = "") -> Disk | None:
    """A fabric Disk for a domain disk (None for what is not a VM disk: CD-ROMs, floppies,
    empty drives, or a disk whose size or format cannot be told, with a warning)."""
    where = f"{vm}: disk {disk.target}" if vm else f"disk {disk.target}"
    if disk.device in ("cdrom", "floppy"):
        return None
    if disk.path is None:
        warnings.append(f"{where}: no source, skipped")
        return None
    raw_format = disk.format or (image.format if image is not None else None) or "raw"
    fmt = _FORMATS.get(raw_format)
    if fmt is None:
        warnings.append(f"{where}: format {raw_format!r} cannot be protected (convert it to qcow2); skipped")
        return None
    if image is None or image.virtual_size <= 0:
        warnings.append(f"{where}: its size cannot be read here; skipped")
        return None
    if disk.device == "lun":
        kind = DiskKind.PASSTHROUGH
    elif disk.shareable:
        kind = DiskKind.SHARED
    else:
        kind = DiskKind.VIRTUAL
    compat = image.compat if fmt == "qcow2" and image.compat in ("0.10", "1.1") else None
    return Disk(format=fmt, size_gib=size_gib(image.virtual_size), kind=kind,  # type: ignore[arg-type]
                encrypted=disk.encrypted or image.encrypted or raw_format == "luks", qcow2_compat=compat)


def nic_to_fabric(nic: DomainNic, network_name: str | None, families: list[str]) -> Nic:
    fams = [f for f in ("ipv4", "ipv6") if f in families] or ["ipv4"]
    return Nic(network=network_name, address_families=fams)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# I/O: one host


def is_local(conn: Any) -> bool:
    """Whether the connection's host is this machine (so its files can be read here)."""
    try:
        uri = conn.getURI()
    except Exception:  # noqa: BLE001 - a closed or odd connection: assume remote
        return False
    host = urlsplit(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def qemu_img_info(path: str, fmt: str | None = None, timeout: float = 30.0) -> ImageFacts | None:
    """`qemu-img info` of a local image (None when it cannot be read here), in the format
    the domain uses when known (never probed: a raw image may look like anything). -U: the
    image may be in use by a running VM."""
    args = ["qemu-img", "info", "--output=json", "-U", *(["-f", fmt] if fmt else []), path]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        return parse_qemu_img_info(r.stdout)
    except BadInput:
        return None


def _libvirt() -> Any:
    import libvirt

    return libvirt


def _image_facts(conn: Any, dom: Any, disk: DomainDisk, local: bool) -> ImageFacts | None:
    """The best facts we can get about a disk image: qemu-img (local files), then the
    storage volume, then libvirt's block info (size only)."""
    libvirt = _libvirt()
    if local and disk.source_type in ("file", "block") and disk.path:
        facts = qemu_img_info(disk.path, disk.format)
        if facts is not None:
            return facts
    if disk.path and disk.source_type in ("file", "block"):
        try:
            return parse_volume_xml(conn.storageVolLookupByPath(disk.path).XMLDesc(0))
        except (libvirt.libvirtError, BadInput):
            pass
    try:
        capacity = dom.blockInfo(disk.target)[0]
    except libvirt.libvirtError:
        return None
    return ImageFacts(format=disk.format or "raw", virtual_size=int(capacity))


def _agent_families(dom: Any) -> dict[str, list[str]]:
    """{mac: families} from the guest agent of a running VM ({} when it does not answer)."""
    libvirt = _libvirt()
    try:
        ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
    except libvirt.libvirtError:
        return {}
    out = {}
    for data in (ifaces or {}).values():
        mac = (data.get("hwaddr") or "").lower()
        if mac:
            out[mac] = families_of_addresses(a.get("addr", "") for a in data.get("addrs") or [])
    return out


def _free_storage(conn: Any, disk_paths: list[str], local: bool) -> float | None:
    """Free GiB: the pools holding the VMs' disks, else the default pool, else (local) the
    file systems of the VMs' disks or the default images directory."""
    libvirt = _libvirt()
    pools: list[tuple[str, str, int]] = []  # (name, target path, available bytes)
    try:
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            try:
                root = ET.fromstring(pool.XMLDesc(0))
                pools.append((pool.name(), (root.findtext("target/path") or "").rstrip("/"), int(pool.info()[3])))
            except (libvirt.libvirtError, ET.ParseError):
                continue
    except libvirt.libvirtError:
        pass
    holding = {name: avail for name, target, avail in pools
               if target and any(p.startswith(target + "/") for p in disk_paths)}
    if holding:
        return round(sum(holding.values()) / GIB, 2)
    default = [avail for name, _t, avail in pools if name == "default"]
    if default:
        return round(default[0] / GIB, 2)
    if not local:
        return None
    seen: dict[int, int] = {}
    dirs = [str(Path(p).parent) for p in disk_paths if p.startswith("/")] or [str(DEFAULT_IMAGES_DIR)]
    for d in dirs:
        probe = Path(d)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            st = os.statvfs(probe)
            seen.setdefault(os.stat(probe).st_dev, st.f_bavail * st.f_frsize)
        except OSError:
            continue
    return round(sum(seen.values()) / GIB, 2) if seen else None


@dataclass
class _NetCache:
    conn: Any
    nets: dict[str, NetworkFacts | None] = field(default_factory=dict)

    def get(self, name: str) -> NetworkFacts | None:
        if name not in self.nets:
            libvirt = _libvirt()
            try:
                self.nets[name] = parse_network_xml(self.conn.networkLookupByName(name).XMLDesc(0))
            except (libvirt.libvirtError, BadInput):
                self.nets[name] = None
        return self.nets[name]


def host_facts(conn: Any, warnings: list[str] | None = None, *, only: Callable[[str], bool] | None = None) -> Host:
    """This connection's host as a fabric Host. Problems that do not stop discovery (a
    disk whose size cannot be read, a format that cannot be protected) are appended to
    `warnings` (and logged). `only`: the domains (by name) to inspect; an agent sharing a
    libvirtd with others reads and warns about its own VMs only."""
    from standby.drivers.libvirt.connection import call

    warns: list[str] = [] if warnings is None else warnings
    start = len(warns)
    libvirt = _libvirt()
    local = is_local(conn)
    libvirt_version = version_string(call("libvirt version", conn.getLibVersion))
    try:
        qemu_version: str | None = version_string(conn.getVersion())
    except libvirt.libvirtError:
        qemu_version = None
    caps = parse_capabilities(call("host capabilities", conn.getCapabilities))
    nets = _NetCache(conn)
    vms: dict[str, Vm] = {}
    disk_paths: list[str] = []
    for dom in sorted(call("list domains", conn.listAllDomains, 0), key=lambda d: d.name()):
        if only is not None and not only(dom.name()):
            continue
        try:
            facts = parse_domain_xml(dom.XMLDesc(0))
        except libvirt.libvirtError:
            continue  # gone meanwhile
        vm_name = _unique(fabric_name(facts.name), vms)
        if vm_name != facts.name:
            warns.append(f"VM {facts.name!r} is named {vm_name!r} in the fabric (fabric names allow "
                         "letters, digits and _.:@-)")
        agent = _agent_families(dom) if facts.running and facts.has_guest_agent else {}
        disks: dict[str, Disk] = {}
        for d in facts.disks:
            if d.device in ("cdrom", "floppy"):
                continue
            image = _image_facts(conn, dom, d, local) if d.path else None
            disk = disk_to_fabric(d, image, warns, facts.name)
            if disk is not None:
                disks[fabric_name(d.target)] = disk
                if d.path and d.source_type in ("file", "block"):
                    disk_paths.append(d.path)
        nics = []
        for n in facts.nics:
            attached = n.attachment
            families: list[str] = []
            if n.type == "network" and attached:
                net = nets.get(attached)
                families = net.families if net is not None else []
            if not families and n.mac:
                families = agent.get(n.mac.lower(), [])
            nics.append(nic_to_fabric(n, fabric_name(attached) if attached else None, families))
        vms[vm_name] = Vm(disks=disks, nics=nics)
    host = Host(libvirt_version=libvirt_version, qemu_version=qemu_version, cpu=caps.cpu,
                storage_free_gib=_free_storage(conn, disk_paths, local), vms=vms)
    for w in warns[start:]:
        log.warning("%s: %s", _uri(conn), w)
    return host


def _uri(conn: Any) -> str:
    try:
        return str(conn.getURI())
    except Exception:  # noqa: BLE001
        return "libvirt"


def host_name(conn: Any) -> str:
    libvirt = _libvirt()
    try:
        raw = conn.getHostname()
    except libvirt.libvirtError:
        raw = urlsplit(_uri(conn)).hostname or "localhost"
    return fabric_name(raw.split(".")[0] if raw and not raw.replace(".", "").isdigit() else raw, "host")


# ---------------------------------------------------------------------------------------
# Many hosts -> a fabric document (pure assembly, then the I/O wrapper)


@dataclass(frozen=True)
class DiscoveredHost:
    uri: str
    name: str  # the host's fabric name (made unique across the discovery)
    host: Host
    site: str
    server: str
    cloud: str


def _per_uri(values: list[str] | None, count: int, option: str) -> list[str] | None:
    if not values:
        return None
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise BadInput(f"{option}: give it once (for every host) or once per URI ({count}), not {len(values)} times")
    return list(values)


def _check_name(value: str, option: str) -> str:
    if fabric_name(value) != value:
        raise BadInput(f"{option}: {value!r} is not a valid fabric name (letters, digits and _.:@-, "
                       "starting with a letter or digit)")
    return value


def assign_names(uris: list[str], host_names: list[str], sites: list[str] | None = None,
                 servers: list[str] | None = None, clouds: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """(host, site, server, cloud) per URI. Defaults: one site, server and cloud per host,
    named after it; options given once apply to every URI, else one per URI."""
    n = len(uris)
    s = _per_uri(sites, n, "--site")
    v = _per_uri(servers, n, "--server")
    c = _per_uri(clouds, n, "--cloud")
    out: list[tuple[str, str, str, str]] = []
    taken: list[str] = []
    for i, raw in enumerate(host_names):
        host = _unique(raw, taken)
        taken.append(host)
        site = _check_name(s[i], "--site") if s else f"site-{host}"
        server = _check_name(v[i], "--server") if v else f"mgr-{host}"
        cloud = _check_name(c[i], "--cloud") if c else f"cloud-{host}"
        out.append((host, site, server, cloud))
    server_site: dict[str, str] = {}
    cloud_server: dict[str, str] = {}
    for host, site, server, cloud in out:
        if server_site.setdefault(server, site) != site:
            raise BadInput(f"server {server!r} would sit in two sites ({server_site[server]!r} and {site!r}); "
                           "give --server once per site")
        if cloud_server.setdefault(cloud, server) != server:
            raise BadInput(f"cloud {cloud!r} would belong to two servers ({cloud_server[cloud]!r} and {server!r}); "
                           "a cloud belongs to one server")
    return out


def fabric_document(hosts: list[DiscoveredHost], control_plane: str | None = None,
                    standby_version: str = "0.1.0") -> dict[str, Any]:
    """The fabric document (plain data, ready for YAML) for discovered hosts: a site and a
    server per distinct name, a cloud per host group, a network per attached libvirt
    network or bridge (named `NET@SITE` when the same name is seen at two sites)."""
    doc: dict[str, Any] = {}
    if control_plane:
        doc["control_plane"] = {"endpoint": control_plane}
    sites: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    clouds: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    site_uris: dict[str, list[str]] = {}
    for h in hosts:
        site_uris.setdefault(h.site, []).append(h.uri)
        sites[h.site] = {"description": "discovered from " + ", ".join(site_uris[h.site])}
        servers.setdefault(h.server, {"site": h.site, "platform": "kvm", "version": standby_version})
        group = f"{h.cloud}-hosts"
        clouds.setdefault(h.cloud, {"server": h.server, "capabilities": ["kvm"], "host_groups": [group]})
        groups.setdefault(group, {"hosts": []})["hosts"].append(h.name)
    # Networks: one per (site, name); a name at two sites is qualified with its site.
    seen: dict[str, set[str]] = {}
    for h in hosts:
        for vm in h.host.vms.values():
            for nic in vm.nics:
                if nic.network is not None:
                    seen.setdefault(nic.network, set()).add(h.site)

    def net_name(name: str, site: str) -> str:
        return name if len(seen[name]) == 1 else fabric_name(f"{name}@{site}")

    networks: dict[str, Any] = {}
    for name, where in sorted(seen.items()):
        for site in sorted(where):
            networks[net_name(name, site)] = {"site": site}
    host_docs: dict[str, Any] = {}
    for h in hosts:
        data = h.host.model_dump(mode="json", exclude_defaults=True)
        for vm_name, vm in h.host.vms.items():
            nics = data.get("vms", {}).get(vm_name, {}).get("nics")
            if not nics:
                continue
            for i, nic in enumerate(vm.nics):
                if nic.network is not None:
                    nics[i]["network"] = net_name(nic.network, h.site)
        host_docs[h.name] = data
    doc.update({"sites": sites, "servers": servers, "clouds": clouds, "host_groups": groups})
    if networks:
        doc["networks"] = networks
    doc["hosts"] = host_docs
    return doc


def discover_fabric(uris: list[str], *, sites: list[str] | None = None, servers: list[str] | None = None,
                    clouds: list[str] | None = None, control_plane: str | None = None,
                    warnings: list[str] | None = None,
                    connect: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Connect to each URI, discover its host, and return a fabric document (a dict that
    `standby.fabric_file.parse_fabric` accepts: checked before it is returned)."""
    import yaml

    from standby import __version__
    from standby.drivers.libvirt.connection import open_connection
    from standby.fabric_file import parse_fabric

    if not uris:
        raise BadInput("give at least one libvirt URI (for example qemu:///system)")
    if len(set(uris)) != len(uris):
        raise BadInput("a URI is given twice")
    opener = connect or open_connection
    warns: list[str] = [] if warnings is None else warnings
    found: list[tuple[str, str, Host]] = []
    for uri in uris:
        conn = opener(uri)
        try:
            host_warns: list[str] = []
            host = host_facts(conn, host_warns)
            warns.extend(f"{uri}: {w}" for w in host_warns)
            found.append((uri, host_name(conn), host))
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
    names = assign_names(uris, [n for _u, n, _h in found], sites, servers, clouds)
    hosts = [DiscoveredHost(uri, name, host, site, server, cloud)
             for (uri, _n, host), (name, site, server, cloud) in zip(found, names)]
    doc = fabric_document(hosts, control_plane, __version__)
    try:
        parse_fabric(yaml.safe_dump(doc, sort_keys=False), "discovered fabric")
    except StandbyError as exc:
        raise BadInput(f"the discovered fabric does not validate: {exc.message}") from None
    return doc
