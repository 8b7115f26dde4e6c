"""Two sites on one machine: a pair of Linux network namespaces joined by a veth pair,
optionally with a bandwidth limit (tc tbf) on each end. Needs root and iproute2.

    with TwoSites(rate_mbit=100) as sites:
        sites.popen("b", ["standby", "agent", "receive", "--listen", f"{sites.addr_b}:7443", ...])
        sites.run("a", ["standby", "replicate", ..., "--to", f"{sites.addr_b}:7443"])
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

_counter = itertools.count()


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def drop_stale_links(subnet: str) -> list[str]:
    """Delete this namespace's links holding an address in `subnet` (the test range): they
    are left by a run that was killed before it cleaned up, and while one exists the route
    to the subnet may lead into that run's dead namespace instead of the new one."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "to", subnet], capture_output=True, text=True).stdout
    dropped = []
    for line in out.splitlines():
        dev = line.split()[1].split("@")[0]
        if subprocess.run(["ip", "link", "delete", dev], capture_output=True).returncode == 0:
            dropped.append(dev)
    return dropped


class TwoSites:
    def __init__(self, rate_mbit: float | None = None, prefix: str = "sb") -> None:
        n = f"{os.getpid() % 100000}{next(_counter)}"
        self.ns = {"a": f"{prefix}a{n}", "b": f"{prefix}b{n}"}
        self.dev = {"a": f"{prefix}va{n}"[:15], "b": f"{prefix}vb{n}"[:15]}
        self.addr_a, self.addr_b = "10.213.0.1", "10.213.0.2"
        self.rate_mbit = rate_mbit
        self._admin: dict[str, tuple[str, str]] = {}  # site -> (host end, namespace end) of its admin link

    def addr(self, site: str) -> str:
        return self.addr_a if site == "a" else self.addr_b

    def __enter__(self) -> TwoSites:
        try:
            for site in ("a", "b"):
                _ip("netns", "add", self.ns[site])
                _ip("-n", self.ns[site], "link", "set", "lo", "up")
            _ip("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
            for site in ("a", "b"):
                _ip("link", "set", self.dev[site], "netns", self.ns[site])
                _ip("-n", self.ns[site], "addr", "add", f"{self.addr(site)}/24", "dev", self.dev[site])
                _ip("-n", self.ns[site], "link", "set", self.dev[site], "up")
                if self.rate_mbit:
                    self.limit(site, self.rate_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def limit(self, site: str, rate_mbit: float) -> None:
        """Cap what leaves `site` (tbf: token bucket; burst sized for the rate)."""
        burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 250))  # about 4 ms worth
        subprocess.run(["ip", "netns", "exec", self.ns[site], "tc", "qdisc", "replace", "dev", self.dev[site],
                        "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"],
                       check=True, capture_output=True)

    def cut(self) -> None:
        """Cut the link (both ends down): open connections stall, new ones fail."""
        for site in ("a", "b"):
            _ip("-n", self.ns[site], "link", "set", self.dev[site], "down")

    def mend(self) -> None:
        for site in ("a", "b"):
            _ip("-n", self.ns[site], "link", "set", self.dev[site], "up")

    def admin_link(self, site: str) -> str:
        """A link from this machine's own namespace into `site` (an operator's way in, apart
        from the link between the sites); returns the site's address on it."""
        k = 1 if site == "a" else 2
        host_dev, ns_dev = f"{self.dev[site]}h"[:15], f"{self.dev[site]}n"[:15]
        drop_stale_links(f"10.213.{k}.0/24")
        _ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        _ip("link", "set", ns_dev, "netns", self.ns[site])
        _ip("addr", "add", f"10.213.{k}.1/24", "dev", host_dev)
        _ip("link", "set", host_dev, "up")
        _ip("-n", self.ns[site], "addr", "add", f"10.213.{k}.2/24", "dev", ns_dev)
        _ip("-n", self.ns[site], "link", "set", ns_dev, "up")
        self._admin[site] = (host_dev, ns_dev)
        return f"10.213.{k}.2"

    def isolate(self, site: str) -> None:
        """The site drops off the network: the link between the sites and its admin link go down."""
        self.cut()
        if site in self._admin:
            _ip("-n", self.ns[site], "link", "set", self._admin[site][1], "down")

    def reconnect(self, site: str) -> None:
        self.mend()
        if site in self._admin:
            _ip("-n", self.ns[site], "link", "set", self._admin[site][1], "up")

    def kill_all(self, site: str) -> list[int]:
        """SIGKILL every process of the site's namespace (its hosts lost power)."""
        killed = []
        pids = subprocess.run(["ip", "netns", "pids", self.ns[site]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
                killed.append(int(pid))
            except (ProcessLookupError, ValueError):
                pass
        return killed

    def command(self, site: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[site], *argv]

    def run(self, site: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(site, argv), **kw)

    def popen(self, site: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(site, argv), **kw)

    def close(self) -> None:
        for host_dev, _ns_dev in self._admin.values():
            subprocess.run(["ip", "link", "delete", host_dev], capture_output=True)
        for site in ("a", "b"):
            pids = subprocess.run(["ip", "netns", "pids", self.ns[site]], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "delete", self.ns[site]], capture_output=True)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
