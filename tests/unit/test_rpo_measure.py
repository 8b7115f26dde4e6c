"""The RPO measurement's arithmetic (standby.testing.rpo): nearest-rank percentiles, and an
empty replica store meaning no point yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from standby.testing.rpo import percentile, secondary_rpo


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 301)]  # 1..300
    assert percentile(values, 50) == 150.0
    assert percentile(values, 99) == 297.0
    assert percentile(values, 100) == 300.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_no_point_yet_is_an_infinite_rpo(tmp_path: Path) -> None:
    assert secondary_rpo(tmp_path / "replicas", "web") == float("inf")
