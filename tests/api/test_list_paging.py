"""Lists that grow page with a cursor: GET /jobs and GET /alerts newest first (`next` is the
`before_id` of the older page), GET /vms in id order (`next` is the next page's `after`;
tests/api/test_agents.py). Every row once, none skipped, the last page says so."""

from __future__ import annotations

from typing import Any

import httpx

from standby.store.repo import alerts, jobs

from api_helpers import ControlPlane


def _pages(client: httpx.Client, path: str, cursor: str, **params: Any) -> list[list[int]]:
    out: list[list[int]] = []
    query = dict(params)
    while True:
        r = client.get(path, params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        out.append([row["id"] for row in page["items"]])
        if page["next"] is None:
            return out
        assert page["next"] == str(out[-1][-1])
        query[cursor] = page["next"]


def test_jobs_and_alerts_page_newest_first(cp: ControlPlane) -> None:
    with cp.store.transaction() as s:
        job_ids = [jobs.create(s, kind="pause", target=f"item:{i}", steps=["pause replication"]).id for i in range(5)]
        alert_ids = [alerts.raise_alert(s, kind="rpo_breach", severity="warning", subject=f"item:vm{i}",
                                        message="late")[0].id for i in range(5)]
    admin = cp.admin()
    assert _pages(admin, "/jobs", "before_id", limit=2) == [job_ids[::-1][:2], job_ids[::-1][2:4], job_ids[:1]]
    assert _pages(admin, "/alerts", "before_id", limit=2) == [alert_ids[::-1][:2], alert_ids[::-1][2:4],
                                                              alert_ids[:1]]
    assert _pages(admin, "/jobs", "before_id", limit=5) == [job_ids[::-1]]  # exactly one page: no empty one after
