"""The two-site namespaces of the tests: a link left in this namespace by a killed run
must not capture the route to a new run's site (the cause of a CI failure: cp-a "did not
answer" because 10.213.1.0/24 led into the dead run's namespace)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from standby.testing import netns

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))


def test_admin_link_replaces_a_stale_link_left_by_a_killed_run() -> None:
    stale_ns, stale_host, stale_peer = "sbstale0", "sbstale0h", "sbstale0n"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", stale_host, "type", "veth", "peer", "name", stale_peer], check=True)
        subprocess.run(["ip", "link", "set", stale_peer, "netns", stale_ns], check=True)
        subprocess.run(["ip", "addr", "add", "10.213.1.1/24", "dev", stale_host], check=True)
        subprocess.run(["ip", "link", "set", stale_host, "up"], check=True)
        with netns.TwoSites(prefix="sbt") as sites:
            addr = sites.admin_link("a")
            server = sites.popen("a", [sys.executable, "-c",
                                       "import socket; s = socket.create_server(('0.0.0.0', 18443)); "
                                       "c, _ = s.accept(); c.sendall(b'site-a')"])
            try:
                got = b""
                deadline = time.monotonic() + 10
                while not got:
                    try:
                        with socket.create_connection((addr, 18443), timeout=2) as c:
                            got = c.recv(16)
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                assert got == b"site-a"
            finally:
                server.kill()
                server.wait()
        out = subprocess.run(["ip", "-o", "link", "show", stale_host], capture_output=True, text=True)
        assert out.returncode != 0, "the stale link is still there"
    finally:
        subprocess.run(["ip", "link", "delete", stale_host], capture_output=True)
        subprocess.run(["ip", "netns", "delete", stale_ns], capture_output=True)
