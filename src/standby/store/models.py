"""The control plane's tables (SQLAlchemy 2 typed declarative).

Aggregates and what owns them:

- inventory (`Site`, `Server`, `Cloud`, `Host`, `Vm`, `Network`): synchronized from the
  agents' discovery, per cloud (`repo.inventory.sync_cloud`);
- `Agent`, `RegistrationKey`: who may talk to the control plane;
- `Policy`, `CloudPairing`, `PolicyPairing`, `NetworkMapping`: the operator's intent;
- `ProtectedItem`: one protected VM, its lifecycle state (a string the domain state
  machine owns), health and replication progress;
- `Alert`, `Webhook`, `AlertDelivery`: alerts and their webhook outbox;
- `ApiToken`: REST API credentials;
- `Job`, `JobStep`: every operation, the source of truth for its progress;
- `AgentTask`: work handed to an agent (a replication cycle, a prune ...), pulled by it;
- `RecoveryPlan`: a recovery plan document (groups of VMs, scripts, manual actions).

Secrets (registration keys, API tokens) are stored as SHA-256 digests of random
tokens, never in clear. Enumerations the store can check (job states, roles,
severities) carry CHECK constraints built from the same Python values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from standby.store.base import Base, utcnow
from standby.store.states import JobState, StepState, in_clause

NAME = 128  # matches the fabric's Name: up to 128 characters
# SQLite reuses the largest rowid after a delete unless the table says AUTOINCREMENT;
# ids are referenced from outside (job 42, item 7): never hand one out twice.
SQLITE_NO_ID_REUSE = {"sqlite_autoincrement": True}


def _name() -> Mapped[str]:
    return mapped_column(String(NAME), unique=True)


# ---------------------------------------------------------------- inventory

PLATFORMS = ("kvm", "hyperv")


class Site(Base):
    __tablename__ = "sites"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Server(Base):
    """A site's management server (site manager for KVM, VMM for Hyper-V)."""

    __tablename__ = "servers"
    __table_args__ = (CheckConstraint(f"platform IN ({in_clause(PLATFORMS)})", name="platform"), SQLITE_NO_ID_REUSE)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    platform: Mapped[str] = mapped_column(String(16), default="kvm")
    version: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    site: Mapped[Site] = relationship()


cloud_hosts = Table(
    "cloud_hosts",
    Base.metadata,
    Column("cloud_id", ForeignKey("clouds.id", ondelete="CASCADE"), primary_key=True),
    Column("host_id", ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class Cloud(Base):
    """A protection boundary: hosts of one server; a primary cloud pairs with a secondary."""

    __tablename__ = "clouds"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="RESTRICT"), index=True)
    capabilities: Mapped[list[Any]] = mapped_column(default=list)
    synced_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    server: Mapped[Server] = relationship()
    hosts: Mapped[list[Host]] = relationship(secondary=cloud_hosts, order_by="Host.name")


class Host(Base):
    __tablename__ = "hosts"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id", ondelete="RESTRICT"), index=True)
    host_group: Mapped[str | None] = mapped_column(String(NAME))
    platform: Mapped[str] = mapped_column(String(16), default="kvm")
    replication_address: Mapped[str | None] = mapped_column(String(255))
    storage_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Everything else discovery reports (versions, CPU, roles ...), as the fabric model's JSON.
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The agent's digest of the host's entry (without its VMs) as last sent in full; None
    # when sent without one (an older agent): a digest-only report is then answered "resend".
    inventory_digest: Mapped[str | None] = mapped_column(String(64))
    synced_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    vms: Mapped[list[Vm]] = relationship(back_populates="host", order_by="Vm.name")


class Vm(Base):
    """A VM as discovery last saw it. A VM that disappears while protected is kept with
    `missing_since` set (its protected item still refers to it); others are deleted."""

    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("host_id", "name"), SQLITE_NO_ID_REUSE)

    id: Mapped[int] = mapped_column(primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(NAME), index=True)
    uuid: Mapped[str | None] = mapped_column(String(64), unique=True)
    power_state: Mapped[str | None] = mapped_column(String(32))
    disks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    nics: Mapped[list[Any]] = mapped_column(default=list)
    inventory_digest: Mapped[str | None] = mapped_column(String(64))  # as Host.inventory_digest
    missing_since: Mapped[datetime | None]
    synced_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    host: Mapped[Host] = relationship(back_populates="vms")


class Network(Base):
    """A VM network of a site (what network mappings map)."""

    __tablename__ = "networks"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    site: Mapped[Site | None] = relationship()


# ---------------------------------------------------------------- registration

AGENT_KINDS = ("agent", "server")
AGENT_STATES = ("active", "revoked")


class RegistrationKey(Base):
    """A key that lets servers and agents register until it expires (5 days by default)."""

    __tablename__ = "registration_keys"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown to operators to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str | None] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    use_count: Mapped[int] = mapped_column(default=0)
    last_used_at: Mapped[datetime | None]


class Agent(Base):
    """A registered agent (one per host) or site manager server."""

    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint(f"kind IN ({in_clause(AGENT_KINDS)})", name="kind"),
        CheckConstraint(f"state IN ({in_clause(AGENT_STATES)})", name="state"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    kind: Mapped[str] = mapped_column(String(16), default="agent")
    host_name: Mapped[str] = mapped_column(String(NAME), index=True)
    address: Mapped[str | None] = mapped_column(String(255))  # where the control plane reaches it
    version: Mapped[str] = mapped_column(String(40), default="")
    state: Mapped[str] = mapped_column(String(16), default="active")
    cert_fingerprint: Mapped[str | None] = mapped_column(String(128), unique=True)  # sha256 hex of the DER
    cert_serial: Mapped[str | None] = mapped_column(String(64))
    cert_not_after: Mapped[datetime | None]
    registration_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("registration_keys.id", ondelete="SET NULL"), index=True
    )
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime | None]
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)


# ---------------------------------------------------------------- policies, pairing, mapping

COPY_CONTINUOUS = 0  # copy_frequency_seconds value for continuous replication
COPY_FREQUENCIES = (COPY_CONTINUOUS, 30, 300, 900)
AUTHENTICATIONS = ("certificate", "kerberos")
INITIAL_REPLICATION = ("now", "scheduled", "offline")
KEEP_ALL_POINTS_MAX_MINUTES = 1440  # a day: longer history is what hourly retention is for


class Policy(Base):
    """A replication policy. Defaults follow the reference (Hyper-V Replica between VMM
    sites): copy every 5 minutes, keep only the latest recovery point, no app-consistent
    snapshots, compression on, certificate authentication, initial replication over the
    network now, keep the replica VM when protection is disabled."""

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint(f"copy_frequency_seconds IN ({', '.join(map(str, COPY_FREQUENCIES))})", name="copy_frequency"),
        CheckConstraint("recovery_point_retention_hours >= 0", name="retention"),
        CheckConstraint("app_consistent_interval_hours >= 0", name="app_consistent"),
        CheckConstraint(f"authentication IN ({in_clause(AUTHENTICATIONS)})", name="authentication"),
        CheckConstraint("replication_port BETWEEN 1 AND 65535", name="port"),
        CheckConstraint(f"initial_replication IN ({in_clause(INITIAL_REPLICATION)})", name="initial"),
        CheckConstraint(
            "initial_replication <> 'scheduled' OR initial_replication_at IS NOT NULL", name="initial_scheduled"
        ),
        CheckConstraint(
            "initial_replication <> 'offline' OR (offline_export_path IS NOT NULL AND offline_import_path IS NOT NULL)",
            name="initial_offline",
        ),
        CheckConstraint("rpo_alert_seconds IS NULL OR rpo_alert_seconds > 0", name="rpo_alert"),
        CheckConstraint(f"keep_all_points_minutes BETWEEN 0 AND {KEEP_ALL_POINTS_MAX_MINUTES}", name="keep_all_points"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    copy_frequency_seconds: Mapped[int] = mapped_column(default=300)
    recovery_point_retention_hours: Mapped[int] = mapped_column(default=0)
    app_consistent_interval_hours: Mapped[int] = mapped_column(default=0)
    compression: Mapped[bool] = mapped_column(default=True)
    authentication: Mapped[str] = mapped_column(String(16), default="certificate")
    replication_port: Mapped[int] = mapped_column(default=7443)
    initial_replication: Mapped[str] = mapped_column(String(16), default="now")
    initial_replication_at: Mapped[datetime | None]
    offline_export_path: Mapped[str | None] = mapped_column(Text)
    offline_import_path: Mapped[str | None] = mapped_column(Text)
    delete_replica_on_disable: Mapped[bool] = mapped_column(default=False)
    # RPO above this raises an rpo_breach alert; None: 3 x the copy frequency (60 s when continuous).
    rpo_alert_seconds: Mapped[int | None]
    # Standby extension: retention also keeps every point of the last N minutes, so the last
    # few cycles stay selectable for a failover (0: the reference's hourly points only).
    keep_all_points_minutes: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    pairings: Mapped[list[CloudPairing]] = relationship(
        secondary="policy_pairings", back_populates="policies", order_by="CloudPairing.id"
    )

    @property
    def continuous(self) -> bool:
        return self.copy_frequency_seconds == COPY_CONTINUOUS


class CloudPairing(Base):
    """A primary cloud paired with a secondary cloud (one pairing per primary cloud)."""

    __tablename__ = "cloud_pairings"
    __table_args__ = (CheckConstraint("primary_cloud_id <> secondary_cloud_id", name="distinct"), SQLITE_NO_ID_REUSE)

    id: Mapped[int] = mapped_column(primary_key=True)
    primary_cloud_id: Mapped[int] = mapped_column(ForeignKey("clouds.id", ondelete="RESTRICT"), unique=True)
    secondary_cloud_id: Mapped[int] = mapped_column(ForeignKey("clouds.id", ondelete="RESTRICT"), index=True)
    # time windows and rates every replication cycle of the pair shares (domain/bandwidth.py); None: unlimited
    bandwidth_schedule: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    primary: Mapped[Cloud] = relationship(foreign_keys=[primary_cloud_id])
    secondary: Mapped[Cloud] = relationship(foreign_keys=[secondary_cloud_id])
    policies: Mapped[list[Policy]] = relationship(
        secondary="policy_pairings", back_populates="pairings", order_by="Policy.name"
    )


class PolicyPairing(Base):
    """A policy associated with a pairing. Protected items refer to the association, so it
    cannot be removed while an item uses it."""

    __tablename__ = "policy_pairings"

    pairing_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairings.id", ondelete="CASCADE"), primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NetworkMapping(Base):
    """A primary VM network mapped to a secondary one (one mapping per primary network)."""

    __tablename__ = "network_mappings"
    __table_args__ = (
        CheckConstraint("primary_network_id <> secondary_network_id", name="distinct"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    primary_network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="RESTRICT"), unique=True)
    secondary_network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    primary: Mapped[Network] = relationship(foreign_keys=[primary_network_id])
    secondary: Mapped[Network] = relationship(foreign_keys=[secondary_network_id])


# ---------------------------------------------------------------- protected items

HEALTHS = ("normal", "warning", "critical")


class ProtectedItem(Base):
    """A protected VM. `state` is the lifecycle state owned by the domain state machine;
    the store keeps it as a string and changes it with compare-and-set
    (`repo.items.set_state`)."""

    __tablename__ = "protected_items"
    __table_args__ = (
        ForeignKeyConstraint(
            ["pairing_id", "policy_id"],
            ["policy_pairings.pairing_id", "policy_pairings.policy_id"],
            ondelete="RESTRICT",
            name="fk_protected_items_association",
        ),
        CheckConstraint(f"health IN ({in_clause(HEALTHS)})", name="health"),
        CheckConstraint("bytes_replicated >= 0", name="bytes"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="RESTRICT"), unique=True)
    pairing_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairings.id", ondelete="RESTRICT"), index=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="RESTRICT"), index=True)
    secondary_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    state: Mapped[str] = mapped_column(String(40), default="ready", index=True)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    health: Mapped[str] = mapped_column(String(16), default="normal")
    health_reason: Mapped[str] = mapped_column(Text, default="")
    last_recovery_point_id: Mapped[str | None] = mapped_column(String(80))
    last_recovery_point_at: Mapped[datetime | None]
    rpo_seconds: Mapped[float | None]
    bytes_replicated: Mapped[int] = mapped_column(BigInteger, default=0)
    last_cycle_at: Mapped[datetime | None]
    next_cycle_at: Mapped[datetime | None] = mapped_column(index=True)  # the scheduler's queue
    error: Mapped[str | None] = mapped_column(Text)
    # Agent-side details: replica path, disks chosen, offline seed location ...
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    vm: Mapped[Vm] = relationship()
    pairing: Mapped[CloudPairing] = relationship()
    policy: Mapped[Policy] = relationship()
    secondary_host: Mapped[Host | None] = relationship()


# ---------------------------------------------------------------- alerts and webhooks

SEVERITIES = ("info", "warning", "critical")
DELIVERY_EVENTS = ("raised", "cleared")
DELIVERY_STATES = ("pending", "delivered", "failed")


class Alert(Base):
    """An alert (kind: rpo_breach, resync_required, heartbeat_lost, secondary_storage_low,
    ...). At most one alert per (kind, subject) is open: `open_key` holds "kind|subject"
    while open and NULL once cleared, under a unique constraint."""

    __tablename__ = "alerts"
    __table_args__ = (CheckConstraint(f"severity IN ({in_clause(SEVERITIES)})", name="severity"), SQLITE_NO_ID_REUSE)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(255), index=True)  # e.g. "item:web01", "agent:host-a"
    item_id: Mapped[int | None] = mapped_column(ForeignKey("protected_items.id", ondelete="SET NULL"), index=True)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"), index=True)
    message: Mapped[str] = mapped_column(Text)
    raised_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column(index=True)
    open_key: Mapped[str | None] = mapped_column(String(300), unique=True)

    deliveries: Mapped[list[AlertDelivery]] = relationship(
        back_populates="alert", order_by="AlertDelivery.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Webhook(Base):
    """Where alerts are posted. `secret` signs the payload (HMAC), so it is kept in clear."""

    __tablename__ = "webhooks"
    __table_args__ = (
        CheckConstraint(f"min_severity IN ({in_clause(SEVERITIES)})", name="min_severity"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(default=True)
    kinds: Mapped[list[Any]] = mapped_column(default=list)  # empty: every kind
    min_severity: Mapped[str] = mapped_column(String(16), default="info")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertDelivery(Base):
    """One alert event for one webhook: the outbox a delivery worker drains."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "webhook_id", "event"),
        CheckConstraint(f"event IN ({in_clause(DELIVERY_EVENTS)})", name="event"),
        CheckConstraint(f"state IN ({in_clause(DELIVERY_STATES)})", name="state"),
        Index("ix_alert_deliveries_state_next", "state", "next_attempt_at"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    alert: Mapped[Alert] = relationship(back_populates="deliveries")
    webhook: Mapped[Webhook] = relationship()


# ---------------------------------------------------------------- API tokens

ROLES = ("operator", "viewer")


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(f"role IN ({in_clause(ROLES)})", name="role"), SQLITE_NO_ID_REUSE)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


# ---------------------------------------------------------------- the control plane's role


class ControlPlaneState(Base):
    """One row: which control plane is active and at which epoch. Replicated with the rest
    of the database to the standby site's control plane; a promotion bumps the epoch,
    and agents follow the control plane with the highest (`orchestration/role.py`)."""

    __tablename__ = "control_plane_state"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"), CheckConstraint("epoch >= 1", name="epoch"))

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    active_name: Mapped[str | None] = mapped_column(String(NAME))
    active_url: Mapped[str | None] = mapped_column(String(512))
    # the running instance (`server run`, all its workers) whose leader holds the lock: its
    # other workers serve changes too, another instance of the same name does not
    active_instance: Mapped[str | None] = mapped_column(String(64))
    active_since: Mapped[datetime | None]
    seen_at: Mapped[datetime | None]


# ---------------------------------------------------------------- jobs


class Job(Base):
    """An operation. The row is the source of truth: a runner reads it, moves it through
    `states.JOB_TRANSITIONS` with compare-and-set updates (`repo.jobs`), and a restarted
    control plane finds every job that had not ended (`repo.jobs.recover_at_startup`)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN ({in_clause(JobState)})", name="state"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(60), index=True)
    target: Mapped[str] = mapped_column(String(255), default="", index=True)  # e.g. "item:7"
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    progress: Mapped[int] = mapped_column(default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # What a runner needs to (re)start the work; resumable jobs are requeued after a restart.
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None]
    resumable: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    runner: Mapped[str | None] = mapped_column(String(255))  # who runs it (host:pid)
    cancel_requested_at: Mapped[datetime | None]

    steps: Mapped[list[JobStep]] = relationship(
        back_populates="job",
        order_by="JobStep.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )


class JobStep(Base):
    __tablename__ = "job_steps"
    __table_args__ = (
        UniqueConstraint("job_id", "position"),
        CheckConstraint(f"state IN ({in_clause(StepState)})", name="state"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int]
    name: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default=StepState.PENDING.value)
    progress: Mapped[int] = mapped_column(default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="steps")


# ---------------------------------------------------------------- agent tasks

TASK_STATES = ("queued", "claimed", "succeeded", "failed", "cancelled", "expired")
TASK_OPEN_STATES = ("queued", "claimed")
TASK_KINDS = ("cycle", "prune", "delete_replica", "list_points", "seed_export", "seed_import")


class AgentTask(Base):
    """Work for one agent, which pulls it (`repo.tasks.claim`) and reports the result.

    Open while queued or claimed; a task not finished by `deadline_at` expires. `kind`
    is not constrained by the database (new kinds need no migration); `TASK_KINDS` lists
    the contract's."""

    __tablename__ = "agent_tasks"
    __table_args__ = (
        CheckConstraint(f"state IN ({in_clause(TASK_STATES)})", name="state"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        CheckConstraint("attempt >= 0", name="attempt"),
        # claim: an agent's open tasks; expire: open tasks by deadline; purge: old finished ones.
        Index("ix_agent_tasks_agent_state", "agent_id", "state"),
        Index("ix_agent_tasks_state_deadline", "state", "deadline_at"),
        Index("ix_agent_tasks_item_kind_state", "item_id", "kind", "state"),
        SQLITE_NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempt: Mapped[int] = mapped_column(default=0)
    progress: Mapped[int] = mapped_column(default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    bytes_done: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(80))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("protected_items.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None] = mapped_column(index=True)
    deadline_at: Mapped[datetime]
    cancel_requested_at: Mapped[datetime | None]

    agent: Mapped[Agent] = relationship()

    @property
    def is_open(self) -> bool:
        return self.state in TASK_OPEN_STATES


# ---------------------------------------------------------------- recovery plans


class RecoveryPlan(Base):
    """A recovery plan as the operator wrote it (`domain.plans.load_plan` validates the
    document before it is stored; a run reads it back and expands it)."""

    __tablename__ = "recovery_plans"
    __table_args__ = (SQLITE_NO_ID_REUSE,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = _name()
    document: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str | None] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
