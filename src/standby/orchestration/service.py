"""The control plane's background machinery, started and stopped as one.

    services = ControlPlaneServices(settings)   # opens (and migrates) the store
    services.start()    # the role first; when active: job runner (recovers jobs left by a
                        # previous run), scheduler, webhooks
    ...                 # API handlers: protection.enable_protection(services.store, services.runner, ...)
    services.stop()     # joins every thread; safe to call twice

Threads: the job runner's pool (`settings.runner_workers`), the scheduler (a tick every
`settings.tick_seconds`: heartbeats, task expiry, cycle dispatch, health and alerts) and
the webhook deliverer (the outbox drained every `WEBHOOK_PERIOD` seconds). A failing
round of either loop is logged and the next one runs. They run only while this control
plane is active (`orchestration/role.py`); a passive one runs the role watcher alone,
which makes it active (starting them) within a second of its database's promotion, and
an active one whose lock is lost (its database connection died) stops them and goes
back to passive until it can take the lock again.
"""

from __future__ import annotations

import logging
import threading
import time

from standby.orchestration import failover, plans, protection
from standby.orchestration.desired import ChangeNotifier, PgChangeRelay
from standby.orchestration.role import TOUCH_SECONDS, Role, RoleKeeper
from standby.orchestration.runner import JobRunner
from standby.orchestration.scheduler import Scheduler
from standby.orchestration.settings import ServerSettings
from standby.orchestration.webhooks import WebhookDeliverer
from standby.store import Store, open_store
from standby.store.base import utcnow

log = logging.getLogger("standby.services")

WEBHOOK_PERIOD = 1.0
ROLE_PERIOD = 1.0  # how soon a passive control plane notices its database's promotion
JOIN_TIMEOUT = 30.0


class ControlPlaneServices:
    def __init__(self, settings: ServerSettings, *, store: Store | None = None) -> None:
        """`store`: an open store to use (and leave open at `stop`); by default the store at
        `settings.url` is opened here (migrated, unless it is a standby in recovery) and
        closed at `stop`."""
        self.settings = settings
        self._owns_store = store is None
        self.store = store if store is not None else open_store(settings.url, migrate="unless-standby")
        self.role = RoleKeeper(self.store, name=settings.cp_name, url=settings.advertised_url,
                               instance=settings.instance)
        self.desired = ChangeNotifier()
        self.desired.install(self.store)
        self._relay: PgChangeRelay | None = None
        self._make_parts()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._active_stop: threading.Event | None = None
        self._lock = threading.Lock()
        self._state = "new"  # new -> running -> stopped

    def _make_parts(self) -> None:
        self.runner = JobRunner(self.store, self.settings,
                                {**protection.handlers(), **failover.handlers(), **plans.handlers()})
        self.scheduler = Scheduler(self.store, self.settings)
        self.webhooks = WebhookDeliverer(self.store, self.settings)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def active(self) -> bool:
        return self.role.role is Role.ACTIVE

    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"control plane services are {self._state}; make new ones to start again")
            self._state = "running"
        if self.settings.instance and self.store.dialect == "postgresql":
            # several workers: a change committed in one wakes the long-polls of all
            self._relay = PgChangeRelay(self.desired, self.store)
            self._relay.start()
        if self.role.try_activate():
            if self.role.leader:
                self._start_active()
            else:
                self._follow()
        else:
            log.warning("control plane %s is passive: %s", self.role.name, self.role.reason)
        self.role.view()
        watcher = threading.Thread(target=self._watch_role, name="standby-role", daemon=True)
        self._threads.append(watcher)
        watcher.start()

    def _follow(self) -> None:
        """An active worker that does not lead: it serves the API; the jobs it creates stay
        queued for the leader's runner, which finds them within a second."""
        self.runner.stop()

    def _start_active(self, *, later: bool = False) -> None:
        if later:
            # Active from now on (a promotion): the grace agents get to report in
            # (domain.health.heard_from) runs from now, not from the process's start.
            object.__setattr__(self.settings, "started_at", utcnow())
        # Jobs first: recovery decides what a previous run left before new work arrives.
        self.runner.start()
        stop = self._active_stop = threading.Event()
        for t in (
            threading.Thread(target=self.scheduler.run, args=(stop,), name="standby-scheduler", daemon=True),
            threading.Thread(target=self.webhooks.run, args=(stop,), kwargs={"interval": WEBHOOK_PERIOD},
                             name="standby-webhooks", daemon=True),
            threading.Thread(target=self.runner.poll, args=(stop,), name="standby-jobs-poll", daemon=True),
        ):
            self._threads.append(t)
            t.start()
        log.info("control plane services started (store %s)", self.store.url)

    def _stop_active(self) -> None:
        stop = self._active_stop
        if stop is None:
            return
        stop.set()
        for t in [t for t in self._threads if t.name in ("standby-scheduler", "standby-webhooks", "standby-jobs-poll")]:
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                log.warning("%s did not stop within %.0f s", t.name, JOIN_TIMEOUT)
            self._threads.remove(t)
        self.runner.stop()
        self._active_stop = None

    def _watch_role(self) -> None:
        """Passive: become active as soon as the database is promoted and the lock is free.
        Active: say so every few seconds, and step down if the lock is lost."""
        last_touch = 0.0
        while not self._stop.wait(ROLE_PERIOD):
            try:
                self.role.view()  # what /health and a passive 503 tell
                if not (self.active and self.role.leader):
                    was_active = self.active  # a worker that did not lead
                    was_standby = self.role.reason.startswith("its database is a standby")
                    if self.role.try_activate(promoted=was_standby):
                        if self.role.leader:
                            self._make_parts()  # threads of a former active spell do not start twice
                            # a worker taking over from its instance's leader keeps the instance's start
                            self._start_active(later=not was_active)
                        self.role.view()
                    elif was_active:
                        log.warning("control plane %s is passive: %s", self.role.name, self.role.reason)
                    continue
                if not self.role.lock_alive():
                    log.critical("control plane %s lost its active lock (its database connection ended): "
                                 "stopping the scheduler and job runner, passive until it can act again",
                                 self.role.name)
                    self._stop_active()
                    self.role.release()
                    self.role.reason = "it lost its active lock; taking it again when it can"
                    continue
                now = time.monotonic()
                if now - last_touch >= TOUCH_SECONDS:
                    self.role.touch()
                    last_touch = now
            except Exception:  # noqa: BLE001 - a database hiccup must not end the watcher
                log.exception("control plane role check failed")

    def stop(self) -> None:
        """Stop the loops and the runner (running jobs are left for the next start), join
        the threads, release the active role, close the store if it was opened here. Safe
        to call twice."""
        with self._lock:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
        self._stop.set()
        if was_running:
            self._stop_active()
            for t in list(self._threads):
                t.join(JOIN_TIMEOUT)
                if t.is_alive():
                    log.warning("%s did not stop within %.0f s", t.name, JOIN_TIMEOUT)
        self.runner.stop()
        self.role.release()
        if self._relay is not None:
            self._relay.stop()
        self.desired.uninstall()
        if self._owns_store:
            self.store.close()
        log.info("control plane services stopped")

    def __enter__(self) -> ControlPlaneServices:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
