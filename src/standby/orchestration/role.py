"""Active or passive: which control plane acts, in a deployment with one per site.

The production topology (docs/site-loss.md) runs a control plane at each site, each on its
own PostgreSQL; the standby site's database is a streaming-replication hot standby of the
active one's. This module decides and holds a control plane's role:

- **passive** while its database is in recovery (`pg_is_in_recovery()`): it serves reads,
  refuses changes (503, naming the active control plane), and runs no scheduler, job
  runner or webhook deliverer. Also passive: a second control plane started on the
  database another one is active on (it cannot take the lock below); it says why.
- **active** once its database accepts writes and it holds the database's active lock (a
  PostgreSQL session advisory lock, held on a connection of its own for as long as it
  acts; SQLite: an flock on a file beside the database file). Two active control planes on one
  database are impossible: the second cannot take the lock.

`standby server promote` promotes the standby's database (`pg_promote()`); the passive
control plane sees its database leave recovery within a second, takes the lock and becomes
active. Becoming active after a promotion (or taking over from another control plane)
bumps the **epoch** in `control_plane_state`; agents remember the highest epoch they have
seen and do not follow a control plane with a lower one (the old site's, if it comes back
believing it is still active: it cannot know it was replaced).

Several workers (`server run --workers N`, PostgreSQL): the workers of one running
instance share an instance id. The one holding the lock is the **leader**: it runs the
scheduler, the job runner and the webhooks, and records the instance in
`control_plane_state.active_instance`. The others are active too (they serve changes) but
lead nothing; each tries the lock every second, so when the leader dies (its database
session ends, and the lock with it) another worker leads within a second or two.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, text

from standby.errors import Passive
from standby.store import Store
from standby.store.base import utcnow
from standby.store.models import ControlPlaneState

log = logging.getLogger("standby.role")

# pg_try_advisory_lock key held by the active control plane ("StandbA").
ACTIVE_LOCK = 0x5374616E6441
TOUCH_SECONDS = 5.0  # how often the active one says it is alive (control_plane_state.seen_at)


class Role(StrEnum):
    ACTIVE = "active"
    PASSIVE = "passive"


@dataclass(frozen=True)
class RoleView:
    """What a control plane says of its role (GET /health, the 503 of a passive one)."""

    role: Role
    reason: str  # why passive ("" when active)
    name: str
    epoch: int
    active_name: str | None
    active_url: str | None
    active_seen_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role.value, "reason": self.reason, "name": self.name, "epoch": self.epoch,
                "active_name": self.active_name, "active_url": self.active_url,
                "active_seen_at": self.active_seen_at.isoformat() if self.active_seen_at else None}


def in_recovery(store: Store) -> bool:
    """Whether the store's database is a standby replaying another's changes."""
    if store.dialect != "postgresql":
        return False
    with store.engine.connect() as conn:
        return bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar())


def read_state(store: Store) -> ControlPlaneState | None:
    with store.read() as s:
        row = s.get(ControlPlaneState, 1)
        if row is not None:
            s.expunge(row)
        return row


class RoleKeeper:
    """Decides this control plane's role and holds the active lock while it is active."""

    def __init__(self, store: Store, *, name: str, url: str, instance: str | None = None) -> None:
        self.store = store
        self.name = name
        self.url = url
        self.instance = instance  # the running instance's id when it has several workers
        self.role = Role.PASSIVE
        self.leader = False  # holds the lock (runs the services); an active worker may not
        self.reason = "not started"
        self.last_view: RoleView | None = None  # refreshed every second: /health reads no database
        self._lock_conn: Connection | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ the lock

    def _take_lock(self) -> str | None:
        """Take the active lock; None when taken, else why not."""
        if self.store.dialect == "postgresql":
            conn = self.store.engine.connect()
            try:
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ACTIVE_LOCK}).scalar())
                conn.commit()  # the lock is the session's: it outlives this transaction
            except BaseException:
                conn.close()
                raise
            if not got:
                conn.close()
                st = read_state(self.store)
                who = f"{st.active_name} ({st.active_url})" if st is not None and st.active_name else "another one"
                return (f"another control plane holds the active role on this database: {who}; this one stays "
                        "passive until it stops")
            self._lock_conn = conn
            return None
        db = self.store.engine.url.database
        if db in (None, "", ":memory:"):
            return None  # a database in this process's memory: no other process can open it
        path = f"{db}.active.lock"  # beside the SQLite file: one control plane per file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return f"another control plane runs on this data dir (it holds {path})"
        self._lock_fd = fd
        return None

    def lock_alive(self) -> bool:
        """Whether the active lock is still held (its connection may have died with the
        database: then another control plane may be active now)."""
        if self.store.dialect != "postgresql":
            return self.role is Role.ACTIVE  # an flock (or a database in memory) is not lost
        conn = self._lock_conn
        if conn is None:
            return False
        try:
            conn.execute(text("SELECT 1")).scalar()
            conn.commit()
            return True
        except Exception:  # noqa: BLE001 - any failure means the session (and its lock) is gone
            return False

    def release(self) -> None:
        with self._mutex:
            if self._lock_conn is not None:
                try:
                    self._lock_conn.close()  # ends the session: the advisory lock goes with it
                except Exception:  # noqa: BLE001
                    pass
                self._lock_conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self.role = Role.PASSIVE
            self.leader = False
            self.reason = "stopped"

    # ------------------------------------------------------------------ the role

    def try_activate(self, *, promoted: bool = False) -> bool:
        """Become active (and the leader) if this database accepts writes and the lock is
        free; or active without leading when a sibling worker of this instance holds it.
        `promoted`: the database just left recovery (the epoch goes up)."""
        with self._mutex:
            if self.role is Role.ACTIVE and self.leader:
                return True
            if in_recovery(self.store):
                self.role, self.leader = Role.PASSIVE, False
                self.reason = ("its database is a standby (in recovery): promote it with `standby server promote` "
                               "to make this control plane active")
                return False
            why = self._take_lock()
            if why is not None:
                if self._sibling_leads():
                    if self.role is not Role.ACTIVE:
                        log.info("control plane %s: a worker of instance %s, which another worker leads",
                                 self.name, self.instance)
                    self.role, self.reason, self.leader = Role.ACTIVE, "", False
                    return True
                self.role, self.leader, self.reason = Role.PASSIVE, False, why
                return False
            now = utcnow()
            with self.store.transaction() as s:
                row = s.get(ControlPlaneState, 1, with_for_update=True)
                if row is None:
                    row = ControlPlaneState(id=1, epoch=1)
                    s.add(row)
                taking_over = promoted or (row.active_name is not None and row.active_name != self.name)
                if taking_over:
                    row.epoch = (row.epoch or 1) + 1
                if not (self.instance and row.active_instance == self.instance and row.active_name == self.name):
                    row.active_since = now  # a hand-over between one instance's workers is not a new spell
                row.active_name, row.active_url, row.seen_at = self.name, self.url, now
                row.active_instance = self.instance
                epoch = row.epoch
            self.role, self.reason, self.leader = Role.ACTIVE, "", True
            # what /health shows changes with the role, not at the next view(): a health
            # check must never see "active" beside the previous holder's epoch
            self.last_view = RoleView(Role.ACTIVE, "", self.name, epoch, self.name, self.url, now)
            log.info("control plane %s is active (epoch %d%s)%s", self.name, epoch,
                     ", taken over" if taking_over else "",
                     f": worker {os.getpid()} leads instance {self.instance}" if self.instance else "")
            return True

    def _sibling_leads(self) -> bool:
        """Whether the lock's holder is a worker of this running instance."""
        if not self.instance:
            return False
        st = read_state(self.store)
        return st is not None and st.active_name == self.name and st.active_instance == self.instance

    def touch(self) -> None:
        """The active one says it is alive (the passive one shows how long ago)."""
        with self.store.transaction() as s:
            row = s.get(ControlPlaneState, 1, with_for_update=True)
            if row is not None and row.active_name == self.name:
                row.seen_at = utcnow()

    def view(self) -> RoleView:
        try:
            st = read_state(self.store)
        except Exception:  # noqa: BLE001 - the database may be down: say what is known
            st = None
        v = RoleView(self.role, self.reason, self.name, st.epoch if st else 0,
                     st.active_name if st else None, st.active_url if st else None, st.seen_at if st else None)
        self.last_view = v
        return v

    def passive_error(self) -> Passive:
        """The answer of a passive control plane to a change."""
        v = self.last_view or self.view()
        where = (f"the active control plane is {v.active_name} at {v.active_url}" if v.active_url and
                 v.active_name != self.name else "no other control plane is known to be active")
        return Passive(f"control plane {self.name} is passive ({self.reason}): {where}",
                       details={"role": "passive", "active_url": v.active_url, "active_name": v.active_name,
                                "epoch": v.epoch})
