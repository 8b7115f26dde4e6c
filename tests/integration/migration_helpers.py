"""Rows as an older schema held them, for migration tests over a populated store."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, text


def insert_legacy_policy(conn: Connection, at: datetime, *, retention_hours: int = 0) -> None:
    """A policy named 'old' with only the columns migration 0001 made."""
    conn.execute(
        text(
            "INSERT INTO policies (name, description, copy_frequency_seconds, recovery_point_retention_hours,"
            " app_consistent_interval_hours, compression, authentication, replication_port,"
            " initial_replication, delete_replica_on_disable, created_at, updated_at)"
            " VALUES ('old', '', 300, :r, 0, true, 'certificate', 7443, 'now', false, :t, :t)"
        ),
        # SQLite stores naive UTC; PostgreSQL takes the aware time.
        {"r": retention_hours, "t": at.replace(tzinfo=None) if conn.dialect.name == "sqlite" else at},
    )
