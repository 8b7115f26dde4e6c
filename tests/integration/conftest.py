"""Shared fixtures for tests with real services: the libvirt daemon and the test guest.

`libvirtd` (session) starts virtlogd + libvirtd without systemd unless they already
run, and stops them at the end of the session if it started them (set
STANDBY_KEEP_LIBVIRTD=1 to leave them running between runs). Tests using these fixtures
should be marked slow; they skip (with the reason) where libvirtd cannot run (not root,
packages missing: run scripts/bootstrap.sh).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.testing import guest as guest_mod
from standby.testing import libvirtd as libvirtd_mod


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A running libvirtd; yields its URI (qemu:///system)."""
    reason = libvirtd_mod.available()
    if reason:
        pytest.skip(reason)
    started = libvirtd_mod.ensure_running()
    yield libvirtd_mod.URI
    if started and os.environ.get("STANDBY_KEEP_LIBVIRTD") != "1":
        libvirtd_mod.stop()


@pytest.fixture(scope="session")
def libvirt_conn(libvirtd: str) -> Iterator[Any]:
    """A connection to it. libvirt's default error handler (which prints every error to
    stderr, even the ones a caller expects and catches) is silenced; errors still raise."""
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(libvirtd)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def guest_image() -> guest_mod.GuestImage:
    """The test guest's kernel and initramfs (built once, then cached across runs)."""
    return guest_mod.build()


@pytest.fixture
def vm_name(request: pytest.FixtureRequest) -> Any:
    """Unique domain names for this test; at its end they are destroyed and undefined."""
    made: list[str] = []

    def name(tag: str) -> str:
        n = f"sbt-{tag}-{uuid.uuid4().hex[:6]}"
        made.append(n)
        return n

    yield name
    if made and "libvirt_conn" in request.fixturenames:
        import libvirt

        conn = request.getfixturevalue("libvirt_conn")
        for dom in conn.listAllDomains():
            if dom.name() not in made:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                # gone with their disks: left defined, every later agent's discovery would list them
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            except libvirt.libvirtError:
                pass  # gone already (the test undefined it)


@pytest.fixture
def vm_dir(tmp_path: Path) -> Iterator[Path]:
    """Where a test keeps its disks and console logs (removed when the test ends)."""
    d = tmp_path / "vm"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
