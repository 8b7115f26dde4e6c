"""Jobs: every operation, with its steps; listing, one job, cancelling."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from standby.api import deps, schemas
from standby.api.auth import authorize
from standby.store.db import Store
from standby.store.repo import jobs as jobs_repo
from standby.store.states import JobState

router = APIRouter(dependencies=[Depends(authorize)], tags=["jobs"])

JobStateName = Literal[tuple(s.value for s in JobState)]  # type: ignore[valid-type]


@router.get("/jobs", response_model=schemas.PageOut[schemas.JobOut])
def list_jobs(
    state: Annotated[list[JobStateName] | None, Query(description="repeat for several states")] = None,
    kind: Annotated[str | None, Query(max_length=60)] = None,
    target: Annotated[str | None, Query(max_length=255, description='e.g. "item:7"')] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=schemas.INT32_MAX, description="page: older than this id")] = None,
    store: Store = Depends(deps.store),
) -> schemas.PageOut[schemas.JobOut]:
    """Newest first, a page at a time: `next` is the `before_id` of the next (older) page."""
    with store.read() as s:
        rows = jobs_repo.list_jobs(s, states=state, kind=kind, target=target, limit=limit + 1, before_id=before_id)
        more = len(rows) > limit
        rows = rows[:limit]
        return schemas.PageOut(items=[deps.job_out(j) for j in rows], next=str(rows[-1].id) if more else None)


@router.get("/jobs/{job_id}", response_model=schemas.JobOut)
def get_job(job_id: schemas.IdPath, store: Store = Depends(deps.store)) -> schemas.JobOut:
    with store.read() as s:
        return deps.job_out(jobs_repo.get(s, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=schemas.JobOut)
def cancel_job(job_id: schemas.IdPath, store: Store = Depends(deps.store)) -> schemas.JobOut:
    """A queued job is cancelled at once; a running one is asked to stop at its next step."""
    with store.transaction() as s:
        return deps.job_out(jobs_repo.request_cancel(s, job_id))
