"""Pure parsing and building for the libvirt driver, on XML and JSON captured from
libvirt 9.0 / QEMU 7.2 (tests/golden/libvirt/; domain-edge.xml is hand-written for the
shapes a lab host does not have: LUNs, Ceph, LUKS, VMDK, OVS, SR-IOV, UEFI).

Golden outputs (*.facts.json, define-*.xml, network-*.out.xml) are compared byte for
byte; regenerate them with STANDBY_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from standby.domain.fabric import CpuInfo, Disk, DiskKind, Fabric, Host, Nic, Vm
from standby.drivers.base import VmSpec, VmState
from standby.drivers.libvirt.discovery import (
    DiscoveredHost,
    DomainDisk,
    DomainNic,
    ImageFacts,
    assign_names,
    disk_to_fabric,
    fabric_document,
    fabric_name,
    families_of_addresses,
    nic_to_fabric,
    parse_capabilities,
    parse_domain_xml,
    parse_network_xml,
    parse_qemu_img_info,
    parse_volume_xml,
    size_gib,
    version_string,
)
from standby.errors import BadInput
from standby.fabric_file import parse_fabric

GOLDEN = Path(__file__).parent.parent / "golden" / "libvirt"
UPDATE = os.environ.get("STANDBY_UPDATE_GOLDEN") == "1"


def read(name: str) -> str:
    return (GOLDEN / name).read_text()


def golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"{path} is missing; run with STANDBY_UPDATE_GOLDEN=1 to create it"
    assert actual == path.read_text(), f"{name} differs from the golden file (STANDBY_UPDATE_GOLDEN=1 to accept)"


# ---------------------------------------------------------------------------------------
# Versions, capabilities


@pytest.mark.parametrize(("number", "text"), [(9000000, "9.0.0"), (7002022, "7.2.22"), (7006000, "7.6.0"),
                                              (10010001, "10.10.1"), (2, "0.0.2"), (0, "0.0.0")])
def test_version_string(number: int, text: str) -> None:
    assert version_string(number) == text


def test_version_string_refuses_negative() -> None:
    with pytest.raises(ValueError):
        version_string(-1)


def test_capabilities() -> None:
    caps = parse_capabilities(read("capabilities.xml"))
    assert caps.arch == "x86_64"
    assert caps.cpu is not None
    assert (caps.cpu.vendor, caps.cpu.model) == ("AMD", "kvm64")
    assert {"avx2", "aes", "sse4.2", "x2apic"} <= set(caps.cpu.features)
    assert caps.cpu.features == sorted(set(caps.cpu.features))
    assert caps.domain_types == {"i686": ["qemu", "kvm"], "x86_64": ["qemu", "kvm"]}


def test_capabilities_without_cpu_model() -> None:
    caps = parse_capabilities("<capabilities><host><cpu><arch>x86_64</arch></cpu></host></capabilities>")
    assert caps.cpu is None and caps.arch == "x86_64" and caps.domain_types == {}


def test_not_xml_is_bad_input() -> None:
    with pytest.raises(BadInput, match="not well-formed"):
        parse_capabilities("<capabilities>")
    with pytest.raises(BadInput, match="not <domain>"):
        parse_domain_xml("<network/>")


# ---------------------------------------------------------------------------------------
# Domain XML


@pytest.mark.parametrize("sample", ["domain-live", "domain-inactive", "domain-edge"])
def test_domain_facts_golden(sample: str) -> None:
    facts = parse_domain_xml(read(f"{sample}.xml"))
    golden(f"{sample}.facts.json", json.dumps(dataclasses.asdict(facts), indent=1) + "\n")


def test_domain_facts_live() -> None:
    facts = parse_domain_xml(read("domain-live.xml"))
    assert facts.running and facts.type == "qemu" and facts.has_guest_agent
    assert [(d.target, d.device, d.format) for d in facts.disks] == [
        ("vda", "disk", "qcow2"), ("vdb", "disk", "raw"), ("sda", "cdrom", None), ("sdb", "disk", "qcow2")]
    assert facts.disks[1].shareable and facts.disks[2].path is None
    assert [(n.type, n.attachment, n.link_up) for n in facts.nics] == [
        ("network", "sbt-capnet", True), ("bridge", "sbtcapbr", True), ("ethernet", None, False)]
    inactive = parse_domain_xml(read("domain-inactive.xml"))
    assert not inactive.running and inactive.uuid == facts.uuid


def test_domain_facts_edge() -> None:
    facts = parse_domain_xml(read("domain-edge.xml"))
    by_target = {d.target: d for d in facts.disks}
    assert by_target["vdb"].source_type == "block" and by_target["vdb"].path == "/dev/vg0/db01-data"
    assert by_target["sda"].device == "lun"
    assert by_target["vdc"].path == "rbd:pool/db01-logs"
    assert by_target["vdd"].encrypted
    assert [(n.type, n.source, n.attachment) for n in facts.nics] == [
        ("network", "prod net", "prod net"), ("bridge", "br-backup", "br-backup"), ("direct", "eno2", None),
        ("user", None, None)]


# ---------------------------------------------------------------------------------------
# qemu-img info, volumes, networks


@pytest.mark.parametrize(("sample", "expected"), [
    ("qcow2-v3", ImageFacts("qcow2", 64 << 20, "1.1")),
    ("qcow2-v2", ImageFacts("qcow2", 32 << 20, "0.10")),
    ("raw", ImageFacts("raw", 16 << 20)),
    ("qcow2-luks", ImageFacts("qcow2", 8 << 20, "1.1", encrypted=True)),
    ("qcow2-overlay", ImageFacts("qcow2", 64 << 20, "1.1", backing="a.qcow2")),
    ("vpc", ImageFacts("vpc", 10514432)),
])
def test_qemu_img_info(sample: str, expected: ImageFacts) -> None:
    assert parse_qemu_img_info(read(f"qemu-img-{sample}.json")) == expected


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"format": "raw"}', '{"format": "raw", "virtual-size": "x"}'])
def test_qemu_img_info_garbage(text: str) -> None:
    with pytest.raises(BadInput):
        parse_qemu_img_info(text)


def test_volume_xml() -> None:
    assert parse_volume_xml(read("volume-qcow2.xml")) == ImageFacts("qcow2", 64 << 20, "1.1")
    # libvirt writes <compat> for qcow2 v3 only
    assert parse_volume_xml(read("volume-qcow2-v2.xml")) == ImageFacts("qcow2", 32 << 20, "0.10")
    raw = "<volume><capacity unit='GiB'>2</capacity><target><format type='raw'/></target></volume>"
    assert parse_volume_xml(raw) == ImageFacts("raw", 2 << 30)


def test_network_xml() -> None:
    iso = parse_network_xml(read("network-isolated.xml"))
    assert (iso.name, iso.bridge, iso.forward, iso.families) == ("sbt-capnet", "sbtcap0", None, [])
    nat = parse_network_xml(read("network-nat-dual.xml"))
    assert (nat.name, nat.bridge, nat.forward, nat.families) == ("prod net", "virbr1", "nat", ["ipv4", "ipv6"])


def test_families_of_addresses() -> None:
    assert families_of_addresses(["10.0.0.5", "fe80::1"]) == ["ipv4"]
    assert families_of_addresses(["fd00::5", "10.0.0.5"]) == ["ipv4", "ipv6"]
    assert families_of_addresses([]) == []


# ---------------------------------------------------------------------------------------
# Mapping to the fabric model


@pytest.mark.parametrize(("raw", "name"), [("web01", "web01"), ("db 01/prod", "db-01-prod"), ("_x", "x_x"),
                                           ("", "unnamed"), ("a" * 200, "a" * 128), ("ünï", "x-n-")])
def test_fabric_name(raw: str, name: str) -> None:
    assert fabric_name(raw) == name


def test_size_gib_rounds_up() -> None:
    assert size_gib(1 << 30) == 1.0
    assert size_gib(64 << 20) == 0.063
    assert size_gib(1) == 0.001
    assert size_gib(0) == 0.001


def _disk(**kw: Any) -> DomainDisk:
    args: dict[str, Any] = dict(target="vda", device="disk", source_type="file", path="/i/vda.qcow2", format="qcow2")
    args.update(kw)
    return DomainDisk(**args)


@pytest.mark.parametrize(("disk", "image", "expected"), [
    (_disk(), ImageFacts("qcow2", 20 << 30, "1.1"), Disk(format="qcow2", size_gib=20, qcow2_compat="1.1")),
    (_disk(), ImageFacts("qcow2", 1 << 30, "0.10"), Disk(format="qcow2", size_gib=1, qcow2_compat="0.10")),
    (_disk(format="raw"), ImageFacts("raw", 1 << 30), Disk(format="raw", size_gib=1)),
    (_disk(format="vpc"), ImageFacts("vpc", 1 << 30), Disk(format="vhd", size_gib=1)),
    (_disk(shareable=True, format="raw"), ImageFacts("raw", 1 << 30), Disk(format="raw", size_gib=1, kind=DiskKind.SHARED)),
    (_disk(device="lun", source_type="block", format="raw"), ImageFacts("raw", 1 << 30),
     Disk(format="raw", size_gib=1, kind=DiskKind.PASSTHROUGH)),
    (_disk(encrypted=True), ImageFacts("qcow2", 1 << 30, "1.1"), Disk(format="qcow2", size_gib=1, encrypted=True,
                                                                     qcow2_compat="1.1")),
    (_disk(format="luks"), ImageFacts("luks", 1 << 30), Disk(format="raw", size_gib=1, encrypted=True)),
])
def test_disk_to_fabric(disk: DomainDisk, image: ImageFacts, expected: Disk) -> None:
    warnings: list[str] = []
    assert disk_to_fabric(disk, image, warnings) == expected
    assert warnings == []


def test_disk_to_fabric_skips_with_a_reason() -> None:
    warnings: list[str] = []
    assert disk_to_fabric(_disk(device="cdrom"), None, warnings) is None
    assert warnings == []  # not a VM disk: no warning
    assert disk_to_fabric(_disk(format="vmdk"), ImageFacts("vmdk", 1 << 30), warnings, "db01") is None
    assert disk_to_fabric(_disk(), None, warnings, "db01") is None
    assert disk_to_fabric(_disk(path=None), None, warnings, "db01") is None
    assert warnings == ["db01: disk vda: format 'vmdk' cannot be protected (convert it to qcow2); skipped",
                        "db01: disk vda: its size cannot be read here; skipped",
                        "db01: disk vda: no source, skipped"]


def test_nic_to_fabric() -> None:
    nic = DomainNic(mac="52:54:00:00:00:01", type="network", source="prod")
    assert nic_to_fabric(nic, "prod", []) == Nic(network="prod", address_families=["ipv4"])
    assert nic_to_fabric(nic, "prod", ["ipv6", "ipv4"]) == Nic(network="prod", address_families=["ipv4", "ipv6"])
    assert nic_to_fabric(nic, None, ["ipv6"]) == Nic(network=None, address_families=["ipv6"])


def _host(vms: dict[str, Vm]) -> Host:
    return Host(libvirt_version="9.0.0", qemu_version="7.2.0", cpu=CpuInfo(vendor="AMD", model="EPYC", features=["avx2"]),
                storage_free_gib=100.0, vms=vms)


def test_fabric_document_two_sites() -> None:
    web = Vm(disks={"vda": Disk(format="qcow2", size_gib=10, qcow2_compat="1.1")},
             nics=[Nic(network="default"), Nic(network="prod"), Nic()])
    hosts = [DiscoveredHost("qemu+ssh://e1/system", "e1", _host({"web01": web}), "east", "mgr-east", "gold-east"),
             DiscoveredHost("qemu+ssh://e2/system", "e2", _host({}), "east", "mgr-east", "gold-east"),
             DiscoveredHost("qemu+ssh://w1/system", "w1", _host({"web01": web}), "west", "mgr-west", "gold-west")]
    doc = fabric_document(hosts, "https://standby.example.net:8443")
    assert doc["sites"]["east"] == {"description": "discovered from qemu+ssh://e1/system, qemu+ssh://e2/system"}
    assert doc["clouds"]["gold-east"] == {"server": "mgr-east", "capabilities": ["kvm"], "host_groups": ["gold-east-hosts"]}
    assert doc["host_groups"]["gold-east-hosts"] == {"hosts": ["e1", "e2"]}
    # "default" and "prod" exist at both sites: qualified by site; the unattached NIC stays so
    assert doc["networks"] == {"default@east": {"site": "east"}, "default@west": {"site": "west"},
                               "prod@east": {"site": "east"}, "prod@west": {"site": "west"}}
    assert doc["hosts"]["w1"]["vms"]["web01"]["nics"] == [{"network": "default@west"}, {"network": "prod@west"}, {}]
    fabric = parse_fabric(yaml.safe_dump(doc), "doc")
    assert isinstance(fabric, Fabric) and fabric.hosts["e1"].vms["web01"].disks["vda"].size_gib == 10


def test_fabric_document_single_site_keeps_plain_network_names() -> None:
    web = Vm(nics=[Nic(network="prod")])
    doc = fabric_document([DiscoveredHost("qemu:///system", "h", _host({"web": web}), "s", "m", "c")])
    assert doc["networks"] == {"prod": {"site": "s"}}
    assert "control_plane" not in doc
    parse_fabric(yaml.safe_dump(doc), "doc")


def test_assign_names() -> None:
    uris = ["qemu+ssh://a/system", "qemu+ssh://b/system"]
    assert assign_names(uris, ["kvm", "kvm"]) == [("kvm", "site-kvm", "mgr-kvm", "cloud-kvm"),
                                                  ("kvm-2", "site-kvm-2", "mgr-kvm-2", "cloud-kvm-2")]
    assert assign_names(uris, ["a", "b"], sites=["dc1"], servers=["mgr"], clouds=["gold"]) == [
        ("a", "dc1", "mgr", "gold"), ("b", "dc1", "mgr", "gold")]
    assert assign_names(uris, ["a", "b"], sites=["east", "west"], servers=["me", "mw"]) == [
        ("a", "east", "me", "cloud-a"), ("b", "west", "mw", "cloud-b")]


@pytest.mark.parametrize(("kw", "message"), [
    ({"sites": ["a", "b", "c"]}, "--site: give it once"),
    ({"sites": ["east", "west"], "servers": ["mgr"]}, "two sites"),
    ({"servers": ["m1", "m2"], "clouds": ["gold"]}, "two servers"),
    ({"clouds": ["bad name"]}, "not a valid fabric name"),
])
def test_assign_names_refuses(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        assign_names(["u1", "u2"], ["a", "b"], **kw)


# ---------------------------------------------------------------------------------------
# Building domain XML (pure): golden outputs

from standby.drivers.libvirt.domains import (  # noqa: E402
    Attachment,
    bridge_name_for,
    build_domain_xml,
    bus_for_target,
    isolated_network_xml,
    vm_state,
)

UUID = "00000000-0000-4000-8000-000000000001"


def test_define_from_live_template() -> None:
    spec = VmSpec(name="web01-test", disks={"vda": Path("/srv/standby/points/web01/vda.overlay.qcow2"),
                                            "sdb": Path("/srv/standby/points/web01/sdb.overlay.qcow2")},
                  networks=["sbt-iso-1", None], template_xml=read("domain-live.xml"))
    xml = build_domain_xml(spec, domain_type="qemu", uuid=UUID,
                           attachments=[Attachment("network", "sbt-iso-1"), None],
                           console_log="/srv/standby/points/web01/web01-test.console.log")
    golden("define-from-live.xml", xml)
    facts = parse_domain_xml(xml)
    assert facts.name == "web01-test" and facts.uuid == UUID and not facts.running
    assert [(d.target, d.path, d.format) for d in facts.disks if d.device == "disk"] == [
        ("vda", "/srv/standby/points/web01/vda.overlay.qcow2", "qcow2"),
        ("sdb", "/srv/standby/points/web01/sdb.overlay.qcow2", "qcow2")]  # vdb (not in the spec) is gone
    assert [(n.mac, n.type, n.attachment, n.link_up, n.model) for n in facts.nics] == [
        ("52:54:00:aa:00:01", "network", "sbt-iso-1", True, "virtio"),
        ("52:54:00:aa:00:02", "ethernet", None, False, "e1000"),
        ("52:54:00:aa:00:03", "ethernet", None, False, "virtio")]
    assert xml.startswith('<domain type="qemu">\n')  # no id
    for runtime in ("<alias", "vnet", "portid", "seclabel", "backingStore", "/tmp/cap/", "<emulator", "state=\"disc"):
        assert runtime not in xml
    assert '<source file="/srv/standby/points/web01/vda.overlay.qcow2" />' in xml  # no index
    # the shape is kept
    for kept in ("<kernel>", "<initrd>", "<cmdline>console=ttyS0 panic=-1 quiet mode=verify</cmdline>",
                 '<memory unit="KiB">262144</memory>', '<vcpu placement="static">2</vcpu>', 'machine="pc-i440fx-7.2"'):
        assert kept in xml


def test_define_from_edge_template() -> None:
    spec = VmSpec(name="db01-failover", disks={"vda": Path("/var/lib/standby/db01/vda.qcow2"),
                                               "vdb": Path("/var/lib/standby/db01/vdb.qcow2"),
                                               "vdf": Path("/var/lib/standby/db01/vdf.qcow2")},
                  networks=["prod-dr", "br-dr", None, "prod-dr", "isolated"], template_xml=read("domain-edge.xml"))
    atts = [Attachment("network", "prod-dr"), Attachment("bridge", "br-dr"), None, Attachment("network", "prod-dr"),
            Attachment("network", "isolated")]
    xml = build_domain_xml(spec, domain_type="qemu", uuid=UUID, attachments=atts,
                           console_log="/var/lib/standby/db01/db01-failover.console.log")
    golden("define-from-edge.xml", xml)
    facts = parse_domain_xml(xml)
    assert [(d.target, d.device, d.source_type) for d in facts.disks] == [
        ("vda", "disk", "file"), ("vdb", "disk", "file"), ("sdb", "cdrom", "file"), ("vdf", "disk", "file")]
    assert facts.disks[2].path is None  # the ISO is the source host's: the drive stays, empty
    assert [(n.type, n.attachment) for n in facts.nics] == [
        ("network", "prod-dr"), ("bridge", "br-dr"), ("ethernet", None), ("network", "prod-dr"), ("network", "isolated")]
    assert facts.has_guest_agent
    for gone in ("<hostdev", "<nvram", "db01_VARS", "openvswitch", "<vlan", "filterref", "port=\"5907\"", "/dev/pts",
                 "tracking", "apparmor", "<resource", "ceph1", "vmdk", "/var/log/libvirt"):
        assert gone not in xml
    assert '<cpu mode="maximum"' in xml  # no host CPU to pass through under emulation
    assert "qemu:commandline" in xml and "dba-team" in xml
    kvm = build_domain_xml(spec, domain_type="kvm", uuid=UUID, attachments=atts, console_log="/l.log")
    assert '<cpu mode="host-passthrough"' in kvm and '<domain xmlns:ns0="https://example.net/app/1" ' in kvm


def test_define_without_template() -> None:
    spec = VmSpec(name="plain", disks={"vdb": Path("/p/vdb.qcow2"), "vda": Path("/p/vda.qcow2")}, memory_mib=1024,
                  vcpus=2, networks=["net1", None])
    xml = build_domain_xml(spec, domain_type="kvm", uuid=UUID, attachments=[Attachment("network", "net1"), None],
                           disk_formats={"vdb": "raw"}, console_log="/p/plain.console.log")
    golden("define-fresh.xml", xml)
    facts = parse_domain_xml(xml)
    assert [(d.target, d.format) for d in facts.disks] == [("vda", "qcow2"), ("vdb", "raw")]
    assert [(n.type, n.attachment, n.link_up) for n in facts.nics] == [("network", "net1", True), ("ethernet", None, False)]


@pytest.mark.parametrize(("spec", "message"), [
    (VmSpec(name="x", disks={}), "no disks"),
    (VmSpec(name="", disks={"vda": Path("/a")}), "not valid"),
    (VmSpec(name="a/b", disks={"vda": Path("/a")}), "not valid"),
    (VmSpec(name="x", disks={"disk0": Path("/a")}), "not a device name"),
    (VmSpec(name="x", disks={"vda": Path("/a")}, memory_mib=0), "memory_mib"),
    (VmSpec(name="x", disks={"vda": Path("/a")}, template_xml="<domain"), "not well-formed"),
    (VmSpec(name="x", disks={"vda": Path("/a")}, template_xml="<network/>"), "not <domain>"),
])
def test_build_refuses(spec: VmSpec, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        build_domain_xml(spec, domain_type="qemu", uuid=UUID, attachments=[None] * len(spec.networks), console_log="/l")


def test_build_refuses_mismatch() -> None:
    spec = VmSpec(name="x", disks={"vda": Path("/a")}, networks=["n"])
    with pytest.raises(BadInput, match="one attachment"):
        build_domain_xml(spec, domain_type="qemu", uuid=UUID, attachments=[], console_log="/l")
    with pytest.raises(BadInput, match="kvm or qemu"):
        build_domain_xml(spec, domain_type="xen", uuid=UUID, attachments=[None], console_log="/l")


def test_two_file_consoles_get_two_logs() -> None:
    template = """<domain type='qemu'><name>t</name><memory>65536</memory><os><type>hvm</type></os><devices>
      <serial type='file'><source path='/src/a.log'/><target port='0'/></serial>
      <serial type='file'><source path='/src/b.log'/><target port='1'/></serial>
      <console type='file'><source path='/src/a.log'/><target type='serial' port='0'/></console>
    </devices></domain>"""
    xml = build_domain_xml(VmSpec(name="t2", disks={"vda": Path("/a")}, template_xml=template), domain_type="qemu",
                           uuid=UUID, attachments=[], console_log="/d/t2.console.log")
    assert xml.count('path="/d/t2.console.log"') == 2 and xml.count('path="/d/t2.console.1.log"') == 1


def test_bus_for_target() -> None:
    assert [bus_for_target(t) for t in ("vda", "sdb", "hdc", "xvda")] == ["virtio", "scsi", "ide", "xen"]


def test_isolated_network_xml() -> None:
    bridge = bridge_name_for("sbt-test-failover-web01")
    assert len(bridge) <= 15 and bridge.startswith("sby")
    assert bridge == bridge_name_for("sbt-test-failover-web01") != bridge_name_for("other")
    xml = isolated_network_xml("sbt-test-failover-web01", bridge)
    golden("network-isolated.out.xml", xml)
    facts = parse_network_xml(xml)
    assert facts.forward is None and facts.families == [] and facts.bridge == bridge  # no <ip>: no dnsmasq


def test_vm_state() -> None:
    import libvirt

    assert vm_state(libvirt.VIR_DOMAIN_RUNNING, 1) is VmState.RUNNING
    assert vm_state(libvirt.VIR_DOMAIN_BLOCKED, 0) is VmState.RUNNING
    assert vm_state(libvirt.VIR_DOMAIN_PAUSED, 1) is VmState.PAUSED
    assert vm_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN) is VmState.SHUT_OFF
    assert vm_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED) is VmState.CRASHED
    assert vm_state(libvirt.VIR_DOMAIN_CRASHED, 0) is VmState.CRASHED
    assert vm_state(libvirt.VIR_DOMAIN_NOSTATE, 0) is VmState.OTHER
