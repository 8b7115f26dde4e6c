"""`standby discover` and `discover_fabric` against libvirt's test driver (no daemon):
a node file with real qcow2/raw images, a network with IPv4 and IPv6, a NIC on a bridge,
a CD-ROM and a VMDK disk. The file it writes must load and be checked without error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from standby.cli.main import run
from standby.fabric_file import load_fabric
from standby.readiness.engine import check

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
                                reason="qemu-img is not installed (scripts/bootstrap.sh)")


def _node(tmp: Path) -> str:
    """A test-driver URI for a node with two VMs on real image files."""
    for name, fmt, extra in (("web-os.qcow2", "qcow2", []), ("web-data.raw", "raw", []),
                             ("old.qcow2", "qcow2", ["-o", "compat=0.10"]), ("import.vmdk", "vmdk", [])):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *extra, str(tmp / name), "96M"], check=True)
    node = f"""<node>
  <network>
    <name>prod net</name>
    <bridge name='virbr9'/>
    <forward mode='nat'/>
    <ip address='192.168.9.1' netmask='255.255.255.0'/>
    <ip family='ipv6' address='fd00:9::1' prefix='64'/>
  </network>
  <domain type='test'>
    <name>web01</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='{tmp}/web-os.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='disk'>
        <driver name='qemu' type='raw'/>
        <source file='{tmp}/web-data.raw'/>
        <target dev='vdb' bus='virtio'/>
      </disk>
      <disk type='file' device='cdrom'>
        <target dev='sda' bus='sata'/>
      </disk>
      <interface type='network'>
        <mac address='52:54:00:00:09:01'/>
        <source network='prod net'/>
      </interface>
      <interface type='bridge'>
        <mac address='52:54:00:00:09:02'/>
        <source bridge='br0'/>
      </interface>
    </devices>
  </domain>
  <domain type='test'>
    <name>legacy app</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='{tmp}/old.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='disk'>
        <driver name='qemu' type='vmdk'/>
        <source file='{tmp}/import.vmdk'/>
        <target dev='vdb' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</node>
"""
    path = tmp / "node.xml"
    path.write_text(node)
    return f"test://{path}"


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_discover_fabric_facts(tmp_path: Path) -> None:
    from standby.drivers.libvirt.discovery import discover_fabric

    uri = _node(tmp_path)
    warnings: list[str] = []
    doc = discover_fabric([uri], warnings=warnings)
    host = doc["hosts"][next(iter(doc["hosts"]))]
    assert host["libvirt_version"].count(".") == 2 and "qemu_version" in host
    assert host["storage_free_gib"] > 0
    web = host["vms"]["web01"]
    assert web["disks"] == {"vda": {"format": "qcow2", "size_gib": 0.094, "qcow2_compat": "1.1"},
                            "vdb": {"format": "raw", "size_gib": 0.094}}  # the CD-ROM is not a disk
    assert web["nics"] == [{"network": "prod-net", "address_families": ["ipv4", "ipv6"]}, {"network": "br0"}]
    legacy = host["vms"]["legacy-app"]
    assert legacy["disks"] == {"vda": {"format": "qcow2", "size_gib": 0.094, "qcow2_compat": "0.10"}}
    assert any("legacy app" in w and "vmdk" in w for w in warnings)
    assert any("'legacy-app'" in w for w in warnings)
    assert set(doc["networks"]) == {"prod-net", "br0"}


def test_discover_writes_a_fabric_standby_check_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = _node(tmp_path)
    out = tmp_path / "fabric.yaml"
    rc, stdout, err = invoke(capsys, "discover", uri, "--out", str(out), "--site", "east", "--server", "mgr-east",
                             "--cloud", "gold", "--control-plane", "https://standby.example.net:8443")
    assert rc == 0, err
    assert stdout == ""
    assert "wrote" in err and "warning:" in err and "vmdk" in err
    text = out.read_text()
    assert text.startswith("# Fabric discovered by `standby discover`")
    assert "# - " in text  # the warnings, as comments
    fabric = load_fabric(out)
    assert list(fabric.sites) == ["east"] and list(fabric.clouds) == ["gold"]
    assert fabric.control_plane is not None
    report = check(fabric, ["kvm"])
    assert "kvm.single-server-two-clouds" in {f.rule for f in report.findings}  # one host, one cloud
    rc, _, _ = invoke(capsys, "check", str(out), "--profile", "kvm")
    assert rc == 1  # loads; not ready


def test_discover_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, err = invoke(capsys, "discover", "test:///default", "--json")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["servers"] and doc["hosts"]
    (tmp_path / "f.json").write_text(stdout)
    load_fabric(tmp_path / "f.json")  # JSON is YAML: a fabric file too


def test_discover_yaml_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = invoke(capsys, "discover", "test:///default")
    assert rc == 0
    assert yaml.safe_load(stdout)["clouds"]


@pytest.mark.parametrize(("args", "message"), [
    (["test:///default", "--site", "a", "--site", "b"], "--site: give it once"),
    (["test:///default", "--control-plane", "http://insecure:80"], "does not validate"),
    (["test:///default", "--cloud", "gold cloud"], "not a valid fabric name"),
    (["test:///default", "test:///default"], "given twice"),
    (["test:///default", "--out", "/nonexistent-dir/f.yaml"], "does not exist"),
])
def test_discover_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = invoke(capsys, "discover", *args)
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_discover_unreachable_uri(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = invoke(capsys, "discover", "qemu+tcp://127.0.0.1:1/system")
    assert rc == 5
    assert "cannot connect" in err and "Traceback" not in err
