"""Subprocess for the SIGKILL tests: runs deterministic cycles (and prunes) until killed.

    python store_crash_worker.py ROOT SEED START_CYCLE N_CYCLES [PHASE STEP]

Cycle c (1-based) applies `cycle_changes(SEED, c)`; every third cycle is followed by a
prune that keeps only the latest point. N_CYCLES 0 means until killed. Prints "ready"
once the store is open, then per cycle "staging <c>", "commit <c>", "committed <c>" and,
after every third, "prune <c>", "pruned <c>" (each flushed before the phase starts).

With PHASE (`commit` or `prune`) and STEP (n >= 1), the worker kills itself with SIGKILL
at the STEP-th durable step (an fsync, rename or replace) of its first commit or prune
(of a cycle past START_CYCLE + 1), after printing "dying <phase> <c> step <n>": a kill
inside a commit or a prune at a chosen point, not left to timing. A STEP past the last
step of that commit or prune lets it finish and tries the next one with STEP counted
from 1 again, modulo the steps the previous one had ("dying" names the step taken).
"""

from __future__ import annotations

import os
import random
import signal
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


class _KillAt:
    """Wraps the os calls that make the store's writes durable; SIGKILLs the process at
    the chosen step of the chosen phase."""

    def __init__(self, phase: str | None, step: int) -> None:
        self.phase, self.step = phase, step
        self.inside: str | None = None
        self.cycle = 0
        self.count = 0
        if phase is None:
            return
        for name in ("fsync", "replace", "rename"):
            real = getattr(os, name)
            setattr(os, name, self._wrap(real))

    def _wrap(self, real):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self.inside is not None and self.inside == self.phase:
                self.count += 1
                if self.count == self.step:
                    print(f"dying {self.phase} {self.cycle} step {self.count}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    def enter(self, phase: str, cycle: int) -> None:
        self.inside, self.cycle, self.count = phase, cycle, 0

    def leave(self) -> None:
        if self.inside == self.phase and self.count and self.step > self.count:
            self.step = (self.step - 1) % self.count + 1  # the next one: a step it has
        self.inside = None


def main() -> None:
    root, seed, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    killer = _KillAt(sys.argv[5] if len(sys.argv) > 5 else None, int(sys.argv[6]) if len(sys.argv) > 6 else 0)
    disk = ReplicaStore(root).create_disk("vm", SIZE)
    model = model_after(seed, start - 1)
    print("ready", flush=True)
    c = start
    while count == 0 or c < start + count:
        armed = c > start + 1  # the first cycles of a run are never the target
        changes = cycle_changes(seed, c)
        print(f"staging {c}", flush=True)
        latest = disk.latest()
        w = disk.begin_cycle(f"c{c}", latest.id if latest else None)
        stage(w, changes)
        model.apply(changes)
        print(f"commit {c}", flush=True)
        if armed:
            killer.enter("commit", c)
        w.commit(model.digest(), "crash", time.time(), {"c": c})
        killer.leave()
        print(f"committed {c}", flush=True)
        if c % 3 == 0:
            print(f"prune {c}", flush=True)
            if armed:
                killer.enter("prune", c)
            disk.prune(RetentionPolicy(0), time.time())
            killer.leave()
            print(f"pruned {c}", flush=True)
        c += 1


if __name__ == "__main__":
    main()
