"""The libvirt driver's VM lifecycle and discovery against a real libvirtd and the test
guest (slow): a VM defined from a recovery point's qcow2 overlay with the source domain as
template boots and appends records after the point's prefix; shutdown, destroy and
undefine (with checkpoint metadata present, so the name can be reused); NICs on an
isolated network and on none; the Linux-bridge fallback; errors as Standby errors; and
`standby discover` of this host loading as a fabric. About 40 s under emulation."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.cli.main import run
from standby.drivers.base import NicInfo, VmSpec, VmState
from standby.drivers.libvirt import domains
from standby.drivers.libvirt.domains import (
    console_log_path,
    create_isolated_network,
    define_vm,
    destroy_vm,
    list_vms,
    remove_network,
    shutdown_vm,
    start_vm,
    undefine_vm,
    vm_info,
)
from standby.errors import BadInput, Conflict, NotFound
from standby.fabric_file import load_fabric
from standby.readiness.engine import check
from standby.testing import guest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt")

BASE_RECORDS = 10  # records already on the "recovery point" before the failover VM boots
SRC_MAC = "52:54:00:5b:00:01"


def _uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def source(libvirt_conn: Any, guest_image: guest.GuestImage, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    """A protected VM as the primary would have it: a persistent domain (the test guest with
    a NIC on an isolated network and a guest agent channel) on a qcow2 disk holding
    BASE_RECORDS records. Yields its name, XML (the template), disk and network."""
    d = tmp_path_factory.mktemp("source")
    raw = d / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
        guest.write_records(f, 0, BASE_RECORDS)
    base = d / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", str(raw), str(base)],
                   check=True)
    raw.unlink()
    net = create_isolated_network(libvirt_conn, f"sbt-src-{_uid()}")
    name = f"sbt-src-{_uid()}"
    extra = f"""
    <interface type='network'><mac address='{SRC_MAC}'/><source network='{net}'/><model type='virtio'/></interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"""
    xml = guest.domain_xml(name, base, d / "source.log", guest_image, guest.cmdline("write", rate=20), extra_devices=extra)
    dom = libvirt_conn.defineXML(xml)
    try:
        yield {"name": name, "xml": dom.XMLDesc(0), "disk": base, "network": net, "dir": d}
    finally:
        _cleanup(libvirt_conn, name)
        remove_network(libvirt_conn, net)


def _cleanup(conn: Any, name: str) -> None:
    try:
        destroy_vm(conn, name)
        undefine_vm(conn, name)
    except NotFound:
        pass


@pytest.fixture
def cleanup(libvirt_conn: Any) -> Iterator[list[str]]:
    """Names of domains to destroy and undefine when the test ends."""
    names: list[str] = []
    yield names
    for n in names:
        _cleanup(libvirt_conn, n)


def _overlay(base: Path, path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)], check=True)
    return path


def _with_cmdline(xml: str, cmd: str) -> str:
    import re

    return re.sub(r"<cmdline>[^<]*</cmdline>", f"<cmdline>{cmd}</cmdline>", xml)


def _checkpoint(dom: Any, name: str) -> None:
    dom.checkpointCreateXML(f"<domaincheckpoint><name>{name}</name></domaincheckpoint>", 0)


def test_failover_vm_boots_from_overlay_and_is_removed_with_its_checkpoints(
        libvirt_conn: Any, source: dict[str, Any], vm_dir: Path, cleanup: list[str]) -> None:
    name = f"sbt-fo-{_uid()}"
    cleanup.append(name)
    overlay = _overlay(source["disk"], vm_dir / "vda.overlay.qcow2")
    spec = VmSpec(name=name, disks={"vda": overlay}, networks=[None], template_xml=source["xml"])
    info = define_vm(libvirt_conn, spec)
    assert info.name == name and info.uuid != libvirt_conn.lookupByName(source["name"]).UUIDString()
    assert info.state is VmState.SHUT_OFF
    assert [(d.target, d.path, d.format, d.size) for d in info.disks] == [("vda", str(overlay), "qcow2", 32 << 20)]
    assert info.nics == [NicInfo(SRC_MAC, None)]  # the same NIC, attached to nothing
    assert info.has_guest_agent
    assert vm_info(libvirt_conn, name) == info
    assert name in [v.name for v in list_vms(libvirt_conn)]

    start_vm(libvirt_conn, name)
    assert vm_info(libvirt_conn, name).state is VmState.RUNNING
    console = guest.Console(console_log_path(spec))
    acked = console.wait_for(lambda c: c.acked() >= BASE_RECORDS + 10 and c.acked(), 90)
    assert f"write start={BASE_RECORDS} " in console.text()  # it continued the point's chain
    _checkpoint(libvirt_conn.lookupByName(name), "cp1")
    _checkpoint(libvirt_conn.lookupByName(name), "cp2")

    t0 = time.monotonic()
    graceful = shutdown_vm(libvirt_conn, name, timeout=0)  # no time allowed: powered off
    assert graceful is False
    assert time.monotonic() - t0 < 30
    assert vm_info(libvirt_conn, name).state is VmState.SHUT_OFF
    verdict = guest.verify_image(overlay)
    assert verdict.ok and verdict.last >= acked
    assert guest.verify_image(source["disk"]).last == BASE_RECORDS - 1  # the point itself is untouched

    start_vm(libvirt_conn, name)
    console.wait_for(lambda c: "standby-guest: write start" in c.text().rsplit("reboot: Power down", 1)[-1], 90)
    # The test guest answers the ACPI power button: it stops after a whole record.
    assert shutdown_vm(libvirt_conn, name, timeout=60) is True
    assert "standby-guest: shutdown last=" in console.text()
    assert guest.verify_image(overlay).ok

    start_vm(libvirt_conn, name)
    try:
        with pytest.raises(Conflict):
            start_vm(libvirt_conn, name)  # already running
        with pytest.raises(Conflict, match="stop it"):
            undefine_vm(libvirt_conn, name)  # refused while running
    finally:
        destroy_vm(libvirt_conn, name)
    undefine_vm(libvirt_conn, name)
    with pytest.raises(NotFound):
        vm_info(libvirt_conn, name)
    assert name not in [v.name for v in list_vms(libvirt_conn)]

    # The name is free again, checkpoints included (no "domain moment ... already exists").
    again = _overlay(source["disk"], vm_dir / "vda.again.qcow2")
    define_vm(libvirt_conn, VmSpec(name=name, disks={"vda": again}, template_xml=source["xml"]))
    start_vm(libvirt_conn, name)
    _checkpoint(libvirt_conn.lookupByName(name), "cp1")
    destroy_vm(libvirt_conn, name)
    destroy_vm(libvirt_conn, name)  # already off: nothing to do
    assert shutdown_vm(libvirt_conn, name, timeout=1) is True
    undefine_vm(libvirt_conn, name)


def test_guest_that_powers_off_by_itself_is_a_graceful_shutdown(
        libvirt_conn: Any, source: dict[str, Any], vm_dir: Path, cleanup: list[str]) -> None:
    name = f"sbt-gs-{_uid()}"
    cleanup.append(name)
    overlay = _overlay(source["disk"], vm_dir / "vda.qcow2")
    template = _with_cmdline(source["xml"], guest.cmdline("write", rate=0, count=5))
    spec = VmSpec(name=name, disks={"vda": overlay}, template_xml=template)
    define_vm(libvirt_conn, spec)
    start_vm(libvirt_conn, name)
    assert shutdown_vm(libvirt_conn, name, timeout=90) is True  # it wrote 5 records and powered off
    assert "done last=" in guest.Console(console_log_path(spec)).text()
    assert vm_info(libvirt_conn, name).state is VmState.SHUT_OFF
    assert guest.verify_image(overlay).last == BASE_RECORDS + 4


def _tap_of(conn: Any, name: str) -> list[tuple[str, str | None]]:
    """(tap device, state of its link) per NIC of a running domain."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    out = []
    for iface in root.findall("devices/interface"):
        target = iface.find("target")
        link = iface.find("link")
        out.append((target.get("dev") if target is not None else "", link.get("state") if link is not None else None))
    return out


def test_nics_on_an_isolated_network_and_on_none(libvirt_conn: Any, source: dict[str, Any], vm_dir: Path,
                                                 cleanup: list[str]) -> None:
    net = f"sbt-iso-{_uid()}"
    assert create_isolated_network(libvirt_conn, net) == net
    assert create_isolated_network(libvirt_conn, net) == net  # idempotent
    try:
        bridge = domains.bridge_name_for(net)
        assert Path("/sys/class/net", bridge, "bridge").is_dir()
        name = f"sbt-nic-{_uid()}"
        cleanup.append(name)
        overlay = _overlay(source["disk"], vm_dir / "vda.qcow2")
        info = define_vm(libvirt_conn, VmSpec(name=name, disks={"vda": overlay}, networks=[net, None],
                                              template_xml=source["xml"]))
        assert info.nics[0] == NicInfo(SRC_MAC, net)  # the source NIC, moved to the test network
        assert info.nics[1].network is None and info.nics[1].mac  # a NIC added, attached to nothing
        start_vm(libvirt_conn, name)
        (tap0, link0), (tap1, link1) = _tap_of(libvirt_conn, name)
        assert link0 == "up" and Path("/sys/class/net", bridge, "brif", tap0).exists()
        assert link1 == "down" and not Path("/sys/class/net", tap1, "master").exists()
        destroy_vm(libvirt_conn, name)
        undefine_vm(libvirt_conn, name)
    finally:
        remove_network(libvirt_conn, net)
    assert net not in [n.name() for n in libvirt_conn.listAllNetworks()]
    assert not Path("/sys/class/net", domains.bridge_name_for(net)).exists()
    with pytest.raises(NotFound):
        remove_network(libvirt_conn, net)


class _NoLibvirtNetworks:
    """A connection whose libvirt networks cannot be defined (as without iptables)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def networkDefineXML(self, xml: str) -> Any:  # noqa: N802 - libvirt's name
        raise libvirt.libvirtError("cannot execute binary /usr/sbin/iptables: No such file or directory")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_isolated_network_falls_back_to_a_plain_bridge(libvirt_conn: Any, source: dict[str, Any], vm_dir: Path,
                                                       cleanup: list[str], caplog: pytest.LogCaptureFixture) -> None:
    conn = _NoLibvirtNetworks(libvirt_conn)
    net = f"sbt-fb-{_uid()}"
    with caplog.at_level(logging.WARNING):
        got = create_isolated_network(conn, net)
    bridge = domains.bridge_name_for(net)
    try:
        assert got == bridge and Path("/sys/class/net", bridge, "bridge").is_dir()
        assert "plain Linux bridge" in caplog.text and "iptables" in caplog.text
        assert create_isolated_network(conn, net) == bridge  # idempotent
        name = f"sbt-fb-{_uid()}"
        cleanup.append(name)
        info = define_vm(libvirt_conn, VmSpec(name=name, disks={"vda": _overlay(source["disk"], vm_dir / "v.qcow2")},
                                              networks=[got], template_xml=source["xml"]))
        assert info.nics == [NicInfo(SRC_MAC, bridge)]
        start_vm(libvirt_conn, name)
        ((tap, link),) = _tap_of(libvirt_conn, name)
        assert link == "up" and Path("/sys/class/net", bridge, "brif", tap).exists()
        destroy_vm(libvirt_conn, name)
    finally:
        remove_network(conn, net)
    assert not Path("/sys/class/net", bridge).exists()
    with pytest.raises(NotFound):
        remove_network(conn, got)


def test_errors_are_standby_errors(libvirt_conn: Any, source: dict[str, Any], vm_dir: Path,
                                   cleanup: list[str]) -> None:
    missing = f"sbt-missing-{_uid()}"
    for op in (vm_info, start_vm, destroy_vm, undefine_vm):
        with pytest.raises(NotFound, match=missing):
            op(libvirt_conn, missing)
    with pytest.raises(NotFound):
        shutdown_vm(libvirt_conn, missing, 1)
    overlay = _overlay(source["disk"], vm_dir / "vda.qcow2")
    with pytest.raises(Conflict, match="already exists"):
        define_vm(libvirt_conn, VmSpec(name=source["name"], disks={"vda": overlay}))
    with pytest.raises(NotFound, match="does not exist"):
        define_vm(libvirt_conn, VmSpec(name=missing, disks={"vda": vm_dir / "nope.qcow2"}))
    with pytest.raises(NotFound, match="no libvirt network or bridge"):
        define_vm(libvirt_conn, VmSpec(name=missing, disks={"vda": overlay}, networks=["sbt-no-such-net"]))
    with pytest.raises(NotFound, match="no libvirt network"):
        define_vm(libvirt_conn, VmSpec(name=missing, disks={"vda": overlay}, networks=["network:sbt-no-such-net"]))
    with pytest.raises(BadInput):
        define_vm(libvirt_conn, VmSpec(name=missing, disks={"vda": overlay}, template_xml="<domain><name>x"))
    with pytest.raises(BadInput):
        create_isolated_network(libvirt_conn, "bad/name")
    with pytest.raises(NotFound):
        remove_network(libvirt_conn, f"sbt-none-{_uid()}")
    assert missing not in [v.name for v in list_vms(libvirt_conn)]


def test_discover_this_host_writes_a_loadable_fabric(libvirtd: str, source: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fabric.yaml"
    rc = run(["discover", libvirtd, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    fabric = load_fabric(out)
    ((host_name, host),) = fabric.hosts.items()
    assert host.libvirt_version and host.qemu_version and host.cpu is not None and host.cpu.features
    assert host.storage_free_gib is not None and host.storage_free_gib > 0
    vm = host.vms[source["name"]]
    assert vm.disks["vda"].format == "qcow2" and vm.disks["vda"].qcow2_compat == "1.1"
    assert vm.disks["vda"].size_gib == pytest.approx(32 / 1024, abs=0.001)
    assert [n.network for n in vm.nics] == [source["network"]]
    assert fabric.networks[source["network"]].site in fabric.sites
    report = check(fabric, ["kvm"])
    rules = {f.rule for f in report.findings}
    assert "kvm.single-server-two-clouds" in rules and not report.ready  # one host: expected, but it loads
    assert run(["check", str(out), "--profile", "kvm"]) == 1


def test_only_the_domains_asked_for_are_inspected(libvirt_conn: Any, source: dict[str, Any]) -> None:
    """An agent sharing a libvirtd with others (its --domains filter) reads and warns about
    its own VMs only: the others are skipped by name, before their XML is read."""
    from standby.drivers.libvirt.discovery import host_facts

    mine = source["name"]
    asked: list[str] = []

    def only(name: str) -> bool:
        asked.append(name)
        return name == mine

    assert set(host_facts(libvirt_conn, only=only).vms) == {mine}
    assert mine in asked
    assert [v.name for v in list_vms(libvirt_conn, only=only)] == [mine]
    assert host_facts(libvirt_conn, only=lambda _n: False).vms == {}
    assert list_vms(libvirt_conn, only=lambda _n: False) == []
    assert mine in host_facts(libvirt_conn).vms  # no filter: every domain, as `standby discover` wants
