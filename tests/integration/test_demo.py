"""`standby demo --json`, the README's main job, run as a user runs it: a subprocess on
this machine (libvirt, two guests, a control plane and two agents). Stdout must be exactly
one JSON object of figures; progress goes to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libvirt")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

STANDBY = str(Path(sys.executable).parent / "standby")


def test_demo_json_is_one_object_of_figures(libvirtd: str, tmp_path: Path) -> None:
    p = subprocess.run([STANDBY, "demo", "--json", "--workdir", str(tmp_path / "demo"), "--cycles", "1"],
                       capture_output=True, text=True, timeout=1440)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)  # the whole of stdout is one JSON value
    assert {"readiness", "steps", "items", "figures", "status"} <= set(doc)
    ready = {name for name, r in doc["readiness"].items() if name.endswith(".yaml") and r["ready"]}
    assert ready == {"kvm-two-sites.yaml", "single-server-two-clouds.yaml"}
    assert doc["readiness"]["live"]["ready"] is True
    assert {i["vm"] for i in doc["items"]} == {"demo-web", "demo-db"}
    assert all(i["state"] == "protected" for i in doc["items"])  # demo-web protected again after failback
    f = doc["figures"]
    assert f["initial_replication_bytes"] > 0 and f["bytes_replicated"] >= f["initial_replication_bytes"]
    assert all(s["seconds"] >= 0 for s in doc["steps"]) and len(doc["steps"]) == 12
    # The recovery drills: the guest's own records say what a failover lost.
    assert f["records_lost_planned_failover"] == 0
    assert f["planned_failover"]["replica_first_record"] > 0 and f["failback"]["records_lost"] == 0
    assert f["test_failover"]["source_kept_running"] is True and f["test_failover"]["test_vm_found_records"] > 0
    assert 0 < f["reverse_replication_bytes"] < 32 * 2**20  # only what differs, never the whole disk
    assert "✓" in p.stderr  # progress lines went to stderr
