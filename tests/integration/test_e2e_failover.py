"""End to end (issue 4, first "Done when" bullet): the test guest writes records on the
"primary" (libvirtd in the root network namespace); Standby replicates it cycle after
cycle with `replicate_vm` (the LibvirtDriver's checkpoints and pull-mode NBD backups,
the data plane's sender) from network namespace "a" to `standby agent receive` in namespace "b",
whose replica store is the "secondary" directory, over mutual TLS with certificates made
by `standby ca`. The source VM is then destroyed (unplanned); the latest recovery point
is materialized on the secondary (`standby points materialize`, run in "b") as a qcow2
overlay, a VM is defined from it with the source's XML as template (NICs attached to
nothing) and boots in verify mode.

What is asserted, per the issue:

- the guest on the secondary reports a consistent prefix: torn=0, gaps=0,
  out_of_order=0, and the host-side verifier says the same of the same overlay;
- its last record is >= the last record the console acknowledged before the latest
  committed point's checkpoint was taken (nothing acknowledged before a committed
  checkpoint is lost), and <= the last one acknowledged once that checkpoint existed,
  plus LAG (the point is the disk as of the checkpoint, not as of the send);
- it is within one cycle of the last record acknowledged before the kill. "One cycle"
  is measured, not assumed: the largest number of records acknowledged between two
  consecutive checkpoints of this run, plus LAG. The kill comes when the next cycle
  would have started (cycles start every PERIOD seconds): the worst moment for an
  interval-driven RPO.

LAG is the console lag: a record is on disk (O_DIRECT + fsync) a moment before its
`standby-guest: wrote seq=N` line reaches the console log; LAG records is half a second
of writing at RATE.

The "acknowledged when the checkpoint was taken" readings are exact brackets: the sender
process wraps `standby.drivers.libvirt.backup.start_online` (which creates the
checkpoint with the backup job, virDomainBackupBegin) and reads the console just before
and just after it.

The sender side is this file run as a script (`worker`) under `ip netns exec`: it talks
to libvirtd and to the NBD exports through their unix sockets (which work across network
namespaces) and to the agent over the veth. 75-90 s under software emulation (2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_change_tracking import Vm  # noqa: E402

from standby.drivers.base import NicInfo, VmSpec, VmState  # noqa: E402
from standby.contract import disk_id_for  # noqa: E402
from standby.testing import guest, netns  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RATE = 10  # records per second the guest writes
PERIOD = 7.0  # seconds between the starts of two cycles
CYCLES = 4  # the seed, then three incremental cycles
LAG = RATE // 2  # records: the console lag tolerance (half a second of writing)
DISK_MIB = 32
AGENT_PORT = 7443
SRC_MAC = "52:54:00:e2:e0:01"
NIC = f"""
    <interface type='ethernet'><mac address='{SRC_MAC}'/><model type='virtio'/></interface>"""

PY = sys.executable
STANDBY = str(Path(sys.executable).parent / "standby")


# ---------------------------------------------------------------------------------------
# The sender, run in namespace "a": one `replicate_vm` per "cycle" line on stdin, one JSON
# line per cycle on stdout.


def _worker(argv: list[str]) -> int:
    from standby.drivers.libvirt import backup as bk
    from standby.drivers.libvirt.driver import LibvirtDriver
    from standby.agent.replicate import CycleFailed, replicate_vm
    from standby.replication import tls

    ap = argparse.ArgumentParser()
    for opt in ("uri", "vm", "console", "tracking", "state", "endpoint", "cert", "key", "ca"):
        ap.add_argument(f"--{opt}", required=True)
    a = ap.parse_args(argv)
    console = guest.Console(a.console)
    marks: dict[str, Any] = {}
    start_online = bk.start_online

    def bracketed(*args: Any, **kw: Any) -> Any:
        # virDomainBackupBegin creates the cycle's checkpoint: read the console around it
        marks["acked_before_checkpoint"] = console.acked()
        marks["t_checkpoint"] = time.time()
        try:
            return start_online(*args, **kw)
        finally:
            marks["acked_after_checkpoint"] = console.acked()

    bk.start_online = bracketed
    ctx = tls.client_context(tls.Identity(Path(a.cert), Path(a.key), Path(a.ca)))
    driver = LibvirtDriver(a.uri, a.tracking)
    print(json.dumps({"ready": True, "netns": os.readlink("/proc/self/ns/net")}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() != "cycle":
                break
            marks.clear()
            out: dict[str, Any] = {"t_start": time.time(), "acked_start": console.acked()}
            try:
                out["result"] = replicate_vm(driver, a.vm, a.endpoint, ctx, Path(a.state)).as_dict()
            except CycleFailed as exc:
                out["error"] = f"{exc} (cause: {exc.cause!r})"
                out["result"] = exc.result.as_dict()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                out["error"] = f"{type(exc).__name__}: {exc}"
            out.update(marks, acked_done=console.acked(), t_done=time.time())
            print(json.dumps(out), flush=True)
    finally:
        driver.close()
    return 0


# ---------------------------------------------------------------------------------------
# Helpers of the test


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, COLUMNS="200", NO_COLOR="1"))
    assert res.returncode == 0, f"{argv}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def _pki(root: Path, sites: netns.TwoSites) -> dict[str, Path]:
    """A CA, the agent's certificate (for site b's address) and the sender's (site a's),
    made with `standby ca`."""
    ca = root / "ca"
    _run([STANDBY, "ca", "init", str(ca)])
    _run([STANDBY, "ca", "issue", str(ca), "agent", "--san", sites.addr_b])
    _run([STANDBY, "ca", "issue", str(ca), "sender", "--san", sites.addr_a])
    return {"ca": ca / "ca.crt", "agent.crt": ca / "agent.crt", "agent.key": ca / "agent.key",
            "sender.crt": ca / "sender.crt", "sender.key": ca / "sender.key"}


class Lines:
    """A child's stdout, line by line, with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def json(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from the sender within {timeout:.0f} s ({what})") from None
        assert line is not None, f"the sender exited ({self.proc.poll()}) ({what})"
        return json.loads(line)  # type: ignore[no-any-return]


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _with_cmdline(xml: str, cmd: str) -> str:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    el = root.find("./os/cmdline")
    assert el is not None
    el.text = cmd
    return ET.tostring(root, encoding="unicode")


def _wait_for_text(path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, f"exited ({proc.returncode}): {path.read_text(errors='replace')[-2000:]}"
        assert time.monotonic() < deadline, f"{needle!r} not in {path} after {timeout} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------


def test_failover_from_the_latest_point_after_the_primary_vm_is_killed(
        libvirtd: str, libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path,
        tmp_path: Path) -> None:
    import libvirt

    from standby.drivers.libvirt import domains

    reason = netns.available()
    if reason:
        pytest.skip(reason)
    if not Path(STANDBY).exists():
        pytest.skip(f"{STANDBY} is not installed (pip install -e . in the venv)")
    t_test = time.monotonic()
    work = tmp_path / "e2e"
    primary, secondary = work / "primary", work / "secondary"
    store = secondary / "store"
    for d in (primary, secondary):
        d.mkdir(parents=True)

    procs: list[subprocess.Popen[Any]] = []
    logs: list[Any] = []
    vm: Vm | None = None
    failover: str | None = None
    lines: Lines | None = None
    sites = netns.TwoSites()
    sites.__enter__()
    try:
        # The protected VM on the primary: the guest writing RATE records a second (it
        # boots while the certificates, the agent and the sender are set up).
        vm = Vm(libvirt_conn, vm_name("e2e"), vm_dir, guest_image, size_mib=DISK_MIB, extra_devices=NIC)
        vm.set_cmdline(guest.cmdline("write", rate=RATE))
        template = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # what protection records of the VM
        vm.start()

        pki = _pki(work / "pki", sites)
        agent_log = secondary / "agent.log"
        logs.append(open(agent_log, "w"))  # noqa: SIM115 - closed in the finally
        agent = sites.popen("b", [STANDBY, "agent", "receive", "--listen", f"{sites.addr_b}:{AGENT_PORT}", "--store",
                                  str(store), "--cert", str(pki["agent.crt"]), "--key", str(pki["agent.key"]),
                                  "--ca", str(pki["ca"])], stdout=logs[-1], stderr=subprocess.STDOUT)
        procs.append(agent)
        _wait_for_text(agent_log, "agent listening", agent, 30)

        sender_err = primary / "sender.err"
        logs.append(open(sender_err, "w"))  # noqa: SIM115 - closed in the finally
        sender = sites.popen("a", [PY, __file__, "worker", "--uri", libvirtd, "--vm", vm.name, "--console",
                                   str(vm.log), "--tracking", str(primary / "tracking"), "--state",
                                   str(primary / "replication"), "--endpoint", f"{sites.addr_b}:{AGENT_PORT}",
                                   "--cert", str(pki["sender.crt"]), "--key", str(pki["sender.key"]),
                                   "--ca", str(pki["ca"])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1], text=True)
        procs.append(sender)
        lines = Lines(sender)
        hello = lines.json(60, "start")
        ns_a = os.stat(Path("/run/netns", sites.ns["a"])).st_ino
        assert hello["netns"] == f"net:[{ns_a}]", hello  # the sender runs in site a's namespace
        vm.wait_records(RATE)  # booted and writing for about a second
        t_writing = time.monotonic()

        # Replicate: a cycle every PERIOD seconds (at once when the previous one overran).
        cycles: list[dict[str, Any]] = []
        due = time.monotonic()
        for i in range(CYCLES):
            time.sleep(max(0.0, due - time.monotonic()))
            started = time.monotonic()
            assert sender.stdin is not None
            sender.stdin.write("cycle\n")
            sender.stdin.flush()
            out = lines.json(90, f"cycle {i}")
            assert "error" not in out, f"cycle {i}: {out}\n{sender_err.read_text()[-3000:]}"
            res = out["result"]
            assert res["completed"] and [d["target"] for d in res["disks"]] == ["vda"], res
            assert res["disks"][0]["kind"] == ("seed" if i == 0 else "extents"), res
            cycles.append(out)
            due = max(started + PERIOD, time.monotonic())
        assert vm.dom.isActive(), "the source VM stopped during replication"

        # The unplanned loss of the primary VM, when the next cycle would have started.
        time.sleep(max(0.0, due - time.monotonic()))
        acked_seen = vm.console.acked()
        vm.dom.destroy()  # virDomainDestroy: QEMU is killed, the guest flushes nothing
        time.sleep(0.5)
        acked_at_kill = vm.console.acked()  # also the acks that reached the log as it died
        assert acked_at_kill >= acked_seen
        t_killed = time.monotonic()
        assert sender.stdin is not None
        sender.stdin.write("quit\n")
        sender.stdin.flush()
        sender.wait(30)
        assert sender.returncode == 0, sender_err.read_text()[-3000:]

        # On the secondary: the latest point as an overlay, a VM from it in verify mode.
        last = cycles[-1]
        last_point = last["result"]["disks"][0]["result"]["point_id"]
        disk_id = disk_id_for(vm.name, "vda")
        fo_dir = secondary / "failover"
        fo_dir.mkdir()
        overlay = fo_dir / "vda.qcow2"
        got = json.loads(_run(sites.command("b", [STANDBY, "points", "materialize", str(overlay), "--store",
                                                  str(store), "--disk-id", disk_id, "--json"])).stdout)
        assert got["point"] == last_point, (got, last_point)  # the latest point is the last committed cycle's
        failover = vm_name("e2e-fo")
        spec = VmSpec(name=failover, disks={"vda": overlay}, networks=[None],
                      template_xml=_with_cmdline(template, guest.cmdline("verify")))
        info = domains.define_vm(libvirt_conn, spec)
        assert [(d.target, d.path) for d in info.disks] == [("vda", str(overlay))]
        assert info.nics == [NicInfo(SRC_MAC, None)]  # the source's NIC, attached to nothing
        domains.start_vm(libvirt_conn, failover)
        fo_console = guest.Console(domains.console_log_path(spec))
        verdict: guest.Verdict = fo_console.wait_for(
            lambda c: c.verdict(), 120,
            alive=lambda: domains.vm_info(libvirt_conn, failover).state is VmState.RUNNING)
        deadline = time.monotonic() + 30
        while domains.vm_info(libvirt_conn, failover).state is not VmState.SHUT_OFF:  # it powers off
            assert time.monotonic() < deadline, "the failover VM did not power off after verifying"
            time.sleep(0.2)
        host_verdict = guest.verify_image(overlay)

        # What the run shows.
        cp_acked = [c["acked_before_checkpoint"] for c in cycles]
        one_cycle = max(b - a for a, b in zip(cp_acked, cp_acked[1:]))
        summary = {
            "cycles": [{"kind": c["result"]["disks"][0]["kind"], "checkpoint": c["result"]["checkpoint"],
                        "acked_before_checkpoint": c["acked_before_checkpoint"],
                        "acked_after_checkpoint": c["acked_after_checkpoint"], "acked_committed": c["acked_done"],
                        "seconds": c["result"]["seconds"]} for c in cycles],
            "records_per_cycle": one_cycle, "acked_at_kill": acked_at_kill, "replica_last": verdict.last,
            "records_lost": acked_at_kill - verdict.last, "lag_tolerance": LAG,
            "guest_verdict": verdict.line(),
            "seconds": {"setup_and_boot": round(t_writing - t_test, 1), "replication": round(t_killed - t_writing, 1),
                        "failover_and_verify": round(time.monotonic() - t_killed, 1)}}
        print("\ne2e failover:", json.dumps(summary))

        assert (verdict.torn, verdict.gaps, verdict.out_of_order) == (0, 0, 0), summary
        assert host_verdict == verdict, (host_verdict, summary)
        assert verdict.last >= last["acked_before_checkpoint"], summary  # nothing acked before it is lost
        assert verdict.last <= last["acked_after_checkpoint"] + LAG, summary  # the disk as of the checkpoint
        assert acked_at_kill - verdict.last <= one_cycle + LAG, summary  # within one cycle of the kill

        # The point also checks against its recorded digest at the secondary; then unpin it.
        _run(sites.command("b", [STANDBY, "points", "verify", "--store", str(store), "--disk-id", disk_id]))
        _run(sites.command("b", [STANDBY, "points", "release", str(overlay), "--store", str(store),
                                 "--disk-id", disk_id]))
        _stop(agent)
        assert agent.returncode == 0, agent_log.read_text()[-3000:]
    finally:
        if failover is not None:
            try:
                domains.destroy_vm(libvirt_conn, failover)
                domains.undefine_vm(libvirt_conn, failover)
            except Exception:  # noqa: BLE001 - not defined (the test failed before)
                pass
        if vm is not None:
            vm.remove()
        for p in procs:
            _stop(p, signal.SIGKILL)
        if lines is not None:
            lines.thread.join(10)  # it ends at the sender's EOF
        for p in procs:
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
        sites.close()
        for f in logs:
            f.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: test_e2e_failover.py worker --uri ... (the test runs it)")
    raise SystemExit(_worker(sys.argv[2:]))
