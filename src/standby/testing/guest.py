"""The test guest: a tiny Linux VM, built from Debian packages, that proves its data.

Built (and cached, `build()`) from two Debian packages only: the kernel that
`linux-image-amd64` depends on and `busybox-static` (`apt-get download`, unpacked with
`dpkg-deb`). The guest is a kernel (the bzImage's uncompressed vmlinux, booted through its
PVH entry: no in-guest decompression; the bzImage itself if it has none) plus a gzip'd
newc initramfs holding busybox, the virtio modules and an /init script (INIT below).
Its kernel command line chooses what it does:

- `mode=write rate=N [count=N] [area=MiB]`: append checksummed, sequence-numbered records
  to /dev/vda, N per second (0: as fast as it can), each written with O_DIRECT and fsync,
  and print `standby-guest: wrote seq=S` on the serial console after each one is on disk;
  writing continues after the disk's prefix, so a recovered disk keeps its chain (the
  prefix: the run of in-order headers from slot 0, back to its last whole record; only
  those last records' sums are checked, so resuming costs one pass per MiB, not a fork per
  record: the host verifier checks the rest).
  With count=N it powers off after N records. A graceful shutdown (the ACPI power button:
  `virsh shutdown`, libvirt's shutdown) stops it after a whole record, prints
  `standby-guest: shutdown last=L` and powers off, in about 2 s.
- `mode=verify [area=MiB]`: scan the disk, print one line
  `standby-guest: verify last=L records=R torn=T gaps=G out_of_order=O ok=1` and power off.
- `mode=stream rate=N [area=MiB]`: write N MiB/s (0: as fast as it can) in 1 MiB O_DIRECT
  writes, round the disk (or its first `area` MiB), each from another offset of a random
  pool so rewritten blocks change; prints `standby-guest: streamed mib=K` every 8 MiB. A
  load for RPO measurements (`bench/rpo.py`), not a proof of data: nothing to verify.
- `area=MiB` limits records and scans to the start of the disk.

Costs under software emulation (2-core host): about 4-5 s from domain start to /init
(QEMU + kernel); write mode starts after reading its disk's valid prefix; the verify scan
takes about 60 ms per MiB of disk plus 20 ms per record (use `area` on big disks); the
writer keeps up with rate=20 on an idle host (three busybox forks and an fsync per
record: flat out it managed 12-20 records/s with the host's two cores busy elsewhere).

Record format (one 4096-byte slot per record; record `seq` lives in slot `seq`):

    [0, 118)     header  "SBYREC01 seq=%012d boot=%16s prev=%64s\\n"
                 boot: 16 hex digits, random per write-mode boot;
                 prev: the sum of record seq-1 (64 zeros for seq 0): a hash chain
    [118, 4026)  payload: 3908 random bytes
    [4026]       "\\n"
    [4027, 4096) trailer "sum=%64s\\n", sum = sha256 of bytes [0, 4027)

Verification (the guest's busybox `strings`/`sha256sum` scan and `verify_raw` here
implement the same rules): a slot is *marked* when a printable run (tab or 0x20-0x7e, at
least 13 long, as `strings -n 13` reports it) starts at its offset 0 with
"SBYREC01 seq=" or at offset 4027 with "sum=". A marked slot is *valid* when its header
has exactly the four fields above, its trailer is "sum=" and 64 hex digits, and the sum
matches; otherwise it is *torn*. A valid record is *out of order* when its seq differs
from its slot, or its prev differs from the sum of a valid record in the slot before it
(64 zeros in slot 0). *gaps* counts unmarked slots below the highest valid record.
*last* is the highest slot such that it and every slot before it hold a valid record
that is in order (-1 if none). ok=1 when torn, gaps and out_of_order are all 0.

    python -m standby.testing.guest build            # print the kernel and initramfs paths
    python -m standby.testing.guest verify DISK      # host-side verifier (raw or qcow2)
    python -m standby.testing.guest xml NAME DISK LOG --mode write --rate 20
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape, quoteattr

# ---------------------------------------------------------------------------------------
# Record format

SLOT = 4096
HEADER_LEN = 118
BODY_LEN = 4027  # header + payload + "\n": what the sum covers
PAYLOAD_LEN = BODY_LEN - HEADER_LEN - 1
TRAILER_OFF = BODY_LEN
MAGIC = b"SBYREC01 seq="
ZERO_SUM = "0" * 64
MIN_RUN = 13  # strings -n 13

_RUN = re.compile(rb"[\t\x20-\x7e]{%d,}" % MIN_RUN)
_PRINTABLE = bytes([9, *range(0x20, 0x7f)])
_HEX = re.compile(r"[0-9a-f]+")
_DIGITS = re.compile(r"[0-9]+")


def make_record(seq: int, boot: str, prev: str, payload: bytes | None = None) -> bytes:
    """One 4096-byte record, byte for byte what the guest writes for (seq, boot, prev)."""
    if len(boot) != 16 or len(prev) != 64:
        raise ValueError("boot must be 16 hex digits and prev 64")
    header = f"SBYREC01 seq={seq:012d} boot={boot} prev={prev}\n".encode()
    assert len(header) == HEADER_LEN
    payload = os.urandom(PAYLOAD_LEN) if payload is None else payload
    if len(payload) != PAYLOAD_LEN:
        raise ValueError(f"payload must be {PAYLOAD_LEN} bytes")
    body = header + payload + b"\n"
    return body + b"sum=" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def record_sum(record: bytes) -> str:
    return record[TRAILER_OFF + 4:TRAILER_OFF + 68].decode()


def write_records(f: BinaryIO, start: int, count: int, prev: str = ZERO_SUM, boot: str | None = None) -> str:
    """Write records start..start+count-1 into an open raw image (like the guest would);
    returns the sum of the last one (the next record's prev)."""
    boot = boot or os.urandom(8).hex()
    for seq in range(start, start + count):
        rec = make_record(seq, boot, prev)
        f.seek(seq * SLOT)
        f.write(rec)
        prev = record_sum(rec)
    return prev


@dataclass(frozen=True)
class Verdict:
    last: int
    records: int
    torn: int
    gaps: int
    out_of_order: int

    @property
    def ok(self) -> bool:
        return self.torn == 0 and self.gaps == 0 and self.out_of_order == 0

    def line(self) -> str:
        return (f"standby-guest: verify last={self.last} records={self.records} torn={self.torn} "
                f"gaps={self.gaps} out_of_order={self.out_of_order} ok={int(self.ok)}")

    @classmethod
    def parse(cls, text: str) -> Verdict | None:
        """The last verify line in a console log (None if there is none yet)."""
        found = None
        for m in re.finditer(r"standby-guest: verify ((?:\w+=-?\d+ ?)+)", text):
            kv = dict(p.split("=") for p in m.group(1).split())
            try:
                found = cls(int(kv["last"]), int(kv["records"]), int(kv["torn"]), int(kv["gaps"]),
                            int(kv["out_of_order"]))
            except KeyError:
                continue
        return found


def _runs(f: BinaryIO, limit: int, chunk: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
    """(offset, run) for each printable run of MIN_RUN+ bytes in the first `limit` bytes,
    as `strings -t d -n 13` reports them. Holes of sparse files are skipped (SEEK_DATA):
    they read as zeros, which end any run."""
    fd = f.fileno()
    pos = 0
    carry, carry_off = b"", 0  # a printable run still open at the end of what was read
    while pos < limit:
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            data_at = limit if e.errno == errno.ENXIO else pos  # ENXIO: only a hole is left
        if data_at > pos:
            if len(carry) >= MIN_RUN:
                yield carry_off, carry
            carry, pos = b"", min(data_at, limit)
            continue
        data = os.pread(fd, min(chunk, limit - pos), pos)
        if not data:
            break
        if not carry and data.count(0) == len(data):
            pos += len(data)
            continue
        buf, base = carry + data, pos - len(carry)
        cut = len(buf.rstrip(_PRINTABLE))  # where the trailing printable run starts
        for r in _RUN.finditer(buf, 0, cut):
            yield base + r.start(), r.group()
        carry, carry_off = buf[cut:], base + cut
        pos += len(data)
    if len(carry) >= MIN_RUN:
        yield carry_off, carry


def _header_fields(run: bytes) -> tuple[int, str] | None:
    """(seq, prev) when the header run has exactly the four expected fields."""
    parts = run.decode("ascii").replace("\t", " ").split()
    if len(parts) != 4 or parts[0] != "SBYREC01":
        return None
    seq, boot, prev = parts[1][4:], parts[2][5:], parts[3][5:]
    if not (parts[1].startswith("seq=") and len(seq) == 12 and _DIGITS.fullmatch(seq)):
        return None
    if not (parts[2].startswith("boot=") and len(boot) == 16 and _HEX.fullmatch(boot)):
        return None
    if not (parts[3].startswith("prev=") and len(prev) == 64 and _HEX.fullmatch(prev)):
        return None
    return int(seq), prev


class _Scanner:
    """The verification rules, fed marked slots in ascending order (shared by the host
    verifier; the guest's /init implements the same steps in shell)."""

    def __init__(self) -> None:
        self.last = -1
        self.records = self.torn = self.gaps = self.ooo = 0
        self.marked = 0
        self.vslot, self.vsum = -1, ZERO_SUM
        self.last_sum = ZERO_SUM

    def slot(self, s: int, header: bytes | None, trailer: bytes | None, body: Callable[[], bytes]) -> None:
        self.marked += 1
        fields = _header_fields(header) if header is not None else None
        tsum = trailer[4:].decode("ascii") if trailer is not None else ""
        valid = (fields is not None and len(tsum) == 64 and _HEX.fullmatch(tsum) is not None
                 and hashlib.sha256(body()).hexdigest() == tsum)
        if not valid or fields is None:
            self.torn += 1
            return
        seq, prev = fields
        self.records += 1
        bad = seq != s
        if s == 0:
            bad = bad or prev != ZERO_SUM
        elif self.vslot == s - 1:
            bad = bad or prev != self.vsum
        if bad:
            self.ooo += 1
        elif s == self.last + 1:
            self.last, self.last_sum = s, tsum
        self.vslot, self.vsum = s, tsum
        self.gaps = s + 1 - self.marked

    def verdict(self) -> Verdict:
        return Verdict(self.last, self.records, self.torn, self.gaps, self.ooo)


def verify_raw(path: str | os.PathLike[str], area_mib: int = 0) -> Verdict:
    """Verify a raw disk image (or block device) without booting the guest."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        limit = size if area_mib <= 0 else min(size, area_mib << 20)
        slots = limit // SLOT
        marks = _marks(_runs(f, limit), slots)

        def body_at(s: int) -> Callable[[], bytes]:
            def read() -> bytes:
                f.seek(s * SLOT)
                return f.read(BODY_LEN)
            return read

        sc = _Scanner()
        for s, header, trailer in marks:
            sc.slot(s, header, trailer, body_at(s))
        return sc.verdict()


def _marks(runs: Iterable[tuple[int, bytes]], slots: int) -> list[tuple[int, bytes | None, bytes | None]]:
    out: dict[int, list[bytes | None]] = {}
    for off, run in runs:
        s, r = divmod(off, SLOT)
        if s >= slots:
            continue
        if r == 0 and run.startswith(MAGIC):
            out.setdefault(s, [None, None])[0] = run
        elif r == TRAILER_OFF and run.startswith(b"sum="):
            out.setdefault(s, [None, None])[1] = run
    return [(s, h, t) for s, (h, t) in sorted(out.items())]


def image_format(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def verify_image(path: str | os.PathLike[str], area_mib: int = 0) -> Verdict:
    """Verify a raw or qcow2 image (qcow2 through `qemu-img convert` to a sparse raw)."""
    if image_format(path) == "raw":
        return verify_raw(path, area_mib)
    with tempfile.TemporaryDirectory(prefix="standby-verify-") as tmp:
        raw = Path(tmp, "disk.raw")
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-S", "4k", str(path), str(raw)],
                       check=True, capture_output=True)
        return verify_raw(raw, area_mib)


# ---------------------------------------------------------------------------------------
# The guest's /init

MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk")
# The ACPI power button as an input device, so a graceful shutdown from libvirt reaches the
# guest (busybox acpid); loaded if present: without them the host forces the guest off.
ACPI_MODULES = ("button", "evdev")
_MODULE_DIRS = {"virtio_blk": "kernel/drivers/block", "button": "kernel/drivers/acpi", "evdev": "kernel/drivers/input"}

INIT = r"""#!/bin/busybox sh
# /init of the Standby test guest (busybox ash). Record format and verification rules:
# src/standby/testing/guest.py (the host verifier implements the same rules).
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "standby-guest: $*"; }
die() { say "error $*"; sync; poweroff -f; sleep 5; exit 1; }

mode=verify rate=10 count=0 area=0
for w in $(cat /proc/cmdline); do
  case "$w" in
    mode=*) mode=${w#mode=} ;;
    rate=*) rate=${w#rate=} ;;
    count=*) count=${w#count=} ;;
    area=*) area=${w#area=} ;;
  esac
done
for m in @MODULES@; do insmod /lib/modules/$m.ko || die "insmod $m"; done
for m in @ACPI_MODULES@; do [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null; done
# A graceful shutdown (the ACPI power button) stops the writer after a whole record and
# powers off, as an OS shutting down cleanly would.
stopping=
trap 'stopping=1' USR1
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nkill -USR1 1\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log 2>/dev/null
n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1)); [ $n -gt 300 ] && die "no /dev/vda"; usleep 20000
done
read sectors < /sys/block/vda/size
slots=$((sectors / 8))
[ "$area" -gt 0 ] && [ $((area * 256)) -lt $slots ] && slots=$((area * 256))
Z=0000000000000000000000000000000000000000000000000000000000000000

now_cs() { read up _ < /proc/uptime; s=${up%.*}; f=${up#*.}; f=${f#0}; now=$((s * 100 + f)); }
ishex() { case "$1" in *[!0-9a-f]*) return 1 ;; esac; [ ${#1} -eq $2 ]; }

hdr_ok() {  # sets hseq, hprev
  set -- $1
  [ $# -eq 4 ] && [ "$1" = SBYREC01 ] || return 1
  q=${2#seq=}; b=${3#boot=}; p=${4#prev=}
  [ "$2" = "seq=$q" ] && [ ${#q} -eq 12 ] || return 1
  case "$q" in *[!0-9]*) return 1 ;; esac
  [ "$3" = "boot=$b" ] && ishex "$b" 16 && [ "$4" = "prev=$p" ] && ishex "$p" 64 || return 1
  while [ ${#q} -gt 1 ] && [ "${q#0}" != "$q" ]; do q=${q#0}; done
  hseq=$q; hprev=$p
}

slot_done() {
  marked=$((marked + 1))
  valid=0
  if [ -n "$hdr" ] && [ -n "$tsum" ] && ishex "$tsum" 64 && hdr_ok "$hdr"; then
    dd if=/dev/vda of=/tmp/b bs=4027 count=1 skip=$((cur * 4096)) iflag=skip_bytes 2>/dev/null
    sha256sum /tmp/b > /tmp/s; read -r calc _ < /tmp/s
    [ "$calc" = "$tsum" ] && valid=1
  fi
  if [ $valid = 0 ]; then torn=$((torn + 1)); return; fi
  records=$((records + 1))
  bad=0
  [ "$hseq" -ne $cur ] && bad=1
  if [ $cur -eq 0 ]; then [ "$hprev" = $Z ] || bad=1
  elif [ $vslot -eq $((cur - 1)) ]; then [ "$hprev" = "$vsum" ] || bad=1; fi
  if [ $bad = 1 ]; then ooo=$((ooo + 1))
  elif [ $cur -eq $((last + 1)) ]; then last=$cur; lastsum=$tsum; fi
  vslot=$cur; vsum=$tsum
  gaps=$((cur + 1 - marked))
}

marks() {  # the slots marked in /tmp/marks (strings offsets + $1) through slot_done
  while read -r off str; do
    off=$((off + $1)); s=$((off / 4096)); r=$((off % 4096))
    [ $s -ge $slots ] && continue
    case "$r:$str" in
      "0:SBYREC01 seq="*) kind=h ;;
      "4027:sum="*) kind=t ;;
      *) continue ;;
    esac
    if [ $s -ne $cur ]; then
      [ $cur -ge 0 ] && slot_done
      cur=$s hdr= tsum=
    fi
    if [ $kind = h ]; then hdr=$str; else tsum=${str#sum=}; fi
  done < /tmp/marks
  [ $cur -ge 0 ] && slot_done
  cur=-1
}

scan() {  # the whole disk (or area): sets last lastsum records torn gaps ooo ok
  last=-1 lastsum=$Z records=0 torn=0 gaps=0 ooo=0 marked=0 vslot=-1 vsum=$Z cur=-1 hdr= tsum=
  if [ "$area" -gt 0 ]; then
    dd if=/dev/vda bs=1048576 count=$area 2>/dev/null | strings -t d -n 13
  else
    strings -t d -n 13 /dev/vda
  fi | grep -e ' SBYREC01 seq=' -e ' sum=' > /tmp/marks
  marks 0
  ok=0; [ $torn -eq 0 ] && [ $gaps -eq 0 ] && [ $ooo -eq 0 ] && ok=1
}

scan_prefix() {  # write mode's resume point: sets last lastsum
  # The run of in-order headers from slot 0, one awk pass per MiB (forking per record cost
  # minutes on a long history under emulation); then the records at the run's end are
  # checked back to the first whole one (the last write may be torn). The full rules are
  # verify's: the host verifier applies them to every slot.
  last=-1 lastsum=$Z run=-1 k=0
  while [ $((k * 256)) -lt $slots ]; do
    run=$(dd if=/dev/vda bs=1048576 skip=$k count=1 2>/dev/null | strings -t d -n 13 | awk \
      -v base=$((k * 1048576)) -v run=$run -v slots=$slots '
        $2 == "SBYREC01" && ($1 + base) % 4096 == 0 {
          s = ($1 + base) / 4096; q = substr($3, 5)
          sub(/^0+/, "", q)  # busybox awk reads a leading 0 as octal
          if (s == run + 1 && s < slots && substr($3, 1, 4) == "seq=" && q + 0 == s) run = s
        }
        END { print run }')
    k=$((k + 1))
    [ $run -lt $((k * 256 - 1)) ] && break
  done
  while [ $run -ge 0 ]; do
    dd if=/dev/vda of=/tmp/r bs=4096 count=1 skip=$run 2>/dev/null
    head -c 4027 /tmp/r | sha256sum > /tmp/s; read -r calc _ < /tmp/s
    tail -c 69 /tmp/r > /tmp/t; read -r trailer < /tmp/t
    if [ "$trailer" = "sum=$calc" ]; then last=$run; lastsum=$calc; return; fi
    run=$((run - 1))
  done
}

verdict() { echo "standby-guest: verify last=$last records=$records torn=$torn gaps=$gaps out_of_order=$ooo ok=$ok"; }

case "$mode" in
verify)
  now_cs; t0=$now
  scan
  now_cs
  say "scanned slots=$slots in $(((now - t0) * 10)) ms"
  verdict
  sync; poweroff -f ;;
write)
  scan_prefix
  boot=$(hexdump -n 8 -e '8/1 "%02x"' /dev/urandom)
  seq=$((last + 1)); prev=$lastsum; n=0; direct=oflag=direct
  say "write start=$seq slots=$slots rate=$rate count=$count boot=$boot"
  now_cs; t0=$now
  while :; do
    if [ -n "$stopping" ]; then say "shutdown last=$((seq - 1))"; sync; poweroff -f; sleep 5; fi
    if [ "$count" -gt 0 ] && [ $n -ge "$count" ]; then say "done last=$((seq - 1))"; sync; poweroff -f; fi
    if [ $seq -ge $slots ]; then
      say "full last=$((seq - 1))"
      while [ -z "$stopping" ]; do sleep 1; done
      sync; poweroff -f; sleep 5
    fi
    printf 'SBYREC01 seq=%012d boot=%s prev=%s\n' $seq $boot $prev > /tmp/b
    dd if=/dev/urandom bs=@PAYLOAD_LEN@ count=1 iflag=fullblock 2>/dev/null >> /tmp/b
    echo >> /tmp/b
    sha256sum /tmp/b > /tmp/s; read -r sum _ < /tmp/s
    echo "sum=$sum" >> /tmp/b
    if ! dd if=/tmp/b of=/dev/vda bs=4096 count=1 seek=$seq $direct conv=notrunc,fsync 2>/tmp/e; then
      [ -n "$direct" ] || die "write seq=$seq: $(cat /tmp/e)"
      say "O_DIRECT refused, writing with fsync only"; direct=
      continue
    fi
    say "wrote seq=$seq"
    prev=$sum; seq=$((seq + 1)); n=$((n + 1))
    if [ "$rate" -gt 0 ]; then
      now_cs; due=$((t0 + n * 100 / rate))
      [ $due -gt $now ] && usleep $(((due - now) * 10000))
    fi
  done ;;
stream)
  # rate MiB/s of 1 MiB writes over the first `area` MiB (all of it: 0), each from another
  # offset of a 4 MiB random pool, so a block rewritten holds new data
  mib=$((slots / 256)); [ $mib -gt 0 ] || die "disk too small"
  dd if=/dev/urandom of=/tmp/pool bs=65536 count=64 iflag=fullblock 2>/dev/null || die "no pool"
  say "stream start rate=$rate area=$mib"
  now_cs; t0=$now; k=0; direct=oflag=direct
  while [ -z "$stopping" ]; do
    if ! dd if=/tmp/pool of=/dev/vda bs=65536 count=16 skip=$(((k * 7) % 48)) seek=$(((k % mib) * 16)) \
        $direct conv=notrunc 2>/tmp/e; then
      [ -n "$direct" ] || die "stream k=$k: $(cat /tmp/e)"
      direct=; continue
    fi
    k=$((k + 1))
    [ $((k % 8)) -eq 0 ] && say "streamed mib=$k"
    if [ "$rate" -gt 0 ]; then
      now_cs; due=$((t0 + k * 100 / rate))
      [ $due -gt $now ] && usleep $(((due - now) * 10000))
    fi
  done
  say "shutdown streamed=$k"; sync; poweroff -f; sleep 5 ;;
*)
  die "unknown mode=$mode" ;;
esac
"""


def init_script() -> str:
    return (INIT.replace("@MODULES@", " ".join(MODULES)).replace("@ACPI_MODULES@", " ".join(ACPI_MODULES))
            .replace("@PAYLOAD_LEN@", str(PAYLOAD_LEN)))


# ---------------------------------------------------------------------------------------
# Building the kernel + initramfs from Debian packages (cached)

BUILD_FORMAT = 2  # bump when what a build holds changes


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # what to boot: the uncompressed vmlinux when it has a PVH entry, else bzImage
    initrd: Path
    kernel_version: str
    key: str
    built: bool = field(default=False, compare=False)  # False when it came from the cache
    seconds: float = field(default=0.0, compare=False)


def cache_root() -> Path:
    env = os.environ.get("STANDBY_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/standby/guest")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "standby", "guest")


def _apt(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


def _lists_stamp() -> str:
    """Changes whenever apt's package lists do (apt-cache takes about 1 s a call here)."""
    lists = Path("/var/lib/apt/lists")
    try:
        entries = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in lists.iterdir()
                         if p.name.endswith("_Packages") or p.name.endswith("Release"))
    except OSError:
        return ""
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16] if entries else ""


def resolve_packages(memo: Path | None = None) -> dict[str, str]:
    """{package: version} for the kernel linux-image-amd64 depends on and busybox-static;
    remembered in `memo` while apt's lists stay the same."""
    stamp = _lists_stamp()
    if memo is not None and stamp:
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == stamp:
                return dict(saved["packages"])
        except (OSError, ValueError, KeyError):
            pass

    def resolve() -> dict[str, str] | None:
        try:
            deps = _apt("apt-cache", "depends", "linux-image-amd64")
        except subprocess.CalledProcessError:
            return None
        m = re.search(r"Depends:\s*(linux-image-\S+)", deps)
        if not m:
            return None
        pol = _apt("apt-cache", "policy", m.group(1), "busybox-static")
        out = {}
        for pkg in (m.group(1), "busybox-static"):
            c = re.search(rf"^{re.escape(pkg)}:\n(?:\s.*\n)*?\s*Candidate:\s*(\S+)", pol, re.M)
            if not c or c.group(1) == "(none)":
                return None
            out[pkg] = c.group(1)
        return out

    got = resolve()
    if got is None:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], check=True, capture_output=True)
        got = resolve()
        stamp = _lists_stamp()
    if got is None:
        raise RuntimeError("cannot resolve the kernel behind linux-image-amd64 or busybox-static with apt-cache")
    if memo is not None and stamp:
        memo.write_text(json.dumps({"stamp": stamp, "packages": got}) + "\n")
    return got


def _key(pkgs: dict[str, str]) -> str:
    kernel = next(p for p in pkgs if p.startswith("linux-image-"))
    digest = hashlib.sha256(f"{BUILD_FORMAT}\n{init_script()}\n{sorted(pkgs.items())}".encode()).hexdigest()[:12]
    clean = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{kernel}_{pkgs[kernel]}")
    return f"{clean}-{digest}"


def _extract(deb: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Members of a .deb's data archive whose names `want` accepts (dpkg-deb --fsys-tarfile)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            name = m.name.lstrip("./")
            if m.isfile() and want(name):
                data = tar.extractfile(m)
                assert data is not None
                out[name] = data.read()
    proc.stdout.close()
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    return out


class _Cpio:
    """A newc cpio archive (what the kernel unpacks as initramfs), written in memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self.buf.write(name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _initramfs(busybox: bytes, modules: dict[str, bytes]) -> bytes:
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    for name, data in modules.items():
        c.file(f"lib/modules/{name}.ko", data)
    c.file("init", init_script().encode(), 0o755)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


def build(cache: Path | None = None, force: bool = False, log: Callable[[str], None] | None = None) -> GuestImage:
    """The kernel and initramfs, built once per kernel package version and cached."""
    t0 = time.monotonic()
    root = cache or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pkgs = resolve_packages(root / ".resolved.json")
        except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError):
            cached = sorted((p for p in root.iterdir() if (p / "manifest.json").exists()),
                            key=lambda p: p.stat().st_mtime)
            if cached and not force:  # offline: the newest build we have
                return _load(cached[-1], t0)
            raise
        key = _key(pkgs)
        out = root / key
        if (out / "manifest.json").exists() and not force:
            return _load(out, t0)
        if log:
            log(f"building the test guest from {', '.join(f'{p}={v}' for p, v in pkgs.items())}")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            os.chmod(tmp, 0o755)
            subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                            *(f"{p}={v}" for p, v in pkgs.items())], cwd=tmp, check=True, capture_output=True)
            debs = {p: next(Path(tmp).glob(f"{p}_*.deb")) for p in pkgs}
            kpkg = next(p for p in pkgs if p.startswith("linux-image-"))

            def want_kernel(name: str) -> bool:
                if name.startswith("boot/vmlinuz-"):
                    return True
                base = name.rsplit("/", 1)[-1]
                return base.endswith(".ko") and base[:-3] in (*MODULES, *ACPI_MODULES) and any(
                    f"/{d}/" in name for d in ("kernel/drivers/virtio", *_MODULE_DIRS.values()))

            kfiles = _extract(debs[kpkg], want_kernel)
            bfiles = _extract(debs["busybox-static"], lambda n: n == "bin/busybox")
            vmlinuz = next(n for n in kfiles if n.startswith("boot/vmlinuz-"))
            kver = vmlinuz.removeprefix("boot/vmlinuz-")
            modules: dict[str, bytes] = {}
            for name in (*MODULES, *ACPI_MODULES):
                sub = _MODULE_DIRS.get(name, "kernel/drivers/virtio")
                path = f"lib/modules/{kver}/{sub}/{name}.ko"
                if path in kfiles or name in MODULES:  # the ACPI ones are optional (maybe built in)
                    modules[name] = kfiles[path]
            stage = Path(tmp, "out")
            stage.mkdir()
            if _write_pvh_vmlinux(kfiles[vmlinuz], stage / "vmlinux"):
                boot_kernel = "vmlinux"
            else:
                boot_kernel = "vmlinuz"
                (stage / "vmlinuz").write_bytes(kfiles[vmlinuz])
            (stage / "initrd.gz").write_bytes(_initramfs(bfiles["bin/busybox"], modules))
            (stage / "manifest.json").write_text(json.dumps(
                {"packages": pkgs, "kernel_version": kver, "key": key, "modules": list(modules),
                 "boot_kernel": boot_kernel, "built_at": time.time()}, indent=1) + "\n")
            if out.exists():
                shutil.rmtree(out)
            stage.rename(out)
        for old in root.iterdir():  # keep only the current build (a few MB)
            if old.is_dir() and old != out and not old.name.startswith(".build-"):
                shutil.rmtree(old, ignore_errors=True)
        img = _load(out, t0)
        return GuestImage(img.kernel, img.initrd, img.kernel_version, img.key, True, img.seconds)


def _write_pvh_vmlinux(bzimage: bytes, dest: Path) -> bool:
    """Unpack the ELF vmlinux from an xz bzImage, if it has a PVH entry (Xen note 18).

    QEMU boots such an ELF directly (`-kernel`, PVH), skipping the real-mode setup and
    the in-guest xz decompression: about 3 s less per boot under software emulation.
    Written sparse: half of its 66 MB are zero pages."""
    import lzma
    import struct

    at = bzimage.find(b"\xfd7zXZ\x00")
    if at < 0:
        return False
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
    except lzma.LZMAError:
        return False
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    pvh = False
    for i in range(phnum):
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz]
            pvh = pvh or (name == b"Xen\0" and ntype == 18)  # XEN_ELFNOTE_PHYS32_ENTRY
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    if not pvh:
        return False
    zero = bytes(1 << 16)
    with open(dest, "wb") as f:
        for i in range(0, len(elf), len(zero)):
            chunk = elf[i:i + len(zero)]
            if chunk == zero[:len(chunk)]:
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)
        f.truncate(len(elf))
    return True


def _load(out: Path, t0: float) -> GuestImage:
    man = json.loads((out / "manifest.json").read_text())
    return GuestImage(out / man.get("boot_kernel", "vmlinuz"), out / "initrd.gz", man["kernel_version"], man["key"], False,
                      time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# Booting it under libvirt

def kvm_wanted(image: GuestImage | None = None) -> bool:
    """Whether to run the guest under KVM. On these machines /dev/kvm exists but a Linux
    kernel hangs under it (PLATFORM.md), so software emulation is the default.
    STANDBY_GUEST_KVM=1 forces KVM (when /dev/kvm exists); STANDBY_GUEST_KVM=auto boots
    the guest once under KVM (`probe_kvm`, remembered until the host reboots) and uses
    KVM only if it reached /init."""
    want = os.environ.get("STANDBY_GUEST_KVM", "0")
    if want == "0" or not os.path.exists("/dev/kvm"):
        return False
    if want == "auto":
        return probe_kvm(image or build())
    return True


def probe_kvm(image: GuestImage, timeout: float = 10.0) -> bool:
    """Does the guest reach /init under KVM here? (QEMU directly, no libvirt; a kernel
    boots in about a second under working KVM.) Remembered per host boot."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    memo = cache_root() / ".kvm-probe.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["boot_id"] == boot_id and saved["key"] == image.key:
            return bool(saved["boots"])
    except (OSError, ValueError, KeyError):
        pass
    boots = False
    with tempfile.TemporaryDirectory(prefix="standby-kvm-probe-") as tmp:
        disk, log = Path(tmp, "d.raw"), Path(tmp, "console.log")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
             "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
             "-append", cmdline("verify"), "-serial", f"file:{log}",
             "-drive", f"file={disk},format=raw,if=virtio"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if Console(log).verdict() is not None:
                    boots = True
                    break
                time.sleep(0.1)
            boots = boots or Console(log).verdict() is not None
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"boot_id": boot_id, "key": image.key, "boots": boots}) + "\n")
    except OSError:
        pass
    return boots


def cmdline(mode: str, rate: int = 10, count: int = 0, area_mib: int = 0) -> str:
    """The guest's kernel command line (the module doc): write `rate` records/s, verify, or
    stream `rate` MiB/s."""
    if mode not in ("write", "verify", "stream"):
        raise ValueError(f"mode must be write, verify or stream, not {mode!r}")
    parts = ["console=ttyS0", "panic=-1", "quiet", f"mode={mode}"]
    if mode == "write":
        parts += [f"rate={int(rate)}", f"count={int(count)}"]
    elif mode == "stream":
        parts.append(f"rate={int(rate)}")
    if area_mib:
        parts.append(f"area={int(area_mib)}")
    return " ".join(parts)


def domain_xml(name: str, disk: str | os.PathLike[str], console_log: str | os.PathLike[str], image: GuestImage,
               cmd: str, memory_mib: int = 128, kvm: bool | None = None, disk_format: str | None = None,
               extra_devices: str = "") -> str:
    """A domain for the test guest: direct kernel boot, one virtio disk (vda), serial
    console to a file, no video, no balloon, no USB; stops (never reboots) on power-off
    or panic."""
    kvm = kvm_wanted(image) if kvm is None else kvm
    fmt = disk_format or image_format(disk)
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmd)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(fmt)}/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target type='serial' port='0'/>
    </console>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>{extra_devices}
  </devices>
</domain>
"""


def create_disk(path: str | os.PathLike[str], size_mib: int = 32, fmt: str = "qcow2") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{int(size_mib)}M"], check=True,
                   capture_output=True)
    return Path(path)


_WROTE = re.compile(r"standby-guest: wrote seq=(\d+)")
_STREAMED = re.compile(r"standby-guest: streamed mib=(\d+)")


class Console:
    """The guest's serial console log, read as it grows."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def acked(self) -> int:
        """The highest sequence number the guest reported on disk (-1 if none)."""
        return max((int(m) for m in _WROTE.findall(self.text())), default=-1)

    def streamed(self) -> int:
        """MiB a stream-mode guest reported written (a multiple of 8; 0 if none)."""
        return max((int(m) for m in _STREAMED.findall(self.text())), default=0)

    def verdict(self) -> Verdict | None:
        return Verdict.parse(self.text())

    def wait_for(self, pred: Callable[[Console], Any], timeout: float, alive: Callable[[], bool] | None = None,
                 interval: float = 0.2) -> Any:
        """Poll until pred(self) is truthy (its value is returned); TimeoutError with the
        console's tail otherwise, or early when `alive()` says the guest stopped."""
        deadline = time.monotonic() + timeout
        while True:
            got = pred(self)
            if got:
                return got
            if time.monotonic() > deadline or (alive is not None and not alive()):
                got = pred(self)
                if got:
                    return got
                state = "timed out" if time.monotonic() > deadline else "guest stopped"
                raise TimeoutError(f"{state} waiting on {self.path}; console tail:\n{self.text()[-2000:]}")
            time.sleep(interval)


class GuestVM:
    """One run of the test guest as a transient libvirt domain (gone once it stops).

        with GuestVM(conn, "w1", disk, tmp / "w1.log", image, cmdline("write", rate=20)) as vm:
            vm.console.wait_for(lambda c: c.acked() >= 10, 60)
            vm.destroy()                                 # a crash, as far as the disk knows
    """

    def __init__(self, conn: Any, name: str, disk: str | os.PathLike[str], console_log: str | os.PathLike[str],
                 image: GuestImage, cmd: str, **xml_args: Any) -> None:
        self.conn = conn
        self.name = name
        self.console = Console(console_log)
        self.xml = domain_xml(name, disk, console_log, image, cmd, **xml_args)
        self.dom: Any = None
        self.id = -1
        self.started_at = 0.0

    def start(self) -> GuestVM:
        self.console.path.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        self.dom = self.conn.createXML(self.xml, 0)
        self.id = self.dom.ID()
        return self

    def running(self) -> bool:
        # by id, not dom.isActive(): a transient domain that stopped is gone, and asking
        # about it makes libvirt's default error handler print to stderr
        return self.dom is not None and self.id in self.conn.listDomainsID()

    def destroy(self) -> None:
        """Pull the plug (SIGKILL to QEMU, no flush by the guest)."""
        import libvirt

        if not self.running():
            return
        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            pass  # stopped meanwhile

    def wait_stopped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout} s")
            time.sleep(0.2)

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def boot_verify(conn: Any, name: str, disk: str | os.PathLike[str], console_log: str | os.PathLike[str],
                image: GuestImage, timeout: float = 120.0, area_mib: int = 0) -> Verdict:
    """Boot the guest in verify mode on `disk` and return what it reports."""
    with GuestVM(conn, name, disk, console_log, image, cmdline("verify", area_mib=area_mib)) as vm:
        v: Verdict = vm.console.wait_for(lambda c: c.verdict(), timeout, alive=vm.running)
        vm.wait_stopped(30)
        return v


# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m standby.testing.guest", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) the kernel and initramfs")
    b.add_argument("--force", action="store_true")
    b.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="verify a raw or qcow2 disk image on the host")
    v.add_argument("disk")
    v.add_argument("--area-mib", type=int, default=0)
    x = sub.add_parser("xml", help="print a libvirt domain XML for the guest")
    x.add_argument("name")
    x.add_argument("disk")
    x.add_argument("console_log")
    x.add_argument("--mode", choices=["write", "verify"], default="write")
    x.add_argument("--rate", type=int, default=10)
    x.add_argument("--count", type=int, default=0)
    x.add_argument("--memory-mib", type=int, default=128)
    sub.add_parser("init", help="print the guest's /init script")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        img = build(force=a.force, log=lambda s: print(s, file=sys.stderr))
        if a.json:
            print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd), "kernel_version": img.kernel_version,
                              "key": img.key, "built": img.built, "seconds": round(img.seconds, 2)}))
        else:
            print(f"kernel {img.kernel}\ninitrd {img.initrd}\n"
                  f"{'built' if img.built else 'cached'} in {img.seconds:.1f} s ({img.kernel_version})")
        return 0
    if a.cmd == "verify":
        verdict = verify_image(a.disk, a.area_mib)
        print(verdict.line())
        return 0 if verdict.ok else 1
    if a.cmd == "xml":
        print(domain_xml(a.name, a.disk, a.console_log, build(), cmdline(a.mode, a.rate, a.count),
                         memory_mib=a.memory_mib), end="")
        return 0
    print(init_script(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
