"""Subprocess for the SIGKILL tests: runs deterministic cycles (and prunes) until killed.

    python store_crash_worker.py ROOT SEED START_CYCLE N_CYCLES

Cycle c (1-based) applies `cycle_changes(SEED, c)`; every third cycle is followed by a
prune that keeps only the latest point, so kills land in staging, commit and merges.
Prints "ready" once the store is open, then "committed <c>" after each commit (flushed).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from store_helpers import SIZE, Model, stage  # noqa: E402

from standby.domain.retention import RetentionPolicy  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402


def cycle_changes(seed: int, c: int) -> dict[int, bytes | None]:
    from store_helpers import random_changes
    rng = random.Random(seed * 1000 + c)
    if c == 1:
        return random_changes(rng, k=50, zero_share=0.1)
    return random_changes(rng)


def model_after(seed: int, c: int) -> Model:
    m = Model()
    for k in range(1, c + 1):
        m.apply(cycle_changes(seed, k))
    return m


def main() -> None:
    root, seed, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    disk = ReplicaStore(root).create_disk("vm", SIZE)
    model = model_after(seed, start - 1)
    print("ready", flush=True)
    for c in range(start, start + count):
        changes = cycle_changes(seed, c)
        latest = disk.latest()
        w = disk.begin_cycle(f"c{c}", latest.id if latest else None)
        stage(w, changes)
        model.apply(changes)
        w.commit(model.digest(), "crash", time.time(), {"c": c})
        print(f"committed {c}", flush=True)
        if c % 3 == 0:
            disk.prune(RetentionPolicy(0), time.time())
            print(f"pruned {c}", flush=True)


if __name__ == "__main__":
    main()
