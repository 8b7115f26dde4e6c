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
