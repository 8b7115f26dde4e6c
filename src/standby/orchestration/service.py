"""The control plane's background machinery, started and stopped as one.

    services = ControlPlaneServices(settings)   # opens (and migrates) the store
    services.start()    # job runner (recovers jobs left by a previous run), scheduler, webhooks
    ...                 # API handlers: protection.enable_protection(services.store, services.runner, ...)
    services.stop()     # joins every thread; safe to call twice

Threads: the job runner's pool (`settings.runner_workers`), the scheduler (a tick every
`settings.tick_seconds`: heartbeats, task expiry, cycle dispatch, health and alerts) and
the webhook deliverer (the outbox drained every `WEBHOOK_PERIOD` seconds). A failing
round of either loop is logged and the next one runs.
"""

from __future__ import annotations

import logging
import threading

from standby.orchestration import failover, plans, protection
from standby.orchestration.runner import JobRunner
from standby.orchestration.scheduler import Scheduler
from standby.orchestration.settings import ServerSettings
from standby.orchestration.webhooks import WebhookDeliverer
from standby.store import Store, open_store

log = logging.getLogger("standby.services")

WEBHOOK_PERIOD = 1.0
JOIN_TIMEOUT = 30.0


class ControlPlaneServices:
    def __init__(self, settings: ServerSettings, *, store: Store | None = None) -> None:
        """`store`: an open store to use (and leave open at `stop`); by default the store at
        `settings.url` is opened here and closed at `stop`."""
        self.settings = settings
        self._owns_store = store is None
        self.store = store if store is not None else open_store(settings.url)
        self.runner = JobRunner(self.store, settings,
                                {**protection.handlers(), **failover.handlers(), **plans.handlers()})
        self.scheduler = Scheduler(self.store, settings)
        self.webhooks = WebhookDeliverer(self.store, settings)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._state = "new"  # new -> running -> stopped

    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"control plane services are {self._state}; make new ones to start again")
            self._state = "running"
        # Jobs first: recovery decides what a previous run left before new work arrives.
        self.runner.start()
        self._threads = [
            threading.Thread(target=self.scheduler.run, args=(self._stop,), name="standby-scheduler", daemon=True),
            threading.Thread(target=self.webhooks.run, args=(self._stop,), kwargs={"interval": WEBHOOK_PERIOD},
                             name="standby-webhooks", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("control plane services started (store %s)", self.store.url)

    def stop(self) -> None:
        """Stop the loops and the runner (running jobs are left for the next start), join
        the threads, close the store if it was opened here. Safe to call twice."""
        with self._lock:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
        self._stop.set()
        if was_running:
            for t in self._threads:
                t.join(JOIN_TIMEOUT)
                if t.is_alive():
                    log.warning("%s did not stop within %.0f s", t.name, JOIN_TIMEOUT)
        self.runner.stop()
        if self._owns_store:
            self.store.close()
        log.info("control plane services stopped")

    def __enter__(self) -> ControlPlaneServices:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
