"""Initial schema: inventory, agents and registration keys, policies, pairings and
mappings, protected items, alerts and webhooks, API tokens, jobs and their steps.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('operator', 'viewer')", name=op.f("ck_api_tokens_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=60), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("resumable", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(length=255), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('cancelled', 'errored', 'failed', 'queued', 'running', 'succeeded')", name=op.f("ck_jobs_state")
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_jobs_progress")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_jobs_kind"), "jobs", ["kind"])
    op.create_index(op.f("ix_jobs_state"), "jobs", ["state"])
    op.create_index(op.f("ix_jobs_target"), "jobs", ["target"])

    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("copy_frequency_seconds", sa.Integer(), nullable=False),
        sa.Column("recovery_point_retention_hours", sa.Integer(), nullable=False),
        sa.Column("app_consistent_interval_hours", sa.Integer(), nullable=False),
        sa.Column("compression", sa.Boolean(), nullable=False),
        sa.Column("authentication", sa.String(length=16), nullable=False),
        sa.Column("replication_port", sa.Integer(), nullable=False),
        sa.Column("initial_replication", sa.String(length=16), nullable=False),
        sa.Column("initial_replication_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("offline_export_path", sa.Text(), nullable=True),
        sa.Column("offline_import_path", sa.Text(), nullable=True),
        sa.Column("delete_replica_on_disable", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("authentication IN ('certificate', 'kerberos')", name=op.f("ck_policies_authentication")),
        sa.CheckConstraint(
            "initial_replication <> 'offline' OR (offline_export_path IS NOT NULL AND offline_import_path IS NOT NULL)",
            name=op.f("ck_policies_initial_offline"),
        ),
        sa.CheckConstraint(
            "initial_replication <> 'scheduled' OR initial_replication_at IS NOT NULL",
            name=op.f("ck_policies_initial_scheduled"),
        ),
        sa.CheckConstraint("initial_replication IN ('now', 'offline', 'scheduled')", name=op.f("ck_policies_initial")),
        sa.CheckConstraint("app_consistent_interval_hours >= 0", name=op.f("ck_policies_app_consistent")),
        sa.CheckConstraint("copy_frequency_seconds IN (0, 30, 300, 900)", name=op.f("ck_policies_copy_frequency")),
        sa.CheckConstraint("recovery_point_retention_hours >= 0", name=op.f("ck_policies_retention")),
        sa.CheckConstraint("replication_port BETWEEN 1 AND 65535", name=op.f("ck_policies_port")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
        sa.UniqueConstraint("name", name=op.f("uq_policies_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "registration_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("use_count", sa.Integer(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registration_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_registration_keys_key_hash")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("name", name=op.f("uq_sites_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(length=255), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("min_severity", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("min_severity IN ('critical', 'info', 'warning')", name=op.f("ck_webhooks_min_severity")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.UniqueConstraint("name", name=op.f("uq_webhooks_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("host_name", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=True),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("cert_fingerprint", sa.String(length=128), nullable=True),
        sa.Column("cert_serial", sa.String(length=64), nullable=True),
        sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("registration_key_id", sa.Integer(), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('agent', 'server')", name=op.f("ck_agents_kind")),
        sa.CheckConstraint("state IN ('active', 'revoked')", name=op.f("ck_agents_state")),
        sa.ForeignKeyConstraint(
            ["registration_key_id"],
            ["registration_keys.id"],
            name=op.f("fk_agents_registration_key_id"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("cert_fingerprint", name=op.f("uq_agents_cert_fingerprint")),
        sa.UniqueConstraint("name", name=op.f("uq_agents_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_agents_host_name"), "agents", ["host_name"])
    op.create_index(op.f("ix_agents_registration_key_id"), "agents", ["registration_key_id"])

    op.create_table(
        "job_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('cancelled', 'errored', 'failed', 'pending', 'running', 'skipped', 'succeeded')",
            name=op.f("ck_job_steps_state"),
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_job_steps_progress")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_steps_job_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_steps")),
        sa.UniqueConstraint("job_id", "position", name=op.f("uq_job_steps_job_id_position")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_networks_site_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_networks")),
        sa.UniqueConstraint("name", name=op.f("uq_networks_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_networks_site_id"), "networks", ["site_id"])

    op.create_table(
        "servers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("platform IN ('hyperv', 'kvm')", name=op.f("ck_servers_platform")),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_servers_site_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_servers")),
        sa.UniqueConstraint("name", name=op.f("uq_servers_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_servers_site_id"), "servers", ["site_id"])

    op.create_table(
        "clouds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("server_id", sa.Integer(), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_clouds_server_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clouds")),
        sa.UniqueConstraint("name", name=op.f("uq_clouds_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_clouds_server_id"), "clouds", ["server_id"])

    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("server_id", sa.Integer(), nullable=True),
        sa.Column("host_group", sa.String(length=128), nullable=True),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("replication_address", sa.String(length=255), nullable=True),
        sa.Column("storage_free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_hosts_server_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_hosts_server_id"), "hosts", ["server_id"])

    op.create_table(
        "network_mappings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("primary_network_id", sa.Integer(), nullable=False),
        sa.Column("secondary_network_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("primary_network_id <> secondary_network_id", name=op.f("ck_network_mappings_distinct")),
        sa.ForeignKeyConstraint(
            ["primary_network_id"],
            ["networks.id"],
            name=op.f("fk_network_mappings_primary_network_id"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["secondary_network_id"],
            ["networks.id"],
            name=op.f("fk_network_mappings_secondary_network_id"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_network_mappings")),
        sa.UniqueConstraint("primary_network_id", name=op.f("uq_network_mappings_primary_network_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_network_mappings_secondary_network_id"), "network_mappings", ["secondary_network_id"])

    op.create_table(
        "cloud_hosts",
        sa.Column("cloud_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["cloud_id"], ["clouds.id"], name=op.f("fk_cloud_hosts_cloud_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_cloud_hosts_host_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("cloud_id", "host_id", name=op.f("pk_cloud_hosts")),
    )
    op.create_index(op.f("ix_cloud_hosts_host_id"), "cloud_hosts", ["host_id"])

    op.create_table(
        "cloud_pairings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("primary_cloud_id", sa.Integer(), nullable=False),
        sa.Column("secondary_cloud_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("primary_cloud_id <> secondary_cloud_id", name=op.f("ck_cloud_pairings_distinct")),
        sa.ForeignKeyConstraint(
            ["primary_cloud_id"], ["clouds.id"], name=op.f("fk_cloud_pairings_primary_cloud_id"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["secondary_cloud_id"],
            ["clouds.id"],
            name=op.f("fk_cloud_pairings_secondary_cloud_id"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloud_pairings")),
        sa.UniqueConstraint("primary_cloud_id", name=op.f("uq_cloud_pairings_primary_cloud_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_cloud_pairings_secondary_cloud_id"), "cloud_pairings", ["secondary_cloud_id"])

    op.create_table(
        "vms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("uuid", sa.String(length=64), nullable=True),
        sa.Column("power_state", sa.String(length=32), nullable=True),
        sa.Column("disks", sa.JSON(), nullable=False),
        sa.Column("nics", sa.JSON(), nullable=False),
        sa.Column("missing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_vms_host_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vms")),
        sa.UniqueConstraint("host_id", "name", name=op.f("uq_vms_host_id_name")),
        sa.UniqueConstraint("uuid", name=op.f("uq_vms_uuid")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_vms_name"), "vms", ["name"])

    op.create_table(
        "policy_pairings",
        sa.Column("pairing_id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["pairing_id"], ["cloud_pairings.id"], name=op.f("fk_policy_pairings_pairing_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"], ["policies.id"], name=op.f("fk_policy_pairings_policy_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pairing_id", "policy_id", name=op.f("pk_policy_pairings")),
    )
    op.create_index(op.f("ix_policy_pairings_policy_id"), "policy_pairings", ["policy_id"])

    op.create_table(
        "protected_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("pairing_id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=False),
        sa.Column("secondary_host_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=40), nullable=False),
        sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("health_reason", sa.Text(), nullable=False),
        sa.Column("last_recovery_point_id", sa.String(length=80), nullable=True),
        sa.Column("last_recovery_point_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rpo_seconds", sa.Double(), nullable=True),
        sa.Column("bytes_replicated", sa.BigInteger(), nullable=False),
        sa.Column("last_cycle_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_cycle_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("health IN ('critical', 'normal', 'warning')", name=op.f("ck_protected_items_health")),
        sa.CheckConstraint("bytes_replicated >= 0", name=op.f("ck_protected_items_bytes")),
        sa.ForeignKeyConstraint(
            ["pairing_id", "policy_id"],
            ["policy_pairings.pairing_id", "policy_pairings.policy_id"],
            name="fk_protected_items_association",
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["pairing_id"], ["cloud_pairings.id"], name=op.f("fk_protected_items_pairing_id"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"], ["policies.id"], name=op.f("fk_protected_items_policy_id"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["secondary_host_id"], ["hosts.id"], name=op.f("fk_protected_items_secondary_host_id"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name=op.f("fk_protected_items_vm_id"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_protected_items")),
        sa.UniqueConstraint("vm_id", name=op.f("uq_protected_items_vm_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_protected_items_next_cycle_at"), "protected_items", ["next_cycle_at"])
    op.create_index(op.f("ix_protected_items_pairing_id"), "protected_items", ["pairing_id"])
    op.create_index(op.f("ix_protected_items_policy_id"), "protected_items", ["policy_id"])
    op.create_index(op.f("ix_protected_items_secondary_host_id"), "protected_items", ["secondary_host_id"])
    op.create_index(op.f("ix_protected_items_state"), "protected_items", ["state"])

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=True),
        sa.Column("agent_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("open_key", sa.String(length=300), nullable=True),
        sa.CheckConstraint("severity IN ('critical', 'info', 'warning')", name=op.f("ck_alerts_severity")),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_alerts_agent_id"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(
            ["item_id"], ["protected_items.id"], name=op.f("fk_alerts_item_id"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("open_key", name=op.f("uq_alerts_open_key")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_alerts_agent_id"), "alerts", ["agent_id"])
    op.create_index(op.f("ix_alerts_cleared_at"), "alerts", ["cleared_at"])
    op.create_index(op.f("ix_alerts_item_id"), "alerts", ["item_id"])
    op.create_index(op.f("ix_alerts_kind"), "alerts", ["kind"])
    op.create_index(op.f("ix_alerts_subject"), "alerts", ["subject"])

    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("event IN ('cleared', 'raised')", name=op.f("ck_alert_deliveries_event")),
        sa.CheckConstraint("state IN ('delivered', 'failed', 'pending')", name=op.f("ck_alert_deliveries_state")),
        sa.ForeignKeyConstraint(
            ["alert_id"], ["alerts.id"], name=op.f("fk_alert_deliveries_alert_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["webhooks.id"], name=op.f("fk_alert_deliveries_webhook_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_deliveries")),
        sa.UniqueConstraint(
            "alert_id", "webhook_id", "event", name=op.f("uq_alert_deliveries_alert_id_webhook_id_event")
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_alert_deliveries_state_next"), "alert_deliveries", ["state", "next_attempt_at"])
    op.create_index(op.f("ix_alert_deliveries_webhook_id"), "alert_deliveries", ["webhook_id"])


def downgrade() -> None:
    op.drop_table("alert_deliveries")
    op.drop_table("alerts")
    op.drop_table("protected_items")
    op.drop_table("policy_pairings")
    op.drop_table("vms")
    op.drop_table("cloud_pairings")
    op.drop_table("cloud_hosts")
    op.drop_table("network_mappings")
    op.drop_table("hosts")
    op.drop_table("clouds")
    op.drop_table("servers")
    op.drop_table("networks")
    op.drop_table("job_steps")
    op.drop_table("agents")
    op.drop_table("webhooks")
    op.drop_table("sites")
    op.drop_table("registration_keys")
    op.drop_table("policies")
    op.drop_table("jobs")
    op.drop_table("api_tokens")
