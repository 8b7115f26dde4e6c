"""The test fixtures themselves: two namespaces as sites, tbf rate, WAN proxy latency."""

from __future__ import annotations

import subprocess
import sys

import pytest

from standby.testing import netns

pytestmark = pytest.mark.slow

PY = sys.executable


@pytest.fixture
def sites():
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    with netns.TwoSites() as s:
        yield s


def test_sites_reach_each_other_and_cut_link_stops_traffic(sites: netns.TwoSites) -> None:
    assert sites.run("a", ["ping", "-c", "1", "-W", "2", sites.addr_b]).returncode == 0
    sites.cut()
    assert sites.run("a", ["ping", "-c", "1", "-W", "1", sites.addr_b]).returncode != 0
    sites.mend()
    assert sites.run("a", ["ping", "-c", "1", "-W", "2", sites.addr_b]).returncode == 0


ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("up", flush=True)
c, _ = s.accept()
while (d := c.recv(65536)):
    c.sendall(d)
"""

SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("up", flush=True)
c, _ = s.accept(); n = 0
while (d := c.recv(1 << 20)):
    n += len(d)
c.sendall(str(n).encode())
"""


def _start(sites: netns.TwoSites, site: str, code: str, *args: str) -> subprocess.Popen:
    p = sites.popen(site, [PY, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    return p


def test_wan_proxy_adds_latency_each_way(sites: netns.TwoSites) -> None:
    echo = _start(sites, "b", ECHO, sites.addr_b, "9100")
    proxy = sites.popen("b", [PY, "-m", "standby.testing.wanproxy", "--listen", f"{sites.addr_b}:9101",
                              "--target", f"{sites.addr_b}:9100", "--delay-ms", "50"])
    try:
        rtt = _rtt(sites, f"{sites.addr_b}", 9101)
        assert rtt >= 0.1, f"round trip through a 50 ms each-way proxy took only {rtt * 1000:.0f} ms"
    finally:
        _stop(proxy, echo)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()


def _rtt(sites: netns.TwoSites, host: str, port: int) -> float:
    code = f"""
import socket, time
for _ in range(50):
    try:
        c = socket.create_connection(({host!r}, {port}), timeout=5); break
    except OSError: time.sleep(0.1)
c.sendall(b"x"); c.recv(1)
t = time.monotonic(); c.sendall(b"y"); c.recv(1); print(time.monotonic() - t)
"""
    out = sites.run("a", [PY, "-c", code], timeout=30)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_tbf_limits_bandwidth(sites: netns.TwoSites) -> None:
    sites.limit("a", 50)
    sink = _start(sites, "b", SINK, sites.addr_b, "9200")
    code = f"""
import socket, time
c = socket.create_connection(({sites.addr_b!r}, 9200))
buf = bytes(1 << 20); t = time.monotonic()
for _ in range(12): c.sendall(buf)
c.shutdown(socket.SHUT_WR); n = int(c.recv(64)); print(n * 8 / (time.monotonic() - t) / 1e6)
"""
    try:
        out = sites.run("a", [PY, "-c", code], timeout=60)
        assert out.returncode == 0, out.stderr
        mbit = float(out.stdout)
        # 12 MiB through a 50 Mbit/s bucket: well under the unshaped veth rate (many Gbit/s).
        assert mbit < 75, f"{mbit:.0f} Mbit/s through a 50 Mbit/s limit"
    finally:
        _stop(sink)
