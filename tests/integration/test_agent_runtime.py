"""`standby agent run` as a process.

Without a control plane: the receiver serves replication all the same (a seed from
`standby replicate` lands), the outage is logged once, SIGTERM stops it cleanly.

Against a real control plane (`standby server run`, two registered agents as processes
through `standby.demo.local.LocalDeployment`, a real test guest owned by the primary
agent's domain filter): heartbeats and inventory reach the control plane, cycle tasks run
and land recovery points in the secondary agent's replica store that the guest's verifier
(running VM) and `qemu-img compare` (VM off) find equal to the source, a task claimed before
an agent restart is run again by the restarted agent, and a control-plane restart costs
the agent one "unreachable" and one "reachable again" log line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import make_image  # noqa: E402

from standby.agent.config import AgentConfig  # noqa: E402
from standby.demo.local import free_port, standby_command  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1 << 20


def _wait(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[Any] | None = None,
          log: Path | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}: exited {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(interval)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_agent_run_without_a_control_plane_receives_and_stops_cleanly(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    data = tmp_path / "agent-b"
    ident = tls.issue(ca, "agent-b", ["127.0.0.1"], out_dir=tmp_path / "issued")
    sender = tls.issue(ca, "sender", ["127.0.0.1"])
    data.mkdir()
    shutil.copy(ident.cert, data / "agent.crt")
    shutil.copy(ident.key, data / "agent.key")
    shutil.copy(ident.ca, data / "ca.crt")
    listen = f"127.0.0.1:{free_port()}"
    # nothing listens on the control plane's port; libvirt's built-in test driver needs no daemon
    AgentConfig(data_dir=data, name="agent-b", server_url=f"https://127.0.0.1:{free_port()}", site="s",
                server="m", cloud="secondary", host="host-b", listen=listen, libvirt_uri="test:///default",
                heartbeat_seconds=1).save()
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(standby_command("agent", "run", "--data-dir", str(data)), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait(lambda: "running: replication on" in _text(log), 30, "the agent to start", proc, log)
        img = tmp_path / "disk.img"
        make_image(img, 8 * MiB)
        env = dict(os.environ, STANDBY_TLS_CERT=str(sender.cert), STANDBY_TLS_KEY=str(sender.key),
                   STANDBY_TLS_CA=str(sender.ca), STANDBY_SENDER_STATE=str(tmp_path / "sender"))
        r = subprocess.run(standby_command("replicate", str(img), "--to", listen, "--disk-id", "d0", "--seed",
                                           "--json"), capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        points = ReplicaStore(data / "replicas").disk("d0").points()
        assert len(points) == 1
        # the heartbeat, inventory and task loops retried (backoff 1, 2, 4 s) and said so once
        _wait(lambda: _text(log).count("unreachable") >= 1, 10, "the outage to be logged", proc, log)
        time.sleep(4)
        assert _text(log).count("control plane unreachable") == 1, _text(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, _text(log)
        assert "agent agent-b stopped" in _text(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
