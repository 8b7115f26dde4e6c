"""The test guest: its record format and host-side verifier (fast, no VM), and the guest
itself under libvirt (slow): written records survive a pulled plug as a consistent prefix
at least as long as what the guest acknowledged, the in-guest and host verifiers agree
(also on a damaged disk), and write mode appends after a disk's valid prefix."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from standby.testing import guest
from standby.testing.guest import SLOT, Verdict, make_record, record_sum, verify_image, verify_raw

# ---------------------------------------------------------------------------------------
# Host-side verifier on images written by the Python writer (byte-identical records)


def _image(path: Path, records: int, size_mib: int = 2) -> list[bytes]:
    """A raw image with records 0..records-1; returns them (for surgery)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        boot, prev, out = os.urandom(8).hex(), guest.ZERO_SUM, []
        for seq in range(records):
            rec = make_record(seq, boot, prev)
            f.seek(seq * SLOT)
            f.write(rec)
            out.append(rec)
            prev = record_sum(rec)
    return out


def _put(path: Path, slot: int, data: bytes, at: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(slot * SLOT + at)
        f.write(data)


def test_record_layout() -> None:
    rec = make_record(7, "0123456789abcdef", guest.ZERO_SUM)
    assert len(rec) == SLOT
    assert rec.startswith(b"SBYREC01 seq=000000000007 boot=0123456789abcdef prev=" + b"0" * 64 + b"\n")
    assert rec[guest.BODY_LEN - 1:guest.BODY_LEN] == b"\n"
    assert rec[guest.BODY_LEN:] == b"sum=" + record_sum(rec).encode() + b"\n"


def test_empty_and_clean_disks(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    _image(img, 0)
    assert verify_raw(img) == Verdict(-1, 0, 0, 0, 0)
    _image(img, 50)
    v = verify_raw(img)
    assert v == Verdict(49, 50, 0, 0, 0) and v.ok
    assert v.line() == "standby-guest: verify last=49 records=50 torn=0 gaps=0 out_of_order=0 ok=1"


def test_corrupt_payload_is_torn(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    _image(img, 50)
    _put(img, 20, b"\xff\x00", at=2000)
    assert verify_raw(img) == Verdict(19, 49, 1, 0, 0)


def test_half_written_records_are_torn(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    recs = _image(img, 10)
    rec = make_record(10, "0123456789abcdef", record_sum(recs[9]))
    _put(img, 10, rec[:512])  # only the first sector reached the disk: header, no trailer
    assert verify_raw(img) == Verdict(9, 10, 1, 0, 0)
    _put(img, 10, bytes(SLOT))
    _put(img, 10, rec[3584:], at=3584)  # only the last sector: trailer, no header
    assert verify_raw(img) == Verdict(9, 10, 1, 0, 0)


def test_missing_record_is_a_gap(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    _image(img, 50)
    _put(img, 30, bytes(SLOT))
    _put(img, 0, bytes(SLOT))
    assert verify_raw(img) == Verdict(-1, 48, 0, 2, 0)


def test_swapped_and_foreign_records_are_out_of_order(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    recs = _image(img, 50)
    _put(img, 40, recs[41])
    _put(img, 41, recs[40])
    # 40 and 41 hold the wrong seq; 42's prev no longer matches the record before it
    assert verify_raw(img) == Verdict(39, 50, 0, 0, 3)
    img2 = tmp_path / "e.raw"
    recs = _image(img2, 20)
    _put(img2, 10, make_record(10, "fedcba9876543210", "ab" * 32))  # valid, but another chain
    assert verify_raw(img2) == Verdict(9, 20, 0, 0, 2)


def test_records_across_read_chunks_and_area_limit(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    recs = _image(img, 1100, size_mib=8)  # past the verifier's 4 MiB read chunk
    assert verify_raw(img) == Verdict(1099, 1100, 0, 0, 0)
    _put(img, 1900, make_record(1900, "0123456789abcdef", record_sum(recs[-1])))
    assert verify_raw(img).gaps == 800
    assert verify_raw(img, area_mib=6) == Verdict(1099, 1100, 0, 0, 0)  # slot 1900 is at 7.4 MiB


def test_printable_runs_match_strings_across_chunks_and_holes(tmp_path: Path) -> None:
    import random

    rnd = random.Random(4)
    img = tmp_path / "runs.raw"
    size = 3 << 20
    with open(img, "wb") as f:
        f.truncate(size)  # mostly holes
        for _ in range(200):
            f.seek(rnd.randrange(size - 9000))
            kind = rnd.random()
            if kind < 0.4:
                f.write(bytes(rnd.choice(b"abc\t ~XYZ019") for _ in range(rnd.randrange(1, 9000))))
            elif kind < 0.7:
                f.write(rnd.randbytes(rnd.randrange(1, 9000)))
            else:
                f.write(make_record(rnd.randrange(1000), "0123456789abcdef", guest.ZERO_SUM))
    data = img.read_bytes()
    want = [(m.start(), m.group()) for m in guest._RUN.finditer(data)]
    assert len(want) > 100
    for chunk in (4096, 5000, 65536, 4 << 20):
        with open(img, "rb") as f:
            assert list(guest._runs(f, size, chunk)) == want, chunk
    with open(img, "rb") as f:
        assert list(guest._runs(f, 1 << 20)) == [(o, r[:(1 << 20) - o]) for o, r in want
                                                 if o < 1 << 20 and len(r[:(1 << 20) - o]) >= guest.MIN_RUN]


def test_qcow2_image_is_verified_through_qemu_img(tmp_path: Path) -> None:
    raw, qcow = tmp_path / "d.raw", tmp_path / "d.qcow2"
    _image(raw, 64)
    _put(raw, 33, bytes(SLOT))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    assert guest.image_format(qcow) == "qcow2"
    assert verify_image(qcow) == verify_raw(raw) == Verdict(32, 63, 0, 1, 0)


def test_console_parsing(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("standby-guest: wrote seq=0\n[  3.1] virtio_blk virtio0: [vda] 65536 512-byte\n"
                   "standby-guest: wrote seq=1\nstandby-guest: wrote seq=12\nstandby-guest: wro")
    c = guest.Console(log)
    assert c.acked() == 12 and c.verdict() is None
    log.write_text(log.read_text() + "\n" + Verdict(12, 13, 0, 0, 0).line() + "\n[ 9.0] reboot: Power down\n")
    assert c.verdict() == Verdict(12, 13, 0, 0, 0)
    assert guest.Console(tmp_path / "missing").acked() == -1


def test_init_loads_virtio_modules_in_order_and_domain_xml() -> None:
    init = guest.init_script()
    assert "for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk;" in init
    assert "@" not in init
    img = guest.GuestImage(Path("/k"), Path("/i.gz"), "6.1", "key")
    xml = guest.domain_xml("n", "/d.qcow2", "/c.log", img, guest.cmdline("write", rate=5), kvm=False,
                           disk_format="qcow2")
    assert "<domain type='qemu'>" in xml and "mode=write rate=5 count=0" in xml
    assert "<model type='none'/>" in xml and "type=\"qcow2\"" in xml
    with pytest.raises(ValueError):
        guest.cmdline("read")


# ---------------------------------------------------------------------------------------
# The guest under libvirt (software emulation here: about 10-14 s a boot)

slow = pytest.mark.slow


@slow
def test_build_is_cached(guest_image: guest.GuestImage) -> None:
    assert guest_image.kernel.stat().st_size > 1 << 20 and guest_image.initrd.stat().st_size > 100 << 10
    t0 = time.monotonic()
    again = guest.build()
    assert again == guest_image and not again.built
    assert time.monotonic() - t0 < 2.0


def _initramfs_file(initrd: Path, name: str) -> bytes:
    import gzip

    data, pos = gzip.decompress(initrd.read_bytes()), 0
    while True:
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        start = pos + 110
        entry = data[start:start + namesize - 1].decode()
        body = (start + namesize + 3) // 4 * 4
        if entry == name:
            return data[body:body + size]
        if entry == "TRAILER!!!":
            raise KeyError(name)
        pos = (body + size + 3) // 4 * 4


@slow
def test_host_scan_reports_what_busybox_strings_reports(guest_image: guest.GuestImage, tmp_path: Path) -> None:
    """The host verifier emulates the guest's `strings -t d -n 13`: check it against the
    guest's own busybox, run on the host, on data full of edge cases."""
    import random

    bb = tmp_path / "busybox"
    bb.write_bytes(_initramfs_file(guest_image.initrd, "bin/busybox"))
    bb.chmod(0o755)
    rnd = random.Random(7)
    img = tmp_path / "d.raw"
    recs = _image(img, 40)
    with open(img, "r+b") as f:
        for _ in range(120):
            f.seek(rnd.randrange((2 << 20) - 9000))
            f.write(bytes(rnd.choice(b"\t\n\x0b\x1f\x7f\x80\xff ~aZ9") for _ in range(rnd.randrange(1, 4000))))
        f.seek(100 * SLOT)
        f.write(recs[3])
    out = subprocess.run([str(bb), "strings", "-t", "d", "-n", "13", str(img)], capture_output=True, check=True).stdout
    theirs = [(int(off), run.encode("latin-1")) for off, run in
              (line.lstrip(b" ").decode("latin-1").split(" ", 1) for line in out.split(b"\n") if line)]
    with open(img, "rb") as f:
        ours = list(guest._runs(f, 2 << 20))
    assert len(ours) > 50 and ours == theirs


@slow
def test_pulled_plug_leaves_a_consistent_prefix_covering_what_was_acked(
        libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> None:
    disk = guest.create_disk(vm_dir / "disk.qcow2", 32)
    with guest.GuestVM(libvirt_conn, vm_name("write"), disk, vm_dir / "write.log", guest_image,
                       guest.cmdline("write", rate=20)) as vm:
        vm.console.wait_for(lambda c: c.acked() >= 30, 90, alive=vm.running)
        acked = vm.console.acked()
        vm.destroy()  # QEMU killed: whatever the guest had not flushed is lost
        assert not vm.running()
    host = verify_image(disk)
    assert host.ok, host
    assert host.last >= acked, (host, acked)
    assert host.last <= acked + 40  # 20 records/s: the console (through virtlogd) lags the disk a little
    in_guest = guest.boot_verify(libvirt_conn, vm_name("verify"), disk, vm_dir / "verify.log", guest_image)
    assert in_guest == host


@slow
def test_in_guest_and_host_verifiers_agree_on_a_damaged_disk(
        libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> None:
    disk = vm_dir / "damaged.raw"
    recs = _image(disk, 120, size_mib=16)
    _put(disk, 20, b"\x00\x01\x02", at=1500)  # torn
    _put(disk, 50, bytes(SLOT))  # gap
    _put(disk, 70, recs[71])  # out of order: 70, 71 and 72
    _put(disk, 71, recs[70])
    _put(disk, 121, make_record(121, "0123456789abcdef", guest.ZERO_SUM)[:512])  # header only: torn
    _put(disk, 3000, recs[5])  # a stray copy far out: out of order; slots 122-2999 empty
    host = verify_raw(disk)
    assert host == Verdict(19, 119, 2, 1 + 1 + 2878, 4)  # gaps: slots 50, 120, 122-2999
    assert guest.boot_verify(libvirt_conn, vm_name("verify"), disk, vm_dir / "verify.log", guest_image) == host


@slow
def test_write_mode_appends_after_the_valid_prefix(
        libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> None:
    disk = vm_dir / "disk.raw"
    # a prefix past the first MiB (the guest reads it a MiB at a time) on a disk far
    # bigger than that: write mode reads only as far as the prefix goes
    _image(disk, 260, size_mib=1024)
    with guest.GuestVM(libvirt_conn, vm_name("append"), disk, vm_dir / "append.log", guest_image,
                       guest.cmdline("write", rate=0, count=5)) as vm:
        vm.console.wait_for(lambda c: "standby-guest: done" in c.text(), 90, alive=vm.running)
        vm.wait_stopped(30)  # count=N: it powers off by itself
        assert "standby-guest: write start=260 " in vm.console.text()
        assert vm.console.acked() == 264
    assert verify_raw(disk) == Verdict(264, 265, 0, 0, 0)


@slow
def test_write_mode_resumes_before_a_torn_last_record(
        libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> None:
    disk = vm_dir / "torn.raw"
    _image(disk, 300, size_mib=8)  # past the first MiB: the header run crosses a chunk
    _put(disk, 299, b"0000", at=4031)  # the last record's sum no longer matches: a torn write
    with guest.GuestVM(libvirt_conn, vm_name("torn"), disk, vm_dir / "torn.log", guest_image,
                       guest.cmdline("write", rate=0, count=3)) as vm:
        vm.console.wait_for(lambda c: "standby-guest: done" in c.text(), 90, alive=vm.running)
        vm.wait_stopped(30)
        assert "standby-guest: write start=299 " in vm.console.text()  # it overwrote the torn one
    assert verify_raw(disk) == Verdict(301, 302, 0, 0, 0)


@slow
def test_a_graceful_shutdown_stops_the_writer_after_a_whole_record(
        libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> None:
    disk = vm_dir / "shutdown.raw"
    _image(disk, 0, size_mib=4)
    with guest.GuestVM(libvirt_conn, vm_name("shutdown"), disk, vm_dir / "shutdown.log", guest_image,
                       guest.cmdline("write", rate=20)) as vm:
        vm.console.wait_for(lambda c: c.acked() >= 10, 90, alive=vm.running)
        libvirt_conn.lookupByName(vm.name).shutdown()  # the ACPI power button
        vm.wait_stopped(30)
        m = re.search(r"standby-guest: shutdown last=(\d+)", vm.console.text())
        assert m, vm.console.text()[-500:]
        last = int(m.group(1))
    assert last == vm.console.acked()
    assert verify_raw(disk) == Verdict(last, last + 1, 0, 0, 0)
