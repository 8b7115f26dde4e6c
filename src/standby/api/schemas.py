"""Request and response bodies of the REST API (docs/control-plane.md, "REST API").

Requests carry the constraints the store would otherwise refuse later (names, ranges,
enumerations), so a bad request is a 422 naming the field before anything is touched.
Operator bodies forbid unknown fields (a typo is an error, not a silently ignored
setting); agent bodies ignore them, so a newer agent can talk to an older control plane.

Integers are bounded where they reach a database column: PostgreSQL's INTEGER is 32-bit
and an unbounded value would fail in the database instead of in validation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path as PathParam
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from standby.domain.fabric import Name
from standby.store.models import (
    AGENT_KINDS,
    AUTHENTICATIONS,
    HEALTHS,
    INITIAL_REPLICATION,
    KEEP_ALL_POINTS_MAX_MINUTES,
    PLATFORMS,
    ROLES,
    SEVERITIES,
)

T = TypeVar("T")

INT32_MAX = 2**31 - 1
BYTES_MAX = 2**63 - 1  # BIGINT columns
# A discovered VM or host name: libvirt allows more than the fabric's Name, but never "/"
# (items are addressed by VM name in URL paths) nor control characters.
InventoryName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/\x00-\x1f\x7f]+$")]
# HOST:PORT, HOST a DNS name, an IPv4 address or a bracketed IPv6 address.
Address = Annotated[str, StringConstraints(max_length=255, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")]
Text = Annotated[str, StringConstraints(max_length=4000)]
ShortText = Annotated[str, StringConstraints(max_length=255)]
VersionText = Annotated[str, StringConstraints(max_length=40)]
FsPath = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
ByteCount = Annotated[int, Field(ge=0, le=BYTES_MAX)]
IdPath = Annotated[int, PathParam(ge=1, le=INT32_MAX, description="an id")]

CopyFrequency = Literal[0, 30, 300, 900]
Role = Literal[ROLES]  # type: ignore[valid-type]
Severity = Literal[SEVERITIES]  # type: ignore[valid-type]
Authentication = Literal[AUTHENTICATIONS]  # type: ignore[valid-type]
InitialReplication = Literal[INITIAL_REPLICATION]  # type: ignore[valid-type]
Platform = Literal[PLATFORMS]  # type: ignore[valid-type]
AgentKind = Literal[AGENT_KINDS]  # type: ignore[valid-type]
Health = Literal[HEALTHS]  # type: ignore[valid-type]


class Request(BaseModel):
    """An operator's request body: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class AgentRequest(BaseModel):
    """An agent's request body: unknown fields are ignored (version skew)."""

    model_config = ConfigDict(extra="ignore")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ListOut(BaseModel, Generic[T]):
    items: list[T]


class PageOut(BaseModel, Generic[T]):
    """A page of a list: `next` is the `after` of the next page (None: this was the last)."""

    items: list[T]
    next: str | None = None


class Empty(BaseModel):
    pass


# ---------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    type: str = Field(description="the StandbyError class name (the client raises the same class)")
    message: str
    exit_code: int
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorOut(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- public


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    server_time: datetime
    role: Literal["active", "passive"] = "active"
    name: str | None = None  # this control plane's name
    epoch: int | None = None  # bumped by every promotion: agents follow the highest
    active_url: str | None = None  # the active control plane, as the database says
    reason: str | None = None  # why passive
    worker: int | None = None  # the process that answered (one of `server run --workers N`)
    leader: bool | None = None  # whether it runs the scheduler and job runner


# ---------------------------------------------------------------- agents (certificate or key)


class RegisterIn(AgentRequest):
    key: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="a registration key (POST /registration-keys)"
    )
    name: Name
    kind: AgentKind = "agent"
    host: Name
    site: Name
    server: Name
    cloud: Name
    host_group: Name | None = None
    address: Address = Field(description="the agent's replication listener, HOST:PORT")
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=20000)]
    version: VersionText = ""


class RegisterOut(BaseModel):
    agent_id: int
    name: str
    cert_pem: str
    ca_pem: str
    heartbeat_seconds: float


class HeartbeatIn(AgentRequest):
    version: VersionText = ""
    storage_free_bytes: ByteCount | None = None
    storage_total_bytes: ByteCount | None = None
    facts: dict[str, Any] = Field(default_factory=dict)


class HeartbeatOut(BaseModel):
    heartbeat_seconds: float
    server_time: datetime
    epoch: int | None = None  # the control plane's epoch: agents do not follow a lower one
    fence: list[str] = Field(default_factory=list)  # VMs of this host that failed over: keep them off


class FencedIn(AgentRequest):
    vm: str = Field(min_length=1, max_length=200)
    was_running: bool
    autostart_was: bool | None = None


class BreakGlassIn(AgentRequest):
    """A break-glass failover the agent ran while no control plane answered (its record,
    `agent/breakglass.py`)."""

    vm: str = Field(min_length=1, max_length=200)
    item_id: int | None = None
    replica_vm: str = Field(min_length=1, max_length=200)
    tag: str = Field(min_length=1, max_length=128)
    point: dict[str, Any]
    overlays: dict[str, str]
    networks: list[str | None] = Field(default_factory=list)
    outcome: Literal["done", "failed"]
    started_at: float
    finished_at: float
    by: str = Field(default="", max_length=300)
    steps: list[dict[str, Any]] = Field(default_factory=list, max_length=20)


class BreakGlassOut(BaseModel):
    item_id: int
    state: str
    job_id: int | None
    already: bool


# The agent's digest of an inventory entry (`agent/inventory.py` `digest`), opaque here.
Digest = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[0-9a-f]+$")]


class VmIn(AgentRequest):
    name: InventoryName
    uuid: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    power_state: Annotated[str, StringConstraints(max_length=32)] | None = None
    disks: dict[str, Any] = Field(default_factory=dict)
    nics: list[Any] = Field(default_factory=list)
    digest: Digest | None = None


# A host's own fields: a host entry with a digest and none of these is unchanged (`brief`).
HOST_OWN_FIELDS = frozenset({"platform", "host_group", "replication_address", "storage_free_bytes", "facts"})


class HostIn(AgentRequest):
    name: InventoryName
    platform: Platform = "kvm"
    host_group: InventoryName | None = None
    replication_address: ShortText | None = Field(default=None, description="the replication IP or HOST:PORT")
    storage_free_bytes: ByteCount | None = None
    facts: dict[str, Any] = Field(default_factory=dict)
    vms: list[VmIn] = Field(default_factory=list, max_length=10000)
    digest: Digest | None = Field(default=None, description="the digest of the host's own fields")
    vm_digests: dict[InventoryName, Digest] = Field(
        default_factory=dict, max_length=10000, description="VMs unchanged since sent in full: name -> digest")

    @property
    def brief(self) -> bool:
        """Its own fields left out: the same as when the agent last sent them with `digest`."""
        return self.digest is not None and not (self.model_fields_set & HOST_OWN_FIELDS)

    @property
    def uses_digests(self) -> bool:
        return self.digest is not None or bool(self.vm_digests) or any(v.digest is not None for v in self.vms)


class InventoryIn(AgentRequest):
    hosts: list[HostIn] = Field(max_length=1000)


class SyncOut(Out):
    hosts_added: list[str]
    hosts_updated: list[str]
    hosts_removed: list[str]
    vms_added: list[str]
    vms_updated: list[str]
    vms_removed: list[str]
    vms_missing: list[str]
    vms_replaced: list[str]
    # Answered only to a report with digests (an older agent gets the fields above only):
    digests_known: bool | None = Field(default=None, description="the digests sent in full were stored")
    vms_unchanged: int | None = Field(default=None, description="VMs listed by a digest that matched")
    resend: list[str] | None = Field(default=None, description='"host/vm" to send in full')
    hosts_resend: list[str] | None = Field(default=None, description="hosts whose own fields to send in full")


class ClaimIn(AgentRequest):
    max: int = Field(default=4, ge=1, le=1000)


class TaskOut(Out):
    id: int
    kind: str
    params: dict[str, Any]
    attempt: int
    created_at: datetime


class ClaimOut(BaseModel):
    tasks: list[TaskOut]


def _truncated(limit: int) -> AfterValidator:
    # An agent whose message is too long must still get its report through: cut, not refuse.
    return AfterValidator(lambda v: v if v is None or len(v) <= limit else v[: limit - 3] + "...")


class ProgressIn(AgentRequest):
    progress: int = Field(ge=0, le=100)
    message: Annotated[str, _truncated(4000)] = ""
    bytes_done: ByteCount | None = None


class ProgressOut(BaseModel):
    cancel_requested: bool


class ResultIn(AgentRequest):
    ok: bool
    result: dict[str, Any] | None = None
    error: Annotated[str | None, _truncated(20000)] = None
    error_type: Annotated[str | None, _truncated(80)] = None


# ---------------------------------------------------------------- registration keys, tokens, agents


class RegistrationKeyIn(Request):
    description: Text = ""
    valid_days: int = Field(default=5, ge=1, le=5)


class RegistrationKeyCreated(Out):
    id: int
    key: str = Field(description="the secret: shown once, the store keeps only its hash")
    prefix: str
    expires_at: datetime


class RegistrationKeyOut(Out):
    id: int
    prefix: str
    description: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    use_count: int
    last_used_at: datetime | None


class TokenIn(Request):
    name: Name
    role: Role
    expires_days: int | None = Field(default=None, ge=1, le=3650)


class TokenCreated(Out):
    name: str
    role: str
    prefix: str
    expires_at: datetime | None
    token: str = Field(description="the secret: shown once, the store keeps only its hash")


class TokenOut(Out):
    name: str
    prefix: str
    role: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class AgentOut(Out):
    id: int
    name: str
    kind: str
    host_name: str
    address: str | None
    version: str
    state: str
    cert_fingerprint: str | None
    cert_not_after: datetime | None
    registered_at: datetime
    last_heartbeat_at: datetime | None
    heartbeat_ok: bool
    facts: dict[str, Any]


# ---------------------------------------------------------------- inventory


class SiteOut(Out):
    id: int
    name: str
    description: str
    created_at: datetime


class ServerOut(Out):
    id: int
    name: str
    site: str
    platform: str
    version: str
    created_at: datetime


class CloudOut(Out):
    id: int
    name: str
    server: str
    capabilities: list[Any]
    hosts: list[str]
    synced_at: datetime | None


class HostOut(Out):
    id: int
    name: str
    server: str | None
    host_group: str | None
    platform: str
    replication_address: str | None
    storage_free_bytes: int | None
    facts: dict[str, Any]
    synced_at: datetime | None


class VmOut(Out):
    id: int
    name: str
    host: str
    uuid: str | None
    power_state: str | None
    disks: dict[str, Any]
    nics: list[Any]
    missing_since: datetime | None
    synced_at: datetime | None
    protected_item_id: int | None


class NetworkIn(Request):
    name: Name
    site: Name | None = None


class NetworkOut(Out):
    id: int
    name: str
    site: str | None
    created_at: datetime


# ---------------------------------------------------------------- policies, pairings, mappings


class PolicySettings(Request):
    """Every setting of a policy; None leaves the default (create) or the value (update)."""

    description: Text | None = None
    copy_frequency_seconds: CopyFrequency | None = Field(
        default=None, description="30, 300 or 900 seconds, or 0 for continuous replication"
    )
    recovery_point_retention_hours: int | None = Field(default=None, ge=0, le=8760)
    app_consistent_interval_hours: int | None = Field(default=None, ge=0, le=8760)
    compression: bool | None = None
    authentication: Authentication | None = None
    replication_port: int | None = Field(default=None, ge=1, le=65535)
    initial_replication: InitialReplication | None = None
    initial_replication_at: AwareDatetime | None = None
    offline_export_path: FsPath | None = None
    offline_import_path: FsPath | None = None
    delete_replica_on_disable: bool | None = None
    rpo_alert_seconds: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="alert when the RPO exceeds this (default: 3 x copy frequency)"
    )
    keep_all_points_minutes: int | None = Field(
        default=None, ge=0, le=KEEP_ALL_POINTS_MAX_MINUTES,
        description="also keep every recovery point of the last N minutes (Standby extension; "
        "0, the default: the reference's hourly points only)",
    )


class PolicyIn(PolicySettings):
    name: Name


class PolicyPatch(PolicySettings):
    pass


class PolicyOut(Out):
    id: int
    name: str
    description: str
    copy_frequency_seconds: int
    recovery_point_retention_hours: int
    app_consistent_interval_hours: int
    compression: bool
    authentication: str
    replication_port: int
    initial_replication: str
    initial_replication_at: datetime | None
    offline_export_path: str | None
    offline_import_path: str | None
    delete_replica_on_disable: bool
    rpo_alert_seconds: int | None = None
    keep_all_points_minutes: int = Field(
        description="every recovery point of the last N minutes is kept (0: the reference's hourly points only)"
    )
    pairings: list[int]
    created_at: datetime
    updated_at: datetime


def _schedule(text: str | None) -> str | None:
    """A bandwidth schedule as domain/bandwidth.py reads it; empty: unlimited (None)."""
    from standby.domain.bandwidth import Schedule

    text = (text or "").strip()
    if not text:
        return None
    Schedule.parse(text)  # ScheduleError is a ValueError: a 422 naming the field
    return text


BandwidthSchedule = Annotated[str | None, Field(max_length=500, description=(
    'time windows and rates every replication cycle of the pair shares, e.g. '
    '"Mon-Fri 08:00-18:00=10MiB/s, otherwise unlimited"; empty or null: unlimited')), AfterValidator(_schedule)]


class PairingIn(Request):
    primary_cloud: Name
    secondary_cloud: Name
    policy: Name | None = None
    bandwidth: BandwidthSchedule = None


class PairingPatch(Request):
    bandwidth: BandwidthSchedule


class PairingPolicyIn(Request):
    policy: Name


class PairingOut(Out):
    id: int
    primary_cloud: str
    secondary_cloud: str
    policies: list[str]
    bandwidth: str | None = Field(default=None, description="the pair's bandwidth schedule (null: unlimited)")
    created_at: datetime


class MappingIn(Request):
    primary: Name
    secondary: Name


class MappingOut(Out):
    id: int
    primary: str
    secondary: str
    created_at: datetime


# ---------------------------------------------------------------- protected items and jobs


class ItemIn(Request):
    vm: InventoryName
    host: InventoryName | None = Field(default=None, description="the VM's host, when its name is not unique")
    policy: Name | None = Field(default=None, description="default: the pairing's only policy")
    secondary_host: InventoryName | None = Field(default=None, description="default: placed by the control plane")


class ItemOut(Out):
    id: int
    vm: str
    vm_id: int
    host: str
    primary_cloud: str
    secondary_cloud: str
    policy: str
    secondary_host: str | None
    state: str
    state_changed_at: datetime
    health: str
    health_reason: str
    rpo_seconds: float | None
    last_recovery_point_id: str | None
    last_recovery_point_at: datetime | None
    bytes_replicated: int
    last_cycle_at: datetime | None
    next_cycle_at: datetime | None
    error: str | None
    details: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class StepOut(Out):
    position: int
    name: str
    state: str
    progress: int
    message: str
    started_at: datetime | None
    ended_at: datetime | None


class JobOut(Out):
    id: int
    kind: str
    target: str
    state: str
    progress: int
    message: str
    error: str | None
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    payload: dict[str, Any]
    result: dict[str, Any] | None
    attempts: int
    cancel_requested_at: datetime | None
    steps: list[StepOut]


class ItemJobOut(BaseModel):
    item: ItemOut
    job: JobOut | None = None


class PointOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else the agent reports about a point

    id: str
    created_at: str | None = Field(default=None, description="ISO 8601, as the agent reports it")
    consistency: str | None = None
    kind: str | None = None


class PointsOut(BaseModel):
    item_id: int
    secondary_host: str
    points: dict[str, list[PointOut]] = Field(description="recovery points per replicated disk")


# ---------------------------------------------------------------- alerts and webhooks


class AlertOut(Out):
    id: int
    kind: str
    severity: str
    subject: str
    item_id: int | None
    agent_id: int | None
    message: str
    raised_at: datetime
    last_seen_at: datetime
    cleared_at: datetime | None


class WebhookIn(Request):
    name: Name
    url: Annotated[str, StringConstraints(min_length=8, max_length=2000, pattern=r"^https?://[^\s]+$")]
    secret: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    kinds: list[Annotated[str, StringConstraints(min_length=1, max_length=40)]] = Field(
        default_factory=list, max_length=50, description="alert kinds to send; empty: every kind"
    )
    min_severity: Severity = "info"


class WebhookOut(Out):
    id: int
    name: str
    url: str
    has_secret: bool
    enabled: bool
    kinds: list[str]
    min_severity: str
    created_at: datetime


# ---------------------------------------------------------------- status and readiness


class ItemCounts(BaseModel):
    total: int
    by_health: dict[str, int]
    by_state: dict[str, int]


class AgentStatus(BaseModel):
    name: str
    state: str
    last_heartbeat_at: datetime | None
    heartbeat_ok: bool


class StatusOut(BaseModel):
    version: str
    items: ItemCounts
    agents: list[AgentStatus]
    open_alerts: int
    running_jobs: int


class FindingOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    rule: str
    severity: str
    subject: str
    message: str
    remedy: str


class ReadinessOut(BaseModel):
    ready: bool
    profiles: list[str] = Field(default_factory=list)
    rules_run: int = 0
    summary: dict[str, int] = Field(default_factory=dict, description="findings per severity")
    findings: list[FindingOut]
