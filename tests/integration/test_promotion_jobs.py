"""The active control plane dies with failover jobs running; the standby site's is promoted
and takes them over (issue 10). Real PostgreSQL streaming replication; the real job
runner and scheduler on each side; the two sites' agents played through the task protocol
(`recovery_helpers.Sites`), which checks that no VM ever runs on both sites.

Every job ends succeeded, or failed with a reason; nothing an agent did is done twice."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import build  # noqa: E402
from recovery_helpers import PREFIX, PRIMARY, SECONDARY, Sites, utcnow  # noqa: E402

from standby.orchestration import failover, plans, protection  # noqa: E402
from standby.orchestration.role import RoleKeeper, in_recovery  # noqa: E402
from standby.orchestration.runner import JobRunner  # noqa: E402
from standby.orchestration.scheduler import Scheduler  # noqa: E402
from standby.orchestration.settings import ServerSettings  # noqa: E402
from standby.store import open_store  # noqa: E402
from standby.store.repo import jobs  # noqa: E402
from standby.testing.postgres import PgCluster, reason_unavailable, replicated_pair  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.postgresql]

ENDED = ("succeeded", "failed", "errored", "cancelled")


def handlers() -> dict[str, Any]:
    return {**protection.handlers(), **failover.handlers(), **plans.handlers()}


@pytest.fixture
def pair() -> Iterator[tuple[PgCluster, PgCluster, str, str]]:
    why = reason_unavailable()
    if why:
        pytest.skip(why)
    with replicated_pair("standby_promo") as (primary, standby, url_a, url_b):
        yield primary, standby, url_a, url_b


def _job_states(store: Any, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    with store.read() as s:
        return {i: (jobs.get(s, i).state, jobs.get(s, i).error) for i in ids}


def test_jobs_in_flight_survive_a_promotion(tmp_path: Path, pair: Any) -> None:
    primary, standby, url_a, url_b = pair
    open_store(url_a).close()  # migrated on the primary, replayed by the standby
    settings = ServerSettings(data_dir=tmp_path, tick_seconds=0.05, heartbeat_seconds=1, heartbeat_timeout=3600,
                              runner_workers=4)
    store_a = open_store(url_a)
    build(store_a, now=utcnow())
    sites = Sites(store_a, Scheduler(store_a, settings), vms=("web01", "db01"))
    runner_a = JobRunner(store_a, settings, handlers())
    runner_a.start()
    try:
        for vm in ("web01", "db01"):
            _item, job_id = protection.enable_protection(store_a, runner_a, vm=vm, created_by="test")
            sites.until(lambda j=job_id: _job_states(store_a, [j])[j][0] in ENDED, f"protect {vm}")
        # two failovers start; their materialize tasks are handed out and held unanswered
        sites.hold = {"materialize"}
        _i1, planned = failover.start_failover(store_a, runner_a, item="web01", type="planned")
        _i2, unplanned = failover.start_failover(store_a, runner_a, item="db01", type="unplanned",
                                                 shutdown_source=True)
        ids = [planned, unplanned]
        sites.until(lambda: len(sites.kinds("materialize")) >= 0 and _tasks_open(store_a, "materialize") >= 2,
                    "both failovers at their materialize step")
    finally:
        runner_a.stop()  # the active control plane dies: its jobs stay "running" in the database
    before = Counter(k for _h, k, _p in sites.log)
    # the standby has replayed everything; promote it and start its control plane's runner
    _wait(lambda: _replayed(url_b, ids), 30, "the standby to replay the jobs")
    primary.kill()
    standby.promote()
    store_b = open_store(url_b, migrate="unless-standby")
    try:
        assert not in_recovery(store_b)
        role = RoleKeeper(store_b, name="cp-b", url="https://cp-b:8443")
        assert role.try_activate(promoted=True)
        assert role.view().epoch == 2
        sites.store = store_b
        sites.scheduler = Scheduler(store_b, settings)
        sites.hold = set()
        runner_b = JobRunner(store_b, settings, handlers())
        runner_b.start()
        try:
            done = sites.until(lambda: all(st in ENDED for st, _ in _job_states(store_b, ids).values()) and
                               _job_states(store_b, ids), "the jobs to end on the promoted control plane", 60)
        finally:
            runner_b.stop()
        for job_id, (state, error) in done.items():
            assert state == "succeeded" or (state in ("failed", "errored") and error), (job_id, state, error)
        assert all(state == "succeeded" for state, _ in done.values()), done
        # nothing an agent did before the promotion was done again (the held materialize
        # tasks were answered once, after it), and no VM ever ran on both sites
        after = Counter(k for _h, k, _p in sites.log)
        assert after["materialize"] == 2 and before["materialize"] == 0, (before, after)
        for kind in ("stop_vm", "cycle"):
            ran = [p for _h, k, p in sites.log if k == kind and p.get("final_sync")]
            assert len({p["vm"] for p in ran}) == len(ran), f"a final sync ran twice: {ran}"
        assert sites.violations == []
        assert f"{PREFIX}web01" in sites.hosts[SECONDARY].running and "web01" not in sites.hosts[PRIMARY].running
        role.release()
    finally:
        store_b.close()
        store_a.close()


def _tasks_open(store: Any, kind: str) -> int:
    from standby.store.repo import tasks

    with store.read() as s:
        return len(tasks.list_tasks(s, kind=kind, states=["queued", "claimed"]))


def _replayed(url: str, ids: list[int]) -> bool:
    store = open_store(url, migrate="unless-standby")
    try:
        with store.read() as s:
            states = [jobs.get(s, i).state for i in ids]
        return all(st == "running" for st in states) and _tasks_open(store, "materialize") >= 2
    except Exception:  # noqa: BLE001 - not replayed yet (no such job)
        return False
    finally:
        store.close()


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
