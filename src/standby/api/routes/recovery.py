"""Recovery of one protected item (docs/recovery.md, "REST API for recovery"): test
failover and its cleanup, planned and unplanned failover, commit, cancel, reverse
replication and failback. Items are addressed by id or VM name, as in `routes.items`.

Each operation checks at once what it can (the item, a job of this kind already running,
the lifecycle: a planned failover before the initial replication completed is refused)
so a refusal is an immediate 409 with its reason; then a job does the work (its steps
persisted before they act) and the response (202) names it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, status

from standby.api import deps, schemas
from standby.api.auth import Principal, authenticate, authorize
from standby.api.recovery_schemas import FailoverIn, TestCleanupIn, TestFailoverIn
from standby.api.routes.items import Ref, item_ref
from standby.orchestration import failover
from standby.store.db import Store
from standby.store.repo import items as items_repo
from standby.store.repo import jobs as jobs_repo

router = APIRouter(dependencies=[Depends(authorize)], tags=["recovery"])


def _item_and_job(store: Store, item_id: int, job_id: int) -> schemas.ItemJobOut:
    with store.read() as s:
        return schemas.ItemJobOut(item=deps.item_out(items_repo.get(s, item_id)),
                                  job=deps.job_out(jobs_repo.get(s, job_id)))


@router.post("/items/{ref}/test-failover", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def test_failover(
    ref: Ref,
    body: TestFailoverIn | None = None,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Start the VM's chosen recovery point as a test VM on the secondary (a copy-on-write
    overlay; replication keeps running), on an isolated network, an existing one or none.
    One test failover per VM at a time; `test-failover/cleanup` removes it."""
    body = body or TestFailoverIn()
    item_id, job_id = failover.start_test_failover(
        store, services.runner, item=item_ref(ref), point=body.point, network=body.network.mode,
        network_name=body.network.name, created_by=principal.name,
    )
    return _item_and_job(store, item_id, job_id)


@router.post("/items/{ref}/test-failover/cleanup", status_code=status.HTTP_202_ACCEPTED,
             response_model=schemas.ItemJobOut)
def test_failover_cleanup(
    ref: Ref,
    body: TestCleanupIn | None = None,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Stop and remove the test VM, its test network and overlay; the notes are kept with
    the item (`details.last_test_failover`) and in the job's result."""
    body = body or TestCleanupIn()
    item_id, job_id = failover.cleanup_test_failover(
        store, services.runner, item=item_ref(ref), notes=body.notes, created_by=principal.name
    )
    return _item_and_job(store, item_id, job_id)


@router.post("/items/{ref}/failover", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ItemJobOut)
def start_failover(
    ref: Ref,
    body: FailoverIn,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> schemas.ItemJobOut:
    """Planned: shut the source down, replicate the last changes, start the replica (zero
    data loss; refused until the initial replication completed). Unplanned: start the
    replica from the chosen point, after trying to shut the source down and sync first
    unless `shutdown_source` is false."""
    item_id, job_id = failover.start_failover(
        store, services.runner, item=item_ref(ref), type=body.type, point=body.point,
        shutdown_source=body.shutdown_source, created_by=principal.name,
    )
    return _item_and_job(store, item_id, job_id)


# The operations without a body: (path, orchestration function, summary).
_ACTIONS: list[tuple[str, Callable[..., tuple[int, int]], str]] = [
    ("commit", failover.commit_failover,
     "Commit a completed failover: the replica stays the production VM; older recovery points may go."),
    ("cancel-failover", failover.cancel_failover,
     "Cancel a completed, uncommitted failover: the replica is stopped and removed, the source started again."),
    ("reverse-replicate", failover.reverse_replicate,
     "Replicate from the failed-over VM back to the old primary; only the blocks that differ from the old "
     "disks move (hash scan)."),
    ("failback", failover.failback,
     "Return to the primary: reverse sync, planned failover back, then replicate forward again."),
]


def _action_route(action: str, operation: Callable[..., tuple[int, int]], summary: str) -> None:
    def route(
        ref: Ref,
        principal: Principal = Depends(authenticate),
        store: Store = Depends(deps.store),
        services: deps.Services = Depends(deps.services),
    ) -> schemas.ItemJobOut:
        item_id, job_id = operation(store, services.runner, item=item_ref(ref), created_by=principal.name)
        return _item_and_job(store, item_id, job_id)

    route.__name__ = action.replace("-", "_")
    route.__doc__ = summary
    router.post(f"/items/{{ref}}/{action}", status_code=status.HTTP_202_ACCEPTED,
                response_model=schemas.ItemJobOut)(route)


for _action, _operation, _summary in _ACTIONS:
    _action_route(_action, _operation, _summary)
