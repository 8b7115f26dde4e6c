"""Change tracking without a hypervisor: block-status runs to extents, bitmap facts from
qemu-img and QMP, when a disk's changes can be trusted, checkpoint XML, and the guest
agent's freeze/thaw decisions (with a scripted stand-in for the agent interface)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from standby.drivers.libvirt.backup import DiskPlan, backup_xml
from standby.drivers.libvirt.nbd import flagged, hole_spans, merge_runs, plan_extents
from standby.drivers.libvirt.tracking import (
    BitmapInfo,
    CheckpointRecord,
    DiskRecord,
    DomainDisk,
    ImageBitmaps,
    agent_channel_state,
    assess_disk,
    broken_disk_in_error,
    checkpoint_seq,
    checkpoint_xml,
    domain_disks,
    parse_image_info,
    parse_query_block,
    quiesced,
    redefinable,
)
from standby.errors import BadInput, RemoteError
from standby.replication.changes import Extent

B = 65536


# ---------------------------------------------------------------------------- extents


def test_merge_and_flagged_runs() -> None:
    assert merge_runs([(5, 10), (0, 3), (3, 4), (20, 20), (8, 12), (4, 5)]) == [(0, 12)]
    assert merge_runs([(5, 10), (0, 3), (3, 4)]) == [(0, 4), (5, 10)]
    runs = [(0, B, 0), (B, 2 * B, 1), (3 * B, B, 3), (4 * B, B, 1)]
    assert flagged(runs, 1) == [(B, 5 * B)]
    assert flagged(runs, 2) == [(3 * B, 4 * B)]


def test_hole_spans_keep_whole_blocks_only() -> None:
    size = 10 * B + 100
    assert hole_spans([(100, 3 * B + 5)], size) == [(B, 3 * B)]
    assert hole_spans([(100, B + 5)], size) == []
    assert hole_spans([(9 * B, size)], size) == [(9 * B, size)]  # the short last block too
    assert hole_spans([(9 * B + 1, size)], size) == [(10 * B, size)]


def test_plan_whole_disk_with_holes() -> None:
    size = 8 * B
    zero = [(2 * B, 5 * B), (7 * B + 10, 8 * B)]
    assert plan_extents(size, None, zero, False) == [
        Extent(0, 2 * B, False, False), Extent(2 * B, 3 * B, False, True), Extent(5 * B, 3 * B, False, False)]
    assert plan_extents(size, None, [], True) == [Extent(0, size, True, False)]
    assert plan_extents(size, None, [(0, size)], True) == [Extent(0, size, True, True)]


def test_plan_dirty_extents_cut_at_zero_blocks() -> None:
    size = 16 * B
    dirty = [(B + 10, 10), (3 * B, 4 * B), (12 * B, B)]
    zero = [(4 * B, 6 * B), (12 * B, 16 * B)]
    assert plan_extents(size, dirty, zero, True) == [
        Extent(B, B, True, False),
        Extent(3 * B, B, True, False), Extent(4 * B, 2 * B, True, True), Extent(6 * B, B, True, False),
        Extent(12 * B, B, True, True)]


def test_plan_extents_covers_exactly_the_aligned_changes() -> None:
    import random

    rnd = random.Random(3)
    size = 300 * B + 4096
    for _ in range(200):
        dirty = [(rnd.randrange(size - 1), rnd.randrange(1, 5 * B)) for _ in range(rnd.randrange(0, 12))]
        dirty = [(o, min(n, size - o)) for o, n in dirty]
        zero = merge_runs((s, min(size, s + rnd.randrange(1, 8 * B))) for s in
                          (rnd.randrange(size) for _ in range(rnd.randrange(0, 8))))
        ext = plan_extents(size, dirty, zero, True)
        want = set()
        for o, n in dirty:
            want.update(range(o // B, (o + n - 1) // B + 1))
        got = set()
        for e in ext:
            assert e.offset % B == 0 and (e.end % B == 0 or e.end == size)
            blocks = range(e.offset // B, (e.end - 1) // B + 1)
            assert not got.intersection(blocks)
            got.update(blocks)
            for b in blocks:  # a hole block lies entirely inside a zero run, a data block does not
                end = min((b + 1) * B, size)
                inside = any(s <= b * B and end <= z for s, z in zero)
                assert e.hole == inside
        assert got == want
        assert [e.offset for e in ext] == sorted(e.offset for e in ext)


# ---------------------------------------------------------------------------- facts


def test_image_info_bitmaps() -> None:
    info = {"virtual-size": 67108864, "format-specific": {"type": "qcow2", "data": {"bitmaps": [
        {"flags": ["in-use", "auto"], "name": "standby-11", "granularity": 65536},
        {"flags": [], "name": "standby-3", "granularity": 65536},
        {"flags": ["auto"], "name": "other", "granularity": 131072}]}}}
    im = parse_image_info(info)
    assert im.size == 67108864
    assert im.bitmaps["standby-11"] == BitmapInfo("standby-11", False, True, 65536)
    assert im.bitmaps["standby-3"] == BitmapInfo("standby-3", True, False, 65536)
    assert parse_image_info({"virtual-size": 5, "format-specific": {"type": "raw"}}).bitmaps == {}


DISKS = [DomainDisk("vda", "/v/a.qcow2", "qcow2", "file", "disk", False, "virtio-disk0"),
         DomainDisk("vdb", "/v/b.qcow2", "qcow2", "file", "disk", False, "virtio-disk1"),
         DomainDisk("sda", "/v/c.qcow2", "qcow2", "file", "disk", False, "scsi0-0-0-0")]


def test_query_block_matched_by_alias_or_file() -> None:
    reply = {"return": [
        {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "inserted": {
            "file": "/v/a.qcow2", "image": {"virtual-size": 100}, "dirty-bitmaps": [
                {"name": "standby-2", "recording": True, "persistent": True, "granularity": 65536, "count": 0},
                {"name": "standby-1", "recording": False, "inconsistent": True, "persistent": True,
                 "granularity": 65536, "count": 0},
                {"name": "backup-vda", "recording": True, "persistent": False, "granularity": 65536}]}},
        {"device": "", "qdev": "scsi0-0-0-0", "inserted": {"file": "/elsewhere", "image": {"virtual-size": 7}}},
        {"device": "", "qdev": "/machine/peripheral/whatever", "inserted": {
            "file": "/v/b.qcow2", "image": {"virtual-size": 200}}},
        {"device": "ide1-cd0", "qdev": "/x", "locked": False},  # an empty CD-ROM drive
    ]}
    got = parse_query_block(reply, DISKS)
    assert set(got) == {"vda", "vdb", "sda"}
    assert got["vda"].size == 100 and set(got["vda"].bitmaps) == {"standby-1", "standby-2"}
    assert got["vda"].bitmaps["standby-1"] == BitmapInfo("standby-1", False, False, 65536)
    assert got["vdb"].size == 200 and got["sda"].size == 7


def test_domain_disks_and_agent_channel() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/>
        <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
      <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>
      <disk type='block' device='disk'><source dev='/dev/vg/x'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='network' device='disk'><driver type='raw'/><source protocol='rbd' name='pool/img'/>
        <target dev='vdc' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/ro.qcow2'/><target dev='vdd'/><readonly/></disk>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>
    </devices></domain>"""
    disks = domain_disks(xml)
    assert [d.target for d in disks] == ["vda", "sda", "vdb", "vdc", "vdd"]
    assert [d.target for d in disks if d.protected] == ["vda", "vdb"]
    assert disks[0].alias == "virtio-disk0" and disks[0].has_bitmaps
    assert disks[2].format == "raw" and not disks[2].has_bitmaps
    assert agent_channel_state(xml) == "disconnected"
    assert agent_channel_state("<domain><devices/></domain>") is None
    assert agent_channel_state(xml.replace(" state='disconnected'", "")) == ""
    with pytest.raises(BadInput):
        domain_disks("<domain")


# ---------------------------------------------------------------------------- decisions


def _base(**disks: DiskRecord) -> CheckpointRecord:
    return CheckpointRecord("standby-4", 4, 0.0, "<domaincheckpoint/>", dict(disks))


VDA = DISKS[0]
REC = DiskRecord("vda", "/v/a.qcow2", "qcow2", 100, "standby-4")
GOOD = ImageBitmaps(100, {"standby-4": BitmapInfo("standby-4", True, True, 65536)})


@pytest.mark.parametrize(("disk", "size", "base", "image", "expect"), [
    (VDA, 100, _base(vda=REC), GOOD, None),
    (VDA, 100, None, GOOD, "first cycle"),
    (DomainDisk("vda", "/v/a.raw", "raw", "file", "disk", False), 100, _base(vda=REC), None, "raw image"),
    (DISKS[1], 100, _base(vda=REC), GOOD, "disk added"),
    (VDA, 100, _base(vda=DiskRecord("vda", "/v/a.qcow2", "raw", 100, None)), GOOD, "not tracked"),
    (VDA, 100, _base(vda=DiskRecord("vda", "/old/a.qcow2", "qcow2", 100, "standby-4")), GOOD, "replaced"),
    (VDA, 150, _base(vda=REC), ImageBitmaps(150, GOOD.bitmaps), "resized from 100 to 150"),
    (VDA, 100, _base(vda=REC), None, "cannot read the bitmaps"),
    (VDA, 100, _base(vda=REC), ImageBitmaps(100, {}), "missing"),
    (VDA, 100, _base(vda=REC), ImageBitmaps(100, {"standby-4": BitmapInfo("standby-4", False, True)}),
     "inconsistent"),
    (VDA, 100, _base(vda=REC), ImageBitmaps(100, {"standby-4": BitmapInfo("standby-4", True, False)}), "disabled"),
    (VDA, 100, _base(vda=REC), ImageBitmaps(120, GOOD.bitmaps), "resized"),
])
def test_assess_disk(disk: DomainDisk, size: int, base: CheckpointRecord | None, image: ImageBitmaps | None,
                     expect: str | None) -> None:
    reason = assess_disk(disk, size, base, image, "query failed" if image is None else None)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


def test_checkpoint_xml_and_redefine() -> None:
    x = ET.fromstring(checkpoint_xml("standby-7", {"vda": True, "vdb": False}))
    assert x.findtext("name") == "standby-7" and x.find("creationTime") is None
    assert [(d.get("name"), d.get("checkpoint"), d.get("bitmap")) for d in x.iter("disk")] == [
        ("vda", "bitmap", None), ("vdb", "no", None)]
    r = ET.fromstring(checkpoint_xml("standby-7", {"vda": True}, 1700000000))
    assert r.findtext("creationTime") == "1700000000" and r.find("disks/disk").get("bitmap") == "standby-7"
    saved = ("<domaincheckpoint><name>standby-6</name><parent><name>standby-5</name></parent>"
             "<disks><disk name='vda' checkpoint='bitmap' bitmap='standby-6'/></disks></domaincheckpoint>")
    again = ET.fromstring(redefinable(saved, 1234.5))
    assert again.find("parent") is None and again.findtext("creationTime") == "1234"
    assert again.find("disks/disk").get("bitmap") == "standby-6"
    kept = ET.fromstring(redefinable(saved.replace("</name><parent>", "</name><creationTime>99</creationTime><parent>")))
    assert kept.findtext("creationTime") == "99"
    assert checkpoint_seq("standby-12") == 12 and checkpoint_seq("standby-x") is None
    assert checkpoint_seq("mine-3") is None


def test_backup_xml_per_disk_modes(tmp_path: Any) -> None:
    plans = [DiskPlan(VDA, 100, True, None, True), DiskPlan(DISKS[1], 100, False, "disk added", True)]
    x = ET.fromstring(backup_xml("/run/s/nbd.sock", plans, "standby-4", tmp_path))
    assert x.get("mode") == "pull" and x.find("server").get("socket") == "/run/s/nbd.sock"
    disks = {d.get("name"): d for d in x.iter("disk")}
    assert disks["vda"].get("backupmode") == "incremental" and disks["vda"].get("incremental") == "standby-4"
    assert disks["vdb"].get("backupmode") == "full" and disks["vdb"].get("incremental") is None
    assert disks["vdb"].find("scratch").get("file") == str(tmp_path / "scratch-vdb.qcow2")


def test_broken_bitmap_error_parsing() -> None:
    msg = "checkpoint inconsistent: missing or broken bitmap 'standby-11' for disk 'vda'"
    assert broken_disk_in_error(msg) == ("standby-11", "vda")
    assert broken_disk_in_error("domain is not running") is None


# ---------------------------------------------------------------------------- guest agent


class ScriptedAgent:
    """The agent interface as the driver sees it, following a script (no guest involved)."""

    def __init__(self, state: str | None = "connected", ping: Exception | None = None,
                 freeze: Exception | None = None, thaw_failures: int = 0) -> None:
        self.state, self.ping_error, self.freeze_error = state, ping, freeze
        self.thaw_failures = thaw_failures
        self.calls: list[str] = []

    def channel_state(self) -> str | None:
        self.calls.append("state")
        return self.state

    def ping(self) -> None:
        self.calls.append("ping")
        if self.ping_error:
            raise self.ping_error

    def freeze(self) -> int:
        self.calls.append("freeze")
        if self.freeze_error:
            raise self.freeze_error
        return 2

    def thaw(self) -> None:
        self.calls.append("thaw")
        if self.thaw_failures:
            self.thaw_failures -= 1
            raise RuntimeError("agent busy")


def _run(agent: Any, requested: str = "auto", body: Any = None) -> tuple[str, str, list[str]]:
    with quiesced(agent, requested, thaw_attempts=2) as q:
        if agent is not None:
            agent.calls.append("checkpoint")
        if body:
            body()
    return q.consistency, q.note, agent.calls if agent is not None else []


def test_agent_freezes_around_the_checkpoint_and_thaws() -> None:
    cons, note, calls = _run(ScriptedAgent())
    assert cons == "app" and "2 guest filesystem(s) frozen" in note
    assert calls == ["state", "ping", "freeze", "checkpoint", "thaw"]
    assert _run(ScriptedAgent(), "app")[0] == "app"


@pytest.mark.parametrize(("agent", "requested", "calls", "why"), [
    (ScriptedAgent(), "crash", [], "requested"),
    (None, "auto", [], "not running"),
    (ScriptedAgent(state=None), "auto", ["state"], "no QEMU guest agent channel"),
    (ScriptedAgent(state="disconnected"), "app", ["state"], "not connected"),
    (ScriptedAgent(ping=RuntimeError("timed out")), "auto", ["state", "ping"], "does not answer: timed out"),
])
def test_no_agent_means_crash_consistent(agent: Any, requested: str, calls: list[str], why: str) -> None:
    cons, note, got = _run(agent, requested)
    assert cons == "crash" and why in note
    assert got == ([*calls, "checkpoint"] if agent is not None else [])
    assert "freeze" not in got and "thaw" not in got


def test_failed_freeze_is_thawed_and_recorded_as_crash() -> None:
    cons, note, calls = _run(ScriptedAgent(freeze=RuntimeError("fsfreeze timed out")))
    assert cons == "crash" and "fsfreeze timed out" in note
    assert calls == ["state", "ping", "freeze", "thaw", "checkpoint"]


def test_thaw_happens_when_the_checkpoint_fails() -> None:
    agent = ScriptedAgent()

    def fail() -> None:
        raise RemoteError("backupBegin failed")

    with pytest.raises(RemoteError, match="backupBegin failed"):
        _run(agent, body=fail)
    assert agent.calls == ["state", "ping", "freeze", "checkpoint", "thaw"]


def test_thaw_is_retried_and_a_stuck_guest_is_an_error() -> None:
    agent = ScriptedAgent(thaw_failures=1)
    assert _run(agent)[0] == "app"
    assert agent.calls[-2:] == ["thaw", "thaw"]
    stuck = ScriptedAgent(thaw_failures=5)
    with pytest.raises(RemoteError, match="could not be thawed"):
        _run(stuck)


def test_bad_consistency_request() -> None:
    with pytest.raises(BadInput):
        _run(ScriptedAgent(), "eventual")


def test_libvirt_driver_offers_the_driver_interface(tmp_path: Any) -> None:
    import inspect

    from standby.drivers.base import HypervisorDriver
    from standby.drivers.libvirt.driver import LibvirtDriver

    drv = LibvirtDriver("qemu:///system", tmp_path, conn=object())
    members = [n for n, _ in inspect.getmembers(HypervisorDriver) if not n.startswith("_")]
    assert "begin_cycle" in members and "complete_cycle" in members
    for name in members:
        assert hasattr(drv, name), name
        ours, theirs = getattr(LibvirtDriver, name, None), getattr(HypervisorDriver, name)
        if callable(theirs):
            assert list(inspect.signature(ours).parameters)[:len(inspect.signature(theirs).parameters)] == \
                list(inspect.signature(theirs).parameters), name
    assert drv.uri == "qemu:///system"
