"""Run the libvirt daemon on a machine without systemd (tests, demo, CI).

Nothing here is socket-activated: `ensure_running()` prepares what libvirtd needs and
starts `virtlogd -d` and `libvirtd -d` itself, idempotently, then waits until
`virsh -c qemu:///system version` answers; `stop()` ends the daemons it finds by their
pidfiles. Needs root and the Debian packages listed in scripts/bootstrap.sh.

The QEMU driver is configured (a managed block in /etc/libvirt/qemu.conf) to run guests
as root with no security driver and no cgroup controllers, so it needs neither AppArmor,
SELinux, systemd nor a cgroup layout.

    python -m standby.testing.libvirtd start|stop|status
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_PID = Path("/run/libvirtd.pid")
VIRTLOGD_PID = Path("/run/virtlogd.pid")
LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_USER = "libvirt-qemu"

_BEGIN = "# --- begin: managed by standby.testing.libvirtd ---"
_END = "# --- end: managed by standby.testing.libvirtd ---"
_SETTINGS = {
    "user": '"root"',
    "group": '"root"',
    "security_driver": '"none"',
    "cgroup_controllers": "[ ]",
    "stdio_handler": '"logd"',
}


class LibvirtdError(RuntimeError):
    pass


def available() -> str | None:
    """None when libvirtd can be run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "libvirtd needs root"
    for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (run scripts/bootstrap.sh)"
    return None


def _pid_alive(pidfile: Path, name: str) -> int | None:
    """The pid in `pidfile` if that process is alive and is `name`, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name else None


def _virsh_version(timeout: float = 30.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def answering() -> bool:
    r = _virsh_version()
    return r is not None and r.returncode == 0


def configure() -> None:
    """The no-systemd prerequisites (PLATFORM.md), idempotent."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)  # libvirtd exits without it
    try:
        pwd.getpwnam(QEMU_USER)  # the QEMU driver looks it up before reading qemu.conf
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", QEMU_USER], check=True, capture_output=True)
    QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
    old = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    kept: list[str] = []
    inside = False
    for line in old.splitlines():
        if line.strip() == _BEGIN:
            inside = True
        elif line.strip() == _END:
            inside = False
        elif not inside and line.split("=", 1)[0].strip() not in _SETTINGS:
            kept.append(line)
    block = [_BEGIN, *(f"{k} = {v}" for k, v in _SETTINGS.items()), _END]
    new = "\n".join([*kept, *block]) + "\n"
    if new != old:
        tmp = QEMU_CONF.with_suffix(".standby-tmp")
        tmp.write_text(new)
        tmp.replace(QEMU_CONF)


@dataclass
class Status:
    libvirtd_pid: int | None
    virtlogd_pid: int | None
    answering: bool

    def __str__(self) -> str:
        return (f"libvirtd pid={self.libvirtd_pid or '-'} virtlogd pid={self.virtlogd_pid or '-'} "
                f"{'answering' if self.answering else 'not answering'} on {URI}")


def status() -> Status:
    lp = _pid_alive(LIBVIRTD_PID, "libvirtd")
    return Status(lp, _pid_alive(VIRTLOGD_PID, "virtlogd"), lp is not None and answering())


def ensure_running(timeout: float = 90.0) -> bool:
    """Start virtlogd and libvirtd unless they already run; wait until libvirt answers.

    Returns True when this call started libvirtd (so the caller may stop it later)."""
    reason = available()
    if reason:
        raise LibvirtdError(reason)
    configure()
    if _pid_alive(VIRTLOGD_PID, "virtlogd") is None:
        subprocess.run(["virtlogd", "-d"], check=True, capture_output=True)
    started = False
    if _pid_alive(LIBVIRTD_PID, "libvirtd") is None:
        r = subprocess.run(["libvirtd", "-d"], capture_output=True, text=True)
        if r.returncode != 0:
            raise LibvirtdError(f"libvirtd -d failed ({r.returncode}): {r.stderr.strip()}")
        started = True
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = _virsh_version(timeout=max(1.0, deadline - time.monotonic()))
        if r is not None and r.returncode == 0:
            return started
        last = (r.stderr.strip() if r is not None else "virsh timed out")
        if _pid_alive(LIBVIRTD_PID, "libvirtd") is None and time.monotonic() > deadline - timeout + 5:
            raise LibvirtdError(f"libvirtd exited after start: {last}")
        time.sleep(0.3)
    raise LibvirtdError(f"libvirt did not answer on {URI} within {timeout:.0f} s: {last}")


def _stop_pidfile(pidfile: Path, name: str, timeout: float) -> bool:
    pid = _pid_alive(pidfile, name)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pidfile, name) == pid:
        time.sleep(0.1)
    if _pid_alive(pidfile, name) == pid:
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    pidfile.unlink(missing_ok=True)
    return True


def stop(timeout: float = 20.0, virtlogd: bool = True) -> None:
    """Stop libvirtd (then virtlogd) by their pidfiles. Running guests keep running
    (QEMU processes are not children of libvirtd); destroy them first if they must go."""
    _stop_pidfile(LIBVIRTD_PID, "libvirtd", timeout)
    if virtlogd:
        _stop_pidfile(VIRTLOGD_PID, "virtlogd", timeout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd = args[0] if args else "status"
    if cmd == "start":
        t0 = time.monotonic()
        started = ensure_running()
        print(f"{status()} ({'started' if started else 'already running'}, {time.monotonic() - t0:.1f} s)")
    elif cmd == "stop":
        stop()
        print(status())
    elif cmd == "status":
        st = status()
        print(st)
        return 0 if st.answering else 1
    else:
        print("usage: python -m standby.testing.libvirtd start|stop|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
