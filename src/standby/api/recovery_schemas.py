"""Request and response bodies of the recovery routes (docs/recovery.md, "REST API for
recovery"): failovers of one item, recovery plans, manual-action confirmations.

As in `schemas`, what the orchestration would refuse later for its shape (an unknown
failover type, a planned failover to a chosen point, an existing test network without a
name) is refused here first, so the 422 names the field before anything is touched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from standby.api.schemas import INT32_MAX, JobOut, Request, Text
from standby.domain.fabric import Name

# latest | latest_processed | latest_app_consistent | a point id (a cycle key or a per-disk id):
# no whitespace or control characters, bounded.
PointRef = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
LATEST = "latest"


def _planned_takes_latest(point: str | None, info: ValidationInfo) -> str | None:
    # A planned failover always takes the point of its final sync (zero data loss).
    if info.data.get("type") == "planned" and point not in (None, LATEST):
        raise ValueError("a planned failover fails over to the point of its final sync: leave point out "
                         "(or use an unplanned failover to choose a point)")
    return point


# ---------------------------------------------------------------- one item


class TestNetworkIn(Request):
    __test__ = False  # not a pytest class

    mode: Literal["isolated", "existing", "none"] = Field(
        default="isolated",
        description="isolated: a network created for the test (no uplink), removed by the cleanup; "
        "existing: the network `name` on the secondary; none: no NIC connected",
    )
    name: Name | None = Field(default=None, description="with mode existing: the network to attach the test VM to")

    @model_validator(mode="after")
    def _name_for_existing(self) -> TestNetworkIn:
        if self.mode == "existing" and not self.name:
            raise ValueError("name: an existing network must be named")
        if self.mode != "existing" and self.name is not None:
            raise ValueError(f"name: only an existing network is named (mode is {self.mode})")
        return self


class TestFailoverIn(Request):
    __test__ = False

    point: PointRef = Field(default=LATEST, description="latest, latest_processed, latest_app_consistent or a point id")
    network: TestNetworkIn = Field(default_factory=TestNetworkIn)


class TestCleanupIn(Request):
    __test__ = False

    notes: Text = Field(default="", description="the operator's notes on the test, kept with the item")


class FailoverIn(Request):
    type: Literal["planned", "unplanned"]
    point: PointRef | None = Field(
        default=None,
        description="unplanned only: latest (default), latest_processed, latest_app_consistent or a point id",
    )
    shutdown_source: bool = Field(
        default=True, description="unplanned: try to shut the source down and sync its last changes first "
        "(the failover goes on if that fails); planned failovers always do"
    )

    _point = field_validator("point")(_planned_takes_latest)


# ---------------------------------------------------------------- recovery plans


class PlanOut(BaseModel):
    name: str
    document: dict[str, Any] = Field(description="the plan as stored (docs/recovery.md, 'Recovery plans')")
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class PlanFailoverIn(Request):
    type: Literal["test", "planned", "unplanned"]
    point: PointRef | None = Field(default=None, description="test and unplanned: the recovery point of every VM")
    dry_run: bool = Field(default=False, description="only list the steps the run would take")

    _point = field_validator("point")(_planned_takes_latest)


class PlanStepOut(BaseModel):
    number: int
    kind: str
    group: int
    group_name: str
    failover_type: str
    vms: list[str]
    skipped: list[str]
    script: dict[str, Any] | None
    text: str | None
    label: str


class DryRunOut(BaseModel):
    plan: str
    type: str
    text: str = Field(description="the steps, numbered, with the error policy (as `standby plan failover --dry-run`)")
    steps: list[PlanStepOut]


class PlanJobOut(BaseModel):
    job: JobOut


class ConfirmIn(Request):
    step: int = Field(ge=1, le=INT32_MAX, description="the manual action's step number (as the dry run numbers it)")


class ConfirmOut(BaseModel):
    job: JobOut
    step: int
    confirmed_by: str | None
    confirmed_at: str
