"""The contract between the control plane and its agents, typed: what both sides import.

Desired state down, reports up (docs/control-plane.md, "Agents own their cycles"):

- `DesiredState` (GET /agent/desired, long-polled): the VMs an agent replicates, each
  with what its cycles need (`CycleParams`, the policy's timing), the replicas it holds
  and their retention, and the bandwidth schedule its cycles share. Versioned by a digest
  of its content: the agent asks with the version it has and gets a new one as soon as
  anything in it changes.
- `ReportBatch` (POST /agent/reports): the cycles the agent ran since its last report
  (`CycleReport`: points made, bytes, time, errors), the VMs it replicates now and those
  with a cycle in flight. The control plane derives items' recovery points, RPO, health
  and alerts from them; a report sent twice is applied once.

A `cycle` task (a final sync, or an agent that does not own its cycles) carries the same
`CycleParams`; every other task kind's parameters are a `TaskParams` model here too
(`PruneParams`, `MaterializeParams` ...): the control plane builds them with `build_params`
and the agent reads them with `parse_params`, so both check the same rules. Unknown fields
are ignored on both sides (version skew).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, StrictBool, \
    ValidationError, ValidationInfo, field_validator

from standby.errors import BadInput
from standby.replication.protocol import valid_id

MAX_REPORTS_PER_BATCH = 500
_BAD_ID = re.compile(r"[^A-Za-z0-9._-]")


def disk_id_for(vm: str, target: str) -> str:
    """The replica disk id of a VM's disk: `<vm>-<target>`, made a valid identifier. The
    control plane (items' disk ids) and the agents (their replicas) must agree on it."""
    raw = _BAD_ID.sub("_", f"{vm}-{target}").lstrip("._-") or "disk"
    return raw[:128]


# What the store can hold: items' ids are 32-bit keys, times datetimes (years 1970 to 9999).
ItemId = Annotated[int, Field(ge=1, le=2**31 - 1)]
UnixTime = Annotated[float, Field(ge=0, le=253402300799)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


M = TypeVar("M", bound=BaseModel)


def parse_params(model: type[M], params: Mapping[str, Any]) -> M:
    """A task's parameters as `model`; BadInput naming the parameter at fault (the first)."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        field, *inner = [str(p) for p in err["loc"] if p != "[key]"] or ["?"]
        where = f"task parameter {field!r}" + (f" ({'.'.join(inner)})" if inner else "")
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "missing" else f", not {repr(err['input'])[:200]}"
        raise BadInput(f"{where}: {msg}{got}") from None


def build_params(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """A task's parameters as sent: the fields given (nulls left out, no defaults added), in
    JSON, checked as the agent checks them."""
    return params_of(parse_params(model, fields))


def params_of(params: BaseModel) -> dict[str, Any]:
    """Parameters already checked, as sent (`build_params`' shape)."""
    return params.model_dump(mode="json", exclude_unset=True, exclude_none=True)


# ---------------------------------------------------------------------------- the rules of task parameters

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TARGET = re.compile(r"^(vd|sd|hd|xvd)[a-z]{1,3}$")


def _rule(ok: Any, what: str) -> AfterValidator:
    def check(v: str) -> str:
        if not ok(v):
            raise ValueError(f"must be {what}")
        return v
    return AfterValidator(check)


def _unique_values(v: dict[str, str]) -> dict[str, str]:
    if len(set(v.values())) != len(v):
        raise ValueError("names a replica disk twice")
    return v


NonEmpty = Annotated[str, Field(min_length=1)]
# A domain or network name: no '/' (a path), no surrounding blanks.
Name = Annotated[str, _rule(lambda v: 0 < len(v) <= 200 and "/" not in v and v == v.strip(),
                            "a VM or network name")]
Tag = Annotated[str, _rule(_TAG.fullmatch, "a name (letters, digits and _.-, at most 128)")]
DiskId = Annotated[str, _rule(valid_id, "a disk id (letters, digits, '.', '_', '-'; at most 128; starts with "
                                        "a letter or digit)")]
Target = Annotated[str, _rule(_TARGET.fullmatch, "a disk target such as vda or sdb")]
AbsPath = Annotated[str, _rule(lambda v: bool(v) and os.path.isabs(v), "an absolute path")]
Number = Annotated[float, Field(ge=0)]
# Seconds a VM task may wait (null: the default).
Timeout = Annotated[float, BeforeValidator(lambda v: 60.0 if v is None else v), Field(ge=0, le=86400)]
DiskIds = Annotated[list[DiskId], AfterValidator(lambda v: list(dict.fromkeys(v)))]  # repeats dropped
SomeDiskIds = Annotated[DiskIds, Field(min_length=1)]
DiskIdMap = Annotated[dict[Target, DiskId], Field(min_length=1), AfterValidator(_unique_values)]


def _compress(v: Any) -> Any:
    if v is None or isinstance(v, bool) or v in ("on", "off", "auto"):
        return v
    raise ValueError("must be true, false, 'on', 'off' or 'auto'")


_COMPRESS = bool | Literal["on", "off", "auto"] | None
# One check, not a union's (whose errors would be one per type): a yes/no or a mode.
Compress = Annotated[_COMPRESS, PlainValidator(_compress, json_schema_input_type=_COMPRESS)]


class Peer(_Model):
    """The agent a cycle sends to (its replication address, HOST:PORT)."""

    name: str = Field(min_length=1, max_length=200)
    address: str = Field(min_length=1, max_length=300)


class Recovery(_Model):
    """What the cycle's points carry for a failover without the control plane."""

    network_map: dict[str, str | None] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)


class CycleParams(_Model):
    """One VM's replication cycle: the `cycle` task's parameters, and the desired state's."""

    item_id: ItemId | None = None
    vm: str = Field(min_length=1, max_length=200)
    peer: Peer
    consistency: Literal["crash", "app", "auto"] = "auto"
    compress: Compress = True
    force_hash_scan: bool = False
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    disk_ids: DiskIdMap | None = None  # target -> replica disk id (reverse replication)
    recovery: Recovery = Field(default_factory=Recovery)
    final_sync: bool = False

    @property
    def compress_mode(self) -> Literal["on", "off", "auto"]:
        # The policy's `compression` is a yes/no; yes means the sender's adaptive mode, which
        # compresses while the link is the bottleneck (never on a link faster than zstd).
        if self.compress is None or self.compress is True:
            return "auto"
        return "off" if self.compress is False else self.compress


class DesiredVm(_Model):
    """A VM the agent replicates on its own timers."""

    item_id: ItemId
    state: str  # the item's lifecycle state (initial replication, protected, resynchronizing ...)
    cycle: CycleParams
    copy_frequency_seconds: int = Field(ge=0)  # 0: continuous (a cycle as soon as the last ended)
    app_consistent_interval_hours: int = Field(default=0, ge=0)
    run_now: int = 0  # bumped by "replicate now": a cycle at once when it changes
    start_at: UnixTime | None = None  # a scheduled initial replication: not before this (Unix time)


class DesiredReplica(_Model):
    """Replica disks the agent holds as a secondary: it prunes them by this retention."""

    item_id: ItemId
    disk_ids: list[str]
    retention_hours: int = Field(ge=0)
    app_consistent_interval_hours: int = Field(default=0, ge=0)
    keep_all_points_minutes: int = Field(default=0, ge=0)


class DesiredState(_Model):
    version: str = ""
    agent: str
    vms: list[DesiredVm] = Field(default_factory=list)
    replicas: list[DesiredReplica] = Field(default_factory=list)
    bandwidth: str | None = None  # the site pair's schedule ("08:00-18:00=10MiB/s"), shared by every cycle

    def with_version(self) -> DesiredState:
        """This state with its version: a digest of everything else in it."""
        body = self.model_dump(exclude={"version"}, mode="json")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]
        return self.model_copy(update={"version": digest})


class CycleReport(_Model):
    """One cycle an agent ran on its own timer, as the control plane applies it."""

    cycle_id: str = Field(min_length=1, max_length=128)  # unique per cycle: a report sent twice is applied once
    item_id: ItemId
    vm: str = Field(min_length=1, max_length=200)
    ok: bool
    started_at: UnixTime
    finished_at: UnixTime
    scanned: bool = False  # every block compared (a resync's hash scan)
    consistency: Literal["crash", "app"] | None = None
    result: dict[str, Any] = Field(default_factory=dict)  # the cycle task's result shape (points, point_at ...)
    error: str | None = Field(default=None, max_length=20000)
    error_type: str | None = Field(default=None, max_length=80)


class ReportBatch(_Model):
    desired_version: str | None = None  # the desired state the agent runs under
    active: list[ItemId] = Field(default_factory=list)  # items it replicates now
    running: list[ItemId] = Field(default_factory=list)  # items with a cycle in flight now
    cycles: list[CycleReport] = Field(default_factory=list, max_length=MAX_REPORTS_PER_BATCH)


class ReportAck(_Model):
    applied: int = 0
    ignored: int = 0  # already applied, or for an item that is gone
    desired_version: str | None = None  # the current desired state's version (the agent fetches a newer one)


# ---------------------------------------------------------------------------- task parameters


class TaskParams(_Model):
    """A task's parameters: JSON types as sent, nothing coerced (a string is no number, 1 no boolean)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class DiskIdsParams(TaskParams):
    """`delete_replica` and `list_points`: replica disks."""

    disk_ids: SomeDiskIds


class PruneParams(DiskIdsParams):
    """Retention of replica disks (`domain.retention`); `keep`: {disk_id: point_id} kept whatever it says."""

    retention_hours: Number | None = 0.0
    app_consistent_interval_hours: Number | None = 0.0
    app_consistent_hours: Number | None = None  # narrows the window app-consistent points are kept in
    keep_all_minutes: Number | None = 0.0
    keep: dict[str, NonEmpty] | None = None


def prune_params(disk_ids: list[str], retention_hours: int, app_consistent_interval_hours: int,
                 keep_all_points_minutes: int = 0) -> dict[str, Any]:
    """A prune task's parameters for a policy. The retention rules (`domain.retention`) keep
    the last minutes' points only inside the retention window, and nothing but the latest
    point with no window: the window sent is widened to cover them. That widening keeps
    nothing else (whatever else falls in the wider window is within those minutes), so the
    agent keeps exactly the policy's hourly points plus every point of the last minutes."""
    window_hours: float = retention_hours
    if keep_all_points_minutes > 0:
        window_hours = max(retention_hours, keep_all_points_minutes / 60)
    return build_params(PruneParams, disk_ids=disk_ids, retention_hours=window_hours,
                        app_consistent_interval_hours=app_consistent_interval_hours,
                        keep_all_minutes=keep_all_points_minutes)


class SeedExportParams(TaskParams):
    """An offline seed of a VM's disks (all, or `disk_ids`) under `path/<disk_id>/`."""

    vm: NonEmpty
    path: NonEmpty
    disk_ids: DiskIds | None = None
    consistency: Literal["crash", "app", "auto"] = "auto"


class SeedImportParams(TaskParams):
    """`path/<disk_id>/` imported as each disk's first point."""

    vm: str | None = None  # sent with it; the import needs only the disks
    path: NonEmpty
    disk_ids: SomeDiskIds


class MaterializeParams(TaskParams):
    """Overlays of a VM's disks over recovery points (default each disk's latest), under `tag`."""

    vm: Name
    disk_ids: DiskIdMap  # target -> replica disk id
    point: dict[str, NonEmpty] | None = None  # replica disk id -> point id
    purpose: Literal["test", "failover"] = "failover"
    tag: Tag

    @field_validator("point")
    @classmethod
    def _points_of_these_disks(cls, v: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        unknown = set(v or {}) - set((info.data.get("disk_ids") or {}).values())
        if unknown:
            raise ValueError(f"names disks that are not in 'disk_ids' ({', '.join(sorted(unknown))})")
        return v


class ReleaseParams(TaskParams):
    tag: Tag


class NamedParams(TaskParams):
    """`create_network`, `delete_network`: a network by name."""

    name: Name


class VmParams(NamedParams):
    """`undefine_vm`, and the base of the other VM tasks."""

    timeout_seconds: Timeout = 60.0


class StartVmParams(VmParams):
    autostart: StrictBool = False


class StopVmParams(VmParams):
    """Graceful shutdown, powered off at `timeout_seconds` (0 or `force`: at once)."""

    force: StrictBool = False
    disable_autostart: StrictBool = False


class DefineVmParams(TaskParams):
    """A VM on disk images (`disks`: target -> path), shaped like `template_xml`; NICs on
    `networks` (a name or null each), or all on `isolated_network` (a test VM)."""

    name: Name
    template_xml: str | None = None
    disks: Annotated[dict[Target, NonEmpty], Field(min_length=1)]
    networks: list[NonEmpty | None] | None = None
    isolated_network: Name | None = None

    @field_validator("template_xml")
    @classmethod
    def _xml(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be the source domain's XML")
        return v


class AdoptDiskParams(TaskParams):
    """An image (file or block device) taken into replica `disk_id` as its latest point."""

    disk_id: DiskId
    image: AbsPath


class RestoreDiskParams(AdoptDiskParams):
    """A point of replica `disk_id` (default its latest) written over an image."""

    point: NonEmpty | None = None
