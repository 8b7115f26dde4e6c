"""GET /items at scale (issue 11): 5,000 items paged through over real HTTPS on both stores,
each page in a bounded number of queries whatever its size, filters applied by the database.
How long it takes is printed (bench/control_plane.py measures it against its targets)."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

from cp_helpers import items_fabric  # noqa: E402

from api_helpers import ControlPlane  # noqa: E402

N = 5000


@pytest.mark.slow
def test_paging_through_5000_items(cp_any: ControlPlane, capsys) -> None:  # type: ignore[no-untyped-def]
    fab = items_fabric(cp_any.store, n=N)
    with cp_any.store.transaction() as s:  # a few items elsewhere, for the filters
        from standby.store.models import ProtectedItem

        for item_id in fab.item_ids[:7]:
            s.get(ProtectedItem, item_id).state = "paused"
    queries = [0]

    def count(*_a: object) -> None:
        # the requests' statements only, not the scheduler's and the other loops' beside them
        if not threading.current_thread().name.startswith(("standby-", "job")):
            queries[0] += 1

    engine = cp_any.store.engine
    admin = cp_any.admin()
    seen: list[int] = []
    per_page: list[int] = []
    times: list[float] = []
    after = None
    event.listen(engine, "before_cursor_execute", count)
    try:
        while True:
            queries[0] = 0
            t0 = time.perf_counter()
            r = admin.get("/items", params={"limit": 500, **({"after": after} if after else {})})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            page = r.json()
            per_page.append(queries[0])
            seen += [i["id"] for i in page["items"]]
            after = page["next"]
            if not after:
                break
        # filters run in the database: one small page
        queries[0] = 0
        crit = admin.get("/items", params={"state": "paused", "cloud": "gold"}).json()
        assert [i["id"] for i in crit["items"]] == fab.item_ids[:7] and crit["next"] is None
        assert admin.get("/items", params={"cloud": "elsewhere"}).json()["items"] == []
        assert len(admin.get("/items", params={"host": "h1", "limit": 3}).json()["items"]) == 3
        queries[0] = 0
        admin.get("/items", params={"limit": 10, "after": 100})
        small = queries[0]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert seen == sorted(fab.item_ids) and len(seen) == N  # every item once, in order
    assert len(per_page) == N // 500
    # a bounded number of queries per page (one per relation), not one per item: a page of
    # 500 costs what a page of 10 does
    assert max(per_page[1:]) <= small + 2 and max(per_page) <= 20, (per_page, small)
    with capsys.disabled():
        print(f"\nGET /items over {N} items ({cp_any.store.dialect}): {len(times)} pages of 500, page median "
              f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms, "
              f"all {sum(times):.2f} s; {max(per_page)} queries per page at most")
