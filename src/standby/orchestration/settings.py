"""Settings of a running control plane: where its files are and how often it acts.

Defaults are what an operator gets from `standby server run`; tests shorten the timings.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from standby.errors import BadInput
from standby.store.db import sqlite_url


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    db_url: str | None = None  # None: SQLite in data_dir
    listen: str = "127.0.0.1:8443"
    tick_seconds: float = 1.0  # scheduler period
    heartbeat_seconds: float | None = None  # what agents are told to use (None: 10 s, or a third of the timeout)
    heartbeat_timeout: float = 30.0  # no heartbeat for this long: heartbeat_lost
    task_deadline_seconds: float = 3600.0  # a claimed task not finished by then expires
    runner_workers: int = 4
    webhook_timeout: float = 5.0
    storage_low_fraction: float = 0.10  # secondary storage below this fraction free: storage_low
    sans: tuple[str, ...] = field(default_factory=tuple)
    # In a deployment with a control plane per site: this one's name and the URL agents
    # and operators reach it at (control_plane_state names the active one by them).
    name: str | None = None  # default: this machine's host name
    public_url: str | None = None  # default: https://<listen> (the host name for 0.0.0.0)
    # When this control plane started: agents get one heartbeat_timeout from then to
    # report in before their silence counts (domain.health.heard_from).
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc), compare=False)
    # `server run --workers N`: the running instance's id, shared by its workers (role.py)
    instance: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.heartbeat_seconds is None:
            # Three heartbeats fit in the timeout, so one lost packet does not raise an alert.
            object.__setattr__(self, "heartbeat_seconds", min(10.0, self.heartbeat_timeout / 3))
        for name in ("tick_seconds", "heartbeat_seconds", "heartbeat_timeout", "task_deadline_seconds",
                     "webhook_timeout"):
            if not getattr(self, name) > 0:  # type: ignore[operator]
                raise BadInput(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.heartbeat_timeout < self.heartbeat_seconds:  # type: ignore[operator]
            raise BadInput("heartbeat_timeout must be at least heartbeat_seconds")
        if self.runner_workers < 1:
            raise BadInput("runner_workers must be at least 1")
        if not 0 <= self.storage_low_fraction < 1:
            raise BadInput("storage_low_fraction must be in [0, 1)")

    @property
    def url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def cp_name(self) -> str:
        return self.name or socket.gethostname()

    @property
    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, _, port = self.listen.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = socket.getfqdn()
        return f"https://{host}:{port}"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def server_cert(self) -> Path:
        return self.data_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.data_dir / "server.key"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"
