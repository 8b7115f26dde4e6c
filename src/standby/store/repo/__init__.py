"""The store's repository layer: one module of functions per aggregate, each taking the
session of the caller's transaction (`Store.transaction()` / `Store.read()`).

    from standby.store.repo import jobs, items
    with store.transaction() as s:
        item = items.create(s, vm_id=..., pairing_id=..., policy_id=...)
        jobs.create(s, kind="protect", target=f"item:{item.id}", on_commit=runner.submit)

Time is passed in (`now=`) where it matters, defaulting to the current UTC time; lookups
that find nothing raise `NotFound`; refused changes raise `Refused`, `Conflict` or
`BadInput` with a message meant for the operator.
"""

from standby.store.repo import agents, alerts, inventory, items, jobs, plans, policies, tasks, tokens

__all__ = ["agents", "alerts", "inventory", "items", "jobs", "plans", "policies", "tasks", "tokens"]
