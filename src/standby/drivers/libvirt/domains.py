"""VM lifecycle on a libvirt host: list, inspect, define from recovery points, start,
stop, remove; and isolated networks for test failovers.

`build_domain_xml` (pure) turns a `VmSpec` into domain XML. With the source domain's XML
as a template it keeps the VM's shape (boot method, kernel/initrd/cmdline, memory,
vCPUs, CPU, machine type, disk targets and buses, NIC models, MACs and PCI addresses) and
replaces what belongs to the source host: name, UUID, disk sources (the overlays),
NIC attachments, console log files, guest agent socket paths, NVRAM, the emulator
path, host devices and runtime-only state (ids, aliases, tap names, security labels).
Disks of the template that the spec does not carry are left out; CD-ROMs stay, empty.

NIC attachments: each entry of `spec.networks` is a libvirt network name, a bridge name
(`network:NAME` / `bridge:NAME` to say which), or None: the NIC is kept (the guest sees
the same hardware) but attached to nothing, an unconnected tap with its link down.

The domain type (kvm or qemu) is decided at define time: the STANDBY_DOMAIN_TYPE
environment variable when set, else the template's type if the host offers it, else kvm
when the host offers it, else qemu (software emulation).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import subprocess
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from standby.drivers.base import DiskInfo, NicInfo, VmInfo, VmSpec, VmState
from standby.drivers.libvirt.connection import call, translate
from standby.drivers.libvirt.discovery import is_local, parse_capabilities, parse_domain_xml
from standby.errors import BadInput, Conflict, NotFound, Refused, RemoteError

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

BRIDGE_PREFIX = "sby"  # bridges Standby makes itself (Linux limit: 15 characters)

# ---------------------------------------------------------------------------------------
# Pure: domain XML


@dataclass(frozen=True)
class Attachment:
    kind: str  # "network" (a libvirt network) or "bridge" (a host bridge)
    name: str


def bus_for_target(target: str) -> str:
    for prefix, bus in (("vd", "virtio"), ("sd", "scsi"), ("hd", "ide"), ("xvd", "xen")):
        if target.startswith(prefix):
            return bus
    return "virtio"


_TARGET = re.compile(r"^(vd|sd|hd|xvd)[a-z]{1,3}$")


def _check_spec(spec: VmSpec) -> None:
    if not spec.name or "/" in spec.name or len(spec.name) > 200:
        raise BadInput(f"VM name {spec.name!r} is not valid")
    if not spec.disks:
        raise BadInput(f"VM {spec.name}: no disks given")
    for target in spec.disks:
        if not _TARGET.fullmatch(target):
            raise BadInput(f"VM {spec.name}: disk target {target!r} is not a device name such as vda or sdb")
    if spec.memory_mib < 16 or spec.vcpus < 1:
        raise BadInput(f"VM {spec.name}: memory_mib must be >= 16 and vcpus >= 1")


def _strip_whitespace(el: ET.Element) -> None:
    for e in el.iter():
        if e.text is not None and not e.text.strip():
            e.text = None
        if e.tail is not None and not e.tail.strip():
            e.tail = None


def _drop_runtime(el: ET.Element) -> None:
    """Aliases libvirt assigned (user aliases, ua-*, are configuration and stay)."""
    for parent in el.iter():
        for child in list(parent):
            if child.tag == "alias" and not child.get("name", "").startswith("ua-"):
                parent.remove(child)


def _sub(parent: ET.Element, tag: str, attrib: dict[str, str] | None = None, text: str | None = None,
         index: int | None = None) -> ET.Element:
    el = ET.Element(tag, attrib or {})
    el.text = text
    if index is None:
        parent.append(el)
    else:
        parent.insert(index, el)
    return el


def _disk_element(target: str, path: Path, fmt: str) -> ET.Element:
    disk = ET.Element("disk", {"type": "file", "device": "disk"})
    _sub(disk, "driver", {"name": "qemu", "type": fmt})
    _sub(disk, "source", {"file": str(path)})
    _sub(disk, "target", {"dev": target, "bus": bus_for_target(target)})
    return disk


def _set_disk_source(disk: ET.Element, path: Path, fmt: str) -> None:
    disk.set("type", "file")
    if disk.get("device") == "lun":
        disk.set("device", "disk")  # an overlay file cannot be a SCSI pass-through LUN
    for tag in ("source", "backingStore", "mirror", "shareable"):
        for child in disk.findall(tag):
            disk.remove(child)
    driver = disk.find("driver")
    if driver is None:
        driver = _sub(disk, "driver", {"name": "qemu"}, index=0)
    driver.set("name", "qemu")
    driver.set("type", fmt)
    index = list(disk).index(driver) + 1
    _sub(disk, "source", {"file": str(path)}, index=index)


def _interface_element(att: Attachment | None, mac: str | None = None, model: str = "virtio") -> ET.Element:
    iface = ET.Element("interface")
    if mac:
        _sub(iface, "mac", {"address": mac})
    _sub(iface, "model", {"type": model})
    _attach(iface, att)
    return iface


# What an interface keeps from the template: the guest-visible hardware and its tuning.
_IFACE_KEEP = {"mac", "model", "driver", "address", "boot", "rom", "mtu", "coalesce", "bandwidth", "tune"}


def _attach(iface: ET.Element, att: Attachment | None) -> None:
    for child in list(iface):
        if child.tag not in _IFACE_KEEP:
            iface.remove(child)
    index = 1 if iface.find("mac") is not None else 0
    if att is None:
        iface.set("type", "ethernet")  # a tap of its own, on no bridge: connected to nothing
        _sub(iface, "link", {"state": "down"})
        return
    iface.set("type", att.kind)
    _sub(iface, "source", {att.kind: att.name}, index=index)
    _sub(iface, "link", {"state": "up"})


def _console_paths(devices: ET.Element, console_log: str | None) -> None:
    """File consoles write to `console_log` (a second distinct file to NAME.1.log, ...),
    never to the source VM's files."""
    renamed: dict[str, str] = {}

    def new_path(old: str) -> str:
        assert console_log is not None
        if old not in renamed:
            n = len(renamed)
            renamed[old] = console_log if n == 0 else re.sub(r"(\.log)?$", f".{n}.log", console_log, count=1)
        return renamed[old]

    for tag in ("serial", "console", "parallel", "channel"):
        for dev in devices.findall(tag):
            kind = dev.get("type")
            dev.attrib.pop("tty", None)
            src = dev.find("source")
            if kind == "file" and src is not None:
                if console_log is None:
                    raise BadInput("the template has a file console but no console log path was given")
                src.set("path", new_path(src.get("path", "")))
            elif kind in ("pty", "unix") and src is not None:
                src.attrib.pop("path", None)  # libvirt makes its own (a pty, a per-domain socket)
                if kind == "pty" and not src.attrib:
                    dev.remove(src)
            log_el = dev.find("log")
            if log_el is not None and console_log is not None:
                log_el.set("file", new_path(log_el.get("file", "")))
            target = dev.find("target")
            if target is not None:
                target.attrib.pop("state", None)


def build_domain_xml(spec: VmSpec, *, domain_type: str, uuid: str, attachments: list[Attachment | None],
                     disk_formats: dict[str, str] | None = None, console_log: str | None = None,
                     arch: str = "x86_64") -> str:
    """The domain XML to define for `spec` (see the module's docstring). `attachments`
    has one entry per NIC (the resolved spec.networks); `disk_formats` maps a target to its
    overlay's format (default qcow2); `console_log` is where file consoles write."""
    _check_spec(spec)
    if domain_type not in ("kvm", "qemu"):
        raise BadInput(f"domain type must be kvm or qemu, not {domain_type!r}")
    if len(attachments) != len(spec.networks):
        raise BadInput("one attachment per entry of spec.networks is needed")
    formats = disk_formats or {}
    root = _template_root(spec, console_log) if spec.template_xml else _fresh_root(spec, arch, console_log)
    root.set("type", domain_type)
    root.attrib.pop("id", None)
    cpu = root.find("cpu")
    if domain_type == "qemu" and cpu is not None and cpu.get("mode") == "host-passthrough":
        cpu.set("mode", "maximum")  # emulation has no host CPU to pass through; its nearest is QEMU's max
        cpu.attrib.pop("migratable", None)
    name = root.find("name")
    if name is None:
        name = _sub(root, "name", index=0)
    name.text = spec.name
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = _sub(root, "uuid", index=list(root).index(name) + 1)
    uuid_el.text = uuid
    devices = root.find("devices")
    if devices is None:
        devices = _sub(root, "devices")

    # Disks: the template's targets get the overlays; targets it lacks are added.
    placed: set[str] = set()
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if disk.get("device") in ("cdrom", "floppy"):
            for tag in ("source", "backingStore"):
                for child in disk.findall(tag):
                    disk.remove(child)
            disk.set("type", "file")
            continue
        if dev not in spec.disks:
            devices.remove(disk)
            continue
        _set_disk_source(disk, spec.disks[dev], formats.get(dev, "qcow2"))
        placed.add(dev)
    index = _device_index(devices, "disk")
    for target in sorted(set(spec.disks) - placed):
        devices.insert(index, _disk_element(target, spec.disks[target], formats.get(target, "qcow2")))
        index += 1

    # NICs: the template's, in order, then new ones; unmapped ones attached to nothing.
    ifaces = devices.findall("interface")
    for i, iface in enumerate(ifaces):
        _attach(iface, attachments[i] if i < len(attachments) else None)
    index = _device_index(devices, "interface")
    for att in attachments[len(ifaces):]:
        devices.insert(index, _interface_element(att))
        index += 1

    _strip_whitespace(root)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _device_index(devices: ET.Element, tag: str) -> int:
    """Where to insert another `tag` device: after the last one (an interface: else after
    the last disk), else after the emulator."""
    children = list(devices)
    for t in (tag, "disk") if tag == "interface" else (tag,):
        last = max((i for i, c in enumerate(children) if c.tag == t), default=None)
        if last is not None:
            return last + 1
    return 1 if children and children[0].tag == "emulator" else 0


def _template_root(spec: VmSpec, console_log: str | None) -> ET.Element:
    assert spec.template_xml is not None
    try:
        root = ET.fromstring(spec.template_xml)
    except ET.ParseError as exc:
        raise BadInput(f"VM {spec.name}: the template is not well-formed XML ({exc})") from None
    if root.tag != "domain":
        raise BadInput(f"VM {spec.name}: the template's root element is <{root.tag}>, not <domain>")
    root = copy.deepcopy(root)
    for tag in ("seclabel", "resource"):
        for el in root.findall(tag):
            root.remove(el)
    metadata = root.find("metadata")
    if metadata is not None:
        for child in list(metadata):
            if "standby" in child.tag.lower():  # the source's tracking state is not the copy's
                metadata.remove(child)
    os_el = root.find("os")
    if os_el is not None:
        for nvram in os_el.findall("nvram"):
            os_el.remove(nvram)  # libvirt makes a fresh one for the new name from the firmware's template
    _drop_runtime(root)
    devices = root.find("devices")
    if devices is not None:
        for tag in ("emulator", "hostdev", "redirdev", "smartcard"):
            for el in devices.findall(tag):
                devices.remove(el)
        for iface in devices.findall("interface"):
            if iface.get("type") == "hostdev":  # SR-IOV: becomes an emulated NIC of the same MAC
                iface.attrib.pop("managed", None)
                for drv in iface.findall("driver"):
                    iface.remove(drv)
        for g in devices.findall("graphics"):
            if g.get("autoport", "yes") == "yes":
                for attr in ("port", "tlsPort", "websocket"):
                    g.attrib.pop(attr, None)
        _console_paths(devices, console_log)
    return root


def _fresh_root(spec: VmSpec, arch: str, console_log: str | None) -> ET.Element:
    root = ET.Element("domain")
    _sub(root, "name", text=spec.name)
    _sub(root, "memory", {"unit": "MiB"}, str(int(spec.memory_mib)))
    _sub(root, "vcpu", text=str(int(spec.vcpus)))
    os_el = _sub(root, "os")
    _sub(os_el, "type", {"arch": arch}, "hvm")
    _sub(os_el, "boot", {"dev": "hd"})
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(root, "clock", {"offset": "utc"})
    _sub(root, "on_poweroff", text="destroy")
    _sub(root, "on_reboot", text="restart")
    _sub(root, "on_crash", text="destroy")
    devices = _sub(root, "devices")
    serial = _sub(devices, "serial", {"type": "pty"})
    if console_log is not None:
        _sub(serial, "log", {"file": console_log, "append": "off"})
    _sub(serial, "target", {"port": "0"})
    console = _sub(devices, "console", {"type": "pty"})
    _sub(console, "target", {"type": "serial", "port": "0"})
    video = _sub(devices, "video")
    _sub(video, "model", {"type": "vga"})
    return root


# ---------------------------------------------------------------------------------------
# Pure: state

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING, libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUT_OFF, libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
}


def vm_state(state: int, reason: int) -> VmState:
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return VmState.CRASHED
    return _STATES.get(state, VmState.OTHER)


# ---------------------------------------------------------------------------------------
# I/O: VMs


def _lookup(conn: Any, name: str) -> Any:
    return call(f"VM {name}", conn.lookupByName, name)


def vm_info(conn: Any, name: str) -> VmInfo:
    return _info(conn, _lookup(conn, name))


def _info(conn: Any, dom: Any) -> VmInfo:
    name = dom.name()
    facts = parse_domain_xml(call(f"VM {name}: XML", dom.XMLDesc, 0))
    state, reason = call(f"VM {name}: state", dom.state)
    disks = []
    for d in facts.disks:
        if d.device in ("cdrom", "floppy") or d.path is None:
            continue
        try:
            size = int(dom.blockInfo(d.target)[0])
        except libvirt.libvirtError:
            size = 0
        disks.append(DiskInfo(target=d.target, path=d.path, format=d.format or "raw", size=size))
    nics = [NicInfo(mac=n.mac or "", network=n.attachment if n.link_up else None) for n in facts.nics]
    return VmInfo(name=name, uuid=facts.uuid or dom.UUIDString(), state=vm_state(state, reason), disks=disks,
                  nics=nics, has_guest_agent=facts.has_guest_agent)


def list_vms(conn: Any, only: Callable[[str], bool] | None = None) -> list[VmInfo]:
    out = []
    for dom in call("list VMs", conn.listAllDomains, 0):
        if only is not None and not only(dom.name()):
            continue
        try:
            out.append(_info(conn, dom))
        except NotFound:
            continue  # removed meanwhile
    return sorted(out, key=lambda v: v.name)


def choose_domain_type(conn: Any, preferred: str | None = None, arch: str = "x86_64") -> str:
    """kvm or qemu for a new domain here (see the module docstring)."""
    forced = os.environ.get("STANDBY_DOMAIN_TYPE", "").strip()
    if forced:
        if forced not in ("kvm", "qemu"):
            raise BadInput(f"STANDBY_DOMAIN_TYPE must be kvm or qemu, not {forced!r}")
        return forced
    offered = parse_capabilities(call("host capabilities", conn.getCapabilities)).domain_types.get(arch, [])
    if preferred in offered:
        return str(preferred)
    if preferred is None and "kvm" in offered:
        return "kvm"
    if "qemu" in offered or not offered:
        return "qemu"
    return offered[0]


def _network_exists(conn: Any, name: str) -> bool:
    try:
        conn.networkLookupByName(name)
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return False
        raise translate(exc, f"network {name}") from None


def _is_bridge(name: str) -> bool:
    return bool(name) and "/" not in name and Path("/sys/class/net", name, "bridge").is_dir()


def resolve_attachment(conn: Any, network: str | None) -> Attachment | None:
    """A spec.networks entry as an attachment: `network:NAME`, `bridge:NAME`, or a plain
    name looked up as a libvirt network, then (on a local connection) as a bridge."""
    if network is None:
        return None
    kind, _, name = network.partition(":")
    if kind in ("network", "bridge") and name:
        if kind == "network" and not _network_exists(conn, name):
            raise NotFound(f"no libvirt network named {name!r}")
        if kind == "bridge" and is_local(conn) and not _is_bridge(name):
            raise NotFound(f"no bridge named {name!r} on this host")
        return Attachment(kind, name)
    if _network_exists(conn, network):
        return Attachment("network", network)
    if not is_local(conn) or _is_bridge(network):
        return Attachment("bridge", network)
    raise NotFound(f"no libvirt network or bridge named {network!r} on this host")


def console_log_path(spec: VmSpec) -> Path:
    """Where a VM defined from `spec` writes its serial console: next to its first overlay."""
    first = spec.disks[sorted(spec.disks)[0]]
    return Path(first).parent / f"{spec.name}.console.log"


def _overlay_format(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "qcow2"


def define_vm(conn: Any, spec: VmSpec, *, domain_type: str | None = None) -> VmInfo:
    """Define (persistently, not started) a VM from materialized recovery points."""
    _check_spec(spec)
    try:
        conn.lookupByName(spec.name)
        raise Conflict(f"a VM named {spec.name!r} already exists on this host")
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise translate(exc, f"VM {spec.name}") from None
    local = is_local(conn)
    formats = {}
    for target, path in spec.disks.items():
        if local and not Path(path).is_file():
            raise NotFound(f"VM {spec.name}: the disk image for {target} does not exist: {path}")
        formats[target] = _overlay_format(Path(path)) if local else "qcow2"
    attachments = [resolve_attachment(conn, n) for n in spec.networks]
    preferred = arch = None
    if spec.template_xml:
        try:
            troot = ET.fromstring(spec.template_xml)
        except ET.ParseError as exc:
            raise BadInput(f"VM {spec.name}: the template is not well-formed XML ({exc})") from None
        preferred = troot.get("type")
        type_el = troot.find("os/type")
        arch = type_el.get("arch") if type_el is not None else None
    dtype = domain_type or choose_domain_type(conn, preferred, arch or "x86_64")
    xml = build_domain_xml(spec, domain_type=dtype, uuid=str(uuid_mod.uuid4()), attachments=attachments,
                           disk_formats=formats, console_log=str(console_log_path(spec)), arch=arch or "x86_64")
    dom = call(f"define VM {spec.name}", conn.defineXML, xml)
    return _info(conn, dom)


def start_vm(conn: Any, name: str) -> None:
    dom = _lookup(conn, name)
    call(f"start VM {name}", dom.create)


def set_autostart(conn: Any, name: str, on: bool) -> bool:
    """Set whether libvirtd starts the VM with the host; returns the previous setting."""
    dom = _lookup(conn, name)
    before = bool(call(f"VM {name}: autostart", dom.autostart))
    if before != on:
        call(f"VM {name}: set autostart", dom.setAutostart, 1 if on else 0)
    return before


def _active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        raise translate(exc, f"VM {dom.name()}") from None


def destroy_vm(conn: Any, name: str) -> None:
    """Power off now (no guest shutdown); a VM already off is left as it is."""
    dom = _lookup(conn, name)
    if not _active(dom):
        return
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not _active(dom):
            return  # stopped meanwhile
        raise translate(exc, f"destroy VM {name}") from None


def shutdown_vm(conn: Any, name: str, timeout: float = 60.0) -> bool:
    """ACPI shutdown; powered off after `timeout` seconds if the guest has not stopped.
    Returns True when the guest shut down by itself (or was already off)."""
    dom = _lookup(conn, name)
    if not _active(dom):
        return True
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as exc:
        if not _active(dom):
            return True
        if exc.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED,
                                        libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
            raise translate(exc, f"shut down VM {name}") from None
        log.info("VM %s: ACPI shutdown refused (%s); powering off", name, exc.get_error_message())
        timeout = 0
    deadline = time.monotonic() + max(0.0, timeout)
    while time.monotonic() < deadline:
        if not _active(dom):
            return True
        time.sleep(0.2)
    if not _active(dom):
        return True
    log.info("VM %s did not shut down within %.0f s; powering it off", name, timeout)
    destroy_vm(conn, name)
    return False


def _delete_metadata(dom: Any, name: str) -> None:
    """Checkpoint and snapshot metadata, leaves first (libvirt keeps them in its own
    files; left behind they clash with a later domain of the same name)."""
    kinds = (
        ("checkpoint", dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES,
         libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT),
        ("snapshot", dom.listAllSnapshots, libvirt.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES,
         libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT),
    )
    for kind, list_all, leaves_only, metadata_only, gone in kinds:
        for _ in range(10_000):
            leaves = call(f"VM {name}: {kind}s", list_all, leaves_only)
            if not leaves:
                break
            for moment in leaves:
                try:
                    moment.delete(metadata_only)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != gone:
                        raise translate(exc, f"VM {name}: delete {kind} {moment.getName()}") from None


def undefine_vm(conn: Any, name: str) -> None:
    """Remove a stopped VM's definition, its checkpoint and snapshot metadata, managed save
    and NVRAM. Its disk images stay (they belong to the caller). A running VM is refused."""
    dom = _lookup(conn, name)
    if _active(dom):
        raise Conflict(f"VM {name} is running; stop it before removing it")
    _delete_metadata(dom, name)
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    call(f"remove VM {name}", dom.undefineFlags, flags)


# ---------------------------------------------------------------------------------------
# Isolated networks for test failover


def bridge_name_for(name: str) -> str:
    """The bridge of an isolated network: sby + 12 hex digits (Linux allows 15)."""
    return BRIDGE_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:12]


def isolated_network_xml(name: str, bridge: str) -> str:
    """A libvirt network with a bridge and nothing else: no forward (isolated), no IP, so
    no DHCP and no dnsmasq."""
    root = ET.Element("network")
    _sub(root, "name", text=name)
    _sub(root, "bridge", {"name": bridge, "stp": "off", "delay": "0"})
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _check_network_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name or ""):
        raise BadInput(f"network name {name!r} is not valid (letters, digits and _.@-, at most 64)")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RemoteError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


def create_isolated_network(conn: Any, name: str) -> str:
    """An isolated network for test failover; returns what to attach NICs to: the libvirt
    network's name, or, when libvirt cannot start one here (no iptables), the name of a
    plain Linux bridge made instead (logged as a warning). Idempotent."""
    _check_network_name(name)
    try:
        net = conn.networkLookupByName(name)
        if not net.isActive():
            call(f"start network {name}", net.create)
        return name
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise translate(exc, f"network {name}") from None
    bridge = bridge_name_for(name)
    if is_local(conn) and _is_bridge(bridge):
        return bridge  # made by an earlier fallback
    try:
        net = conn.networkDefineXML(isolated_network_xml(name, bridge))
        try:
            net.create()
        except libvirt.libvirtError:
            try:
                net.undefine()
            except libvirt.libvirtError:
                pass
            raise
        return name
    except libvirt.libvirtError as exc:
        if not is_local(conn):
            raise translate(exc, f"create network {name}") from None
        reason = exc.get_error_message() or str(exc)
    log.warning("libvirt could not start isolated network %s (%s); using a plain Linux bridge %s instead",
                name, reason, bridge)
    _ip("link", "add", bridge, "type", "bridge")
    _ip("link", "set", bridge, "up")
    return bridge


def isolated_attachment(conn: Any, name: str) -> str:
    """The attachment (a spec.networks entry) of a network made by create_isolated_network:
    `network:NAME`, or `bridge:B` when it fell back to a plain bridge. NotFound otherwise."""
    _check_network_name(name)
    if _network_exists(conn, name):
        return f"network:{name}"
    bridge = bridge_name_for(name)
    if is_local(conn) and _is_bridge(bridge):
        return f"bridge:{bridge}"
    raise NotFound(f"no isolated network {name!r} on this host (create it first)")


def remove_network(conn: Any, name: str) -> None:
    """Remove a network made by create_isolated_network: the libvirt network, or the
    fallback bridge (by either name). NotFound when there is neither."""
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise translate(exc, f"network {name}") from None
        net = None
    if net is not None:
        if net.isActive():
            call(f"stop network {name}", net.destroy)
        if net.isPersistent():
            try:
                net.undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise translate(exc, f"remove network {name}") from None
        return
    bridge = name if name.startswith(BRIDGE_PREFIX) and len(name) == 15 else bridge_name_for(name)
    if is_local(conn) and _is_bridge(bridge):
        _ip("link", "del", bridge)
        return
    raise NotFound(f"no network {name!r} (neither a libvirt network nor a bridge Standby made)")


def remove_isolated_network(conn: Any, name: str) -> bool:
    """Remove a network create_isolated_network made (its bridge is the one it names);
    an operator's network of that name is refused (Refused), never removed. False when
    there was none (idempotent)."""
    _check_network_name(name)
    bridge = bridge_name_for(name)
    if _network_exists(conn, name):
        net = call(f"network {name}", conn.networkLookupByName, name)
        try:
            ours = net.bridgeName() == bridge
        except libvirt.libvirtError:
            ours = f"name='{bridge}'" in call(f"network {name}: XML", net.XMLDesc, 0)
        if not ours:
            raise Refused(f"network {name} was not made by Standby (its bridge is not {bridge}); not removing it")
    elif not (is_local(conn) and _is_bridge(bridge)):
        return False
    remove_network(conn, name)
    return True
