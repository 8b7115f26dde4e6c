"""RPO as the secondary holds it: now minus the time the VM's newest whole recovery point
was taken (the checkpoint's moment, `taken_at` in each disk point's meta; points written
before it carried that fall back to their commit time). Read from the secondary agent's
replica store, as a failover there would find it; shared by the tests and `bench/rpo.py`.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from standby.errors import StandbyError
from standby.replication import catalog
from standby.replication.store import ReplicaStore


def newest_point_time(replicas: Path, vm: str) -> float | None:
    """When the newest whole point of `vm` in the replica store at `replicas` was taken."""
    try:
        vp = catalog.choose(ReplicaStore(replicas), vm, "latest", now=time.time())
    except (StandbyError, OSError):
        return None  # no whole point yet
    return max(float(r.meta.get("taken_at") or r.created_at) for r in vp.records.values())


def secondary_rpo(replicas: Path, vm: str, now: float | None = None) -> float:
    """The RPO now (infinite while there is no whole point)."""
    at = newest_point_time(replicas, vm)
    return float("inf") if at is None else max(0.0, (now or time.time()) - at)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: a p99 of 300 samples is the 297th."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


@dataclass
class RpoSampler:
    """Samples the secondary's RPO of one VM about every `interval` seconds on a thread."""

    replicas: Path
    vm: str
    interval: float = 1.0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RpoSampler:
        self._thread = threading.Thread(target=self._run, name="rpo-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        # Jittered (0.5 to 1.5 intervals apart): samples at a fixed period lock onto the
        # phase of cycles that also run at a fixed period, and would see one RPO only.
        rnd = random.Random(self.vm)
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(secondary_rpo(self.replicas, self.vm))
            next_at += self.interval * (0.5 + rnd.random())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def summary(self) -> dict[str, float]:
        s = list(self.samples)
        return {"samples": len(s), "p50": statistics.median(s), "p99": percentile(s, 99), "max": max(s)}
