"""`standby points materialize / release / prune` on a real replica store."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from standby.cli.main import run
from standby.replication.store import ReplicaStore

from store_helpers import SIZE, Model, assert_same, random_changes, run_cycle


@pytest.fixture
def store_with_points(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Three points two hours apart; returns the store and the raw image of each point."""
    rng = random.Random(7)
    root = tmp_path / "store"
    disk = ReplicaStore(root).create_disk("d0", SIZE)
    model = Model()
    raws = []
    now = time.time()
    for k, age_h in enumerate((4, 2, 0)):
        run_cycle(disk, model, random_changes(rng), f"c{k}", created_at=now - age_h * 3600)
        raws.append(model.write_raw(tmp_path / f"point{k}.raw"))
    return root, raws


def _points(root: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert run(["points", "list", "--store", str(root), "--disk-id", "d0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_materialize_pins_a_point_until_released(store_with_points, tmp_path, capsys) -> None:
    root, raws = store_with_points
    points = _points(root, capsys)
    oldest = points[0]["id"]
    overlay = tmp_path / "failover.qcow2"
    assert run(["points", "materialize", str(overlay), "--store", str(root), "--disk-id", "d0",
                "--point", oldest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"point": oldest, "overlay": str(overlay)}
    assert_same(overlay, raws[0])

    # Pinned: a latest-only prune keeps it.
    assert run(["points", "prune", "--store", str(root), "--disk-id", "d0", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert oldest not in removed and len(removed) == 1
    assert_same(overlay, raws[0])

    assert run(["points", "release", str(overlay), "--store", str(root), "--disk-id", "d0"]) == 0
    capsys.readouterr()
    assert run(["points", "prune", "--store", str(root), "--disk-id", "d0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [oldest]
    assert [p["id"] for p in _points(root, capsys)] == [points[-1]["id"]]


def test_prune_keeps_hourly_points_within_the_window(store_with_points, capsys) -> None:
    root, _ = store_with_points
    assert run(["points", "prune", "--store", str(root), "--disk-id", "d0", "--retention-hours", "3",
                "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["removed"]) == 1  # the 4-hour-old point
    assert len(_points(root, capsys)) == 2


def test_bad_retention_and_unknown_point_are_clear_errors(store_with_points, tmp_path, capsys) -> None:
    root, _ = store_with_points
    assert run(["points", "prune", "--store", str(root), "--disk-id", "d0", "--retention-hours", "-1"]) == 2
    assert "retention_hours" in capsys.readouterr().err
    rc = run(["points", "materialize", str(tmp_path / "x.qcow2"), "--store", str(root), "--disk-id", "d0",
              "--point", "nope"])
    assert rc == 3
    assert "nope" in capsys.readouterr().err


# -- a VM's points and what they carry (issue 10: points a secondary can start alone) ------

XML = "<domain type='qemu'><name>web01</name><memory unit='MiB'>256</memory></domain>"


def _vm_cycle(disks: dict, models: dict, rng: random.Random, cycle: str, targets: list[str],
              created_at: float, app: bool = False) -> None:
    """One cycle of VM web01 on `targets` (a partial cycle when not all of its disks)."""
    from standby.domain import vm_point
    from store_helpers import stage

    manifest = vm_point.build("web01", cycle, {"vda": "web01-vda", "vdb": "web01-vdb"}, XML,
                              nics=[("52:54:00:00:00:01", "prod")], network_map={"prod": "dr-prod"},
                              policy={"name": "gold"}, item_id=3)
    for t in targets:
        disk, model = disks[t], models[t]
        latest = disk.latest()
        w = disk.begin_cycle(f"{cycle}-{t}", latest.id if latest else None)
        changes = random_changes(rng)
        stage(w, changes, model.size)
        model.apply(changes)
        w.commit(model.digest(), "app" if app else "crash", created_at,
                 {"vm": "web01", "disk": t, "checkpoint": cycle, "vm_point": manifest.as_dict()})


@pytest.fixture
def vm_store(tmp_path: Path) -> Path:
    rng = random.Random(3)
    root = tmp_path / "vmstore"
    rs = ReplicaStore(root)
    disks = {t: rs.create_disk(f"web01-{t}", SIZE) for t in ("vda", "vdb")}
    models = {t: Model() for t in disks}
    now = time.time()
    _vm_cycle(disks, models, rng, "standby-1", ["vda", "vdb"], now - 120, app=True)
    _vm_cycle(disks, models, rng, "standby-2", ["vda", "vdb"], now - 60)
    _vm_cycle(disks, models, rng, "standby-3", ["vda"], now)  # in flight: on one disk only
    return root


def test_a_vm_point_carries_what_the_secondary_needs(vm_store: Path, capsys) -> None:
    from standby.replication import catalog

    points = catalog.vm_recovery_points(ReplicaStore(vm_store), "web01")
    assert [p.id for p in points] == ["standby-1", "standby-2"]  # the partial cycle is no point
    assert run(["points", "show", "--store", str(vm_store), "--vm", "web01", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["point"] == "standby-2" and shown["startable"] and shown["meta_sealed"]
    assert shown["disks"] == {"web01-vda": "0000000002", "web01-vdb": "0000000002"}
    m = shown["manifest"]
    assert m["domain_xml"] == XML and m["networks"] == [{"mac": "52:54:00:00:00:01", "primary": "prod",
                                                        "secondary": "dr-prod"}]
    assert run(["points", "show", "--store", str(vm_store), "--vm", "web01", "--point",
                "latest_app_consistent", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["point"] == "standby-1"
    # the table form names the mapping and says the VM can start without a control plane
    assert run(["points", "show", "--store", str(vm_store), "--vm", "web01"]) == 0
    text = capsys.readouterr().out
    assert "dr-prod" in text and "startable without the control plane: yes" in text
    assert run(["points", "show", "--store", str(vm_store), "--disk-id", "web01-vda", "--point",
                "0000000003", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["manifest"]["cycle"] == "standby-3" and one["meta_sealed"]


def test_a_vm_point_whose_manifest_was_changed_is_not_used(vm_store: Path, capsys) -> None:
    rec = vm_store / "disks/web01-vdb/points/0000000002.json"
    d = json.loads(rec.read_text())
    d["meta"]["vm_point"]["networks"][0]["secondary"] = "somewhere-else"
    rec.write_text(json.dumps(d))
    assert run(["points", "show", "--store", str(vm_store), "--vm", "web01"]) == 6  # IntegrityError
    assert "does not match its seal" in capsys.readouterr().err
