"""Recovery plans (docs/recovery.md, "Recovery plans"): stored plan documents, a plan's
failover (or its dry run), and the confirmation of a manual action a plan's job waits on.

A plan document is posted as JSON, or as YAML text with `Content-Type: application/yaml`
(the form operators write them in). It is validated by `domain.plans.load_plan`; every
problem is reported at once, by field, as a 422 like a schema violation.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from standby.api import deps, schemas
from standby.api.auth import Principal, authenticate, authorize
from standby.api.recovery_schemas import (
    ConfirmIn,
    ConfirmOut,
    DryRunOut,
    PlanFailoverIn,
    PlanJobOut,
    PlanOut,
)
from standby.domain.plans import PlanError, plan_json_schema
from standby.errors import BadInput
from standby.orchestration import plans
from standby.store.db import Store
from standby.store.repo import jobs as jobs_repo

router = APIRouter(dependencies=[Depends(authorize)])

PlanName = Annotated[str, PathParam(max_length=200, description="the plan's name")]
MAX_PLAN_BYTES = 1 << 20
JSON_TYPES = frozenset({"application/json", ""})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


class InvalidPlan(BadInput):
    """A plan document that cannot be read or does not validate: a 422 like a schema error."""

    http_status = 422


class UnsupportedMediaType(BadInput):
    http_status = 415


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The plan's JSON schema with its `$defs` inlined: an OpenAPI document resolves `#/...`
    against itself, where the plan's own `$defs` are not. (The plan schema is not recursive.)"""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)  # type: ignore[no-any-return]


_PLAN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_refs(plan_json_schema())},
            "application/yaml": {"schema": {"type": "string", "description": "the plan document in YAML"}},
        },
    }
}


def _problem_errors(problems: list[str]) -> list[dict[str, str]]:
    """'groups.0.vms: a group needs at least one VM' -> the 422 body's errors shape."""
    out = []
    for p in problems:
        field, _, message = p.partition(": ")
        out.append({"location": "body", "field": field, "message": message or p, "type": "plan"})
    return out


def _document(raw: bytes, content_type: str) -> Any:
    media = content_type.split(";", 1)[0].strip().lower()
    if len(raw) > MAX_PLAN_BYTES:
        raise InvalidPlan(f"the plan document is larger than {MAX_PLAN_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPlan("the plan document is not UTF-8 text") from None
    if media in JSON_TYPES:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidPlan(f"the plan document is not JSON: {e}") from None
    if media in YAML_TYPES:
        try:
            return yaml.safe_load(text)
        # PyYAML raises ValueError for a timestamp that is not a date (2026-13-45).
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise InvalidPlan(f"the plan document is not YAML: {' '.join(str(e).split())}") from None
    raise UnsupportedMediaType(f"Content-Type {media!r}: send the plan as application/json or application/yaml")


@router.post("/plans", status_code=status.HTTP_201_CREATED, response_model=PlanOut, tags=["plans"],
             openapi_extra=_PLAN_BODY)
async def create_plan(
    request: Request,
    replace: Annotated[bool, Query(description="replace a plan of the same name")] = False,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
) -> PlanOut:
    """Store a recovery plan: ordered groups of VMs with pre and post scripts and manual
    actions. An existing name is a conflict (409) unless `replace`."""
    document = _document(await request.body(), request.headers.get("content-type", ""))
    if not isinstance(document, dict):
        raise InvalidPlan("the plan document must be a mapping (name, groups, ...)")
    try:
        # The store is blocking: off the event loop (FastAPI does this itself for sync routes).
        view = await run_in_threadpool(plans.create_plan, store, document, replace=replace,
                                       created_by=principal.name)
    except PlanError as e:
        raise InvalidPlan(e.message, details={"problems": e.problems,
                                              "errors": _problem_errors(e.problems)}) from None
    return PlanOut.model_validate(view)


@router.get("/plans", response_model=schemas.ListOut[PlanOut], tags=["plans"])
def list_plans(store: Store = Depends(deps.store)) -> schemas.ListOut[PlanOut]:
    return schemas.ListOut(items=[PlanOut.model_validate(p) for p in plans.list_plans(store)])


@router.get("/plans/{name}", response_model=PlanOut, tags=["plans"])
def get_plan(name: PlanName, store: Store = Depends(deps.store)) -> PlanOut:
    return PlanOut.model_validate(plans.get_plan(store, name))


@router.delete("/plans/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["plans"])
def delete_plan(name: PlanName, store: Store = Depends(deps.store)) -> Response:
    """Refused (409) while a run of the plan is going on."""
    plans.delete_plan(store, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/plans/{name}/failover",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PlanJobOut | DryRunOut,
    responses={200: {"model": DryRunOut, "description": "dry run: the steps the run would take"}},
    tags=["plans"],
)
def plan_failover(
    name: PlanName,
    body: PlanFailoverIn,
    response: Response,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
    services: deps.Services = Depends(deps.services),
) -> PlanJobOut | DryRunOut:
    """Fail the plan's VMs over, group after group (a planned failover stops at the first
    error; test and unplanned failovers go on and report every failure). With `dry_run`
    nothing acts: 200 with the steps the run would take."""
    out = plans.run_plan(store, services.runner, name, body.type, point=body.point, created_by=principal.name,
                         dry_run=body.dry_run)
    if isinstance(out, dict):
        response.status_code = status.HTTP_200_OK
        return DryRunOut(plan=name, type=body.type, text=out["text"], steps=out["steps"])
    with store.read() as s:
        return PlanJobOut(job=deps.job_out(jobs_repo.get(s, out)))


@router.post("/jobs/{job_id}/confirm", response_model=ConfirmOut, tags=["jobs"])
def confirm_manual_action(
    job_id: schemas.IdPath,
    body: ConfirmIn,
    principal: Principal = Depends(authenticate),
    store: Store = Depends(deps.store),
) -> ConfirmOut:
    """Confirm the manual action a recovery plan's job waits on (its step number); the
    plan goes on. A step that is not waiting for a confirmation is refused (409)."""
    record = plans.confirm_manual_action(store, job_id, body.step, by=principal.name)
    with store.read() as s:
        job = deps.job_out(jobs_repo.get(s, job_id))
    return ConfirmOut(job=job, step=body.step, confirmed_by=record.get("by"), confirmed_at=str(record.get("at")))
