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
`CycleParams`. Unknown fields are ignored on both sides (version skew).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_REPORTS_PER_BATCH = 500
_BAD_ID = re.compile(r"[^A-Za-z0-9._-]")


def disk_id_for(vm: str, target: str) -> str:
    """The replica disk id of a VM's disk: `<vm>-<target>`, made a valid identifier. The
    control plane (items' disk ids) and the agents (their replicas) must agree on it."""
    raw = _BAD_ID.sub("_", f"{vm}-{target}").lstrip("._-") or "disk"
    return raw[:128]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


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

    item_id: int | None = None
    vm: str = Field(min_length=1, max_length=200)
    peer: Peer
    consistency: Literal["crash", "app", "auto"] = "auto"
    compress: bool | Literal["on", "off", "auto"] = True
    force_hash_scan: bool = False
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    disk_ids: dict[str, str] | None = None  # target -> replica disk id (reverse replication)
    recovery: Recovery = Field(default_factory=Recovery)
    final_sync: bool = False


class DesiredVm(_Model):
    """A VM the agent replicates on its own timers."""

    item_id: int
    state: str  # the item's lifecycle state (initial replication, protected, resynchronizing ...)
    cycle: CycleParams
    copy_frequency_seconds: int = Field(ge=0)  # 0: continuous (a cycle as soon as the last ended)
    app_consistent_interval_hours: int = Field(default=0, ge=0)
    run_now: int = 0  # bumped by "replicate now": a cycle at once when it changes
    start_at: float | None = None  # a scheduled initial replication: not before this (Unix time)


class DesiredReplica(_Model):
    """Replica disks the agent holds as a secondary: it prunes them by this retention."""

    item_id: int
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
    item_id: int
    vm: str = Field(min_length=1, max_length=200)
    ok: bool
    started_at: float
    finished_at: float
    scanned: bool = False  # every block compared (a resync's hash scan)
    consistency: Literal["crash", "app"] | None = None
    result: dict[str, Any] = Field(default_factory=dict)  # the cycle task's result shape (points, point_at ...)
    error: str | None = Field(default=None, max_length=20000)
    error_type: str | None = Field(default=None, max_length=80)


class ReportBatch(_Model):
    desired_version: str | None = None  # the desired state the agent runs under
    active: list[int] = Field(default_factory=list)  # items it replicates now
    running: list[int] = Field(default_factory=list)  # items with a cycle in flight now
    cycles: list[CycleReport] = Field(default_factory=list, max_length=MAX_REPORTS_PER_BATCH)


class ReportAck(_Model):
    applied: int = 0
    ignored: int = 0  # already applied, or for an item that is gone
    desired_version: str | None = None  # the current desired state's version (the agent fetches a newer one)
