"""Webhook delivery: drains the alert outbox (`store.repo.alerts.due_deliveries`).

Each delivery is one `POST` of

    {"event": "raised" | "cleared", "alert": {id, kind, severity, subject, message, raised_at, cleared_at}}

with `Content-Type: application/json` and, when the webhook has a secret,
`X-Standby-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`, so a receiver
verifies the bytes it got before parsing them. A 2xx answer delivers it; anything else is
retried after 1 s, 2 s, 4 s ... (at most 5 min) and given up after 8 attempts. Nothing
here logs a secret or a request's headers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from standby import __version__
from standby.orchestration.settings import ServerSettings
from standby.store.base import utcnow
from standby.store.db import Store
from standby.store.repo import alerts

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
MAX_BACKOFF_SECONDS = 300.0
BATCH = 100  # deliveries read per run
SIGNATURE_HEADER = "X-Standby-Signature"
ERROR_MAX = 500  # characters of an answer kept as the delivery's last error


def backoff_seconds(attempts: int) -> float:
    """Wait after the `attempts`-th failed attempt: 1, 2, 4 ... s, at most 5 minutes."""
    return min(2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def retry_time(attempts: int, now: datetime) -> datetime | None:
    """When to try again after `attempts` failed attempts, or None: given up."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return now + timedelta(seconds=backoff_seconds(attempts))


def body_bytes(event: str, alert: Mapping[str, Any]) -> bytes:
    """The exact bytes posted (and signed): compact JSON, keys sorted."""
    return json.dumps({"event": event, "alert": dict(alert)}, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, body: bytes) -> str:
    """The X-Standby-Signature value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def redact_url(url: str) -> str:
    """The URL without credentials (user:password@) for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


@dataclass(frozen=True)
class _Due:
    """A delivery and what sending it needs, read out of the session."""

    id: int
    webhook_id: int
    webhook_name: str
    url: str
    secret: str | None
    enabled: bool
    attempts: int
    event: str
    alert: dict[str, Any]


class WebhookDeliverer:
    """Posts due alert deliveries. `run_once` is one pass; `run` loops until stopped."""

    def __init__(self, store: Store, settings: ServerSettings, *, client: httpx.Client | None = None) -> None:
        self.store = store
        self.settings = settings
        self._client = client

    def _due(self, now: datetime) -> list[_Due]:
        with self.store.read() as s:
            out = []
            for d in alerts.due_deliveries(s, now=now, limit=BATCH):
                a, hook = d.alert, d.webhook
                out.append(
                    _Due(
                        id=d.id,
                        webhook_id=hook.id,
                        webhook_name=hook.name,
                        url=hook.url,
                        secret=hook.secret,
                        enabled=hook.enabled,
                        attempts=d.attempts,
                        event=d.event,
                        alert={
                            "id": a.id,
                            "kind": a.kind,
                            "severity": a.severity,
                            "subject": a.subject,
                            "message": a.message,
                            "raised_at": _iso(a.raised_at),
                            "cleared_at": _iso(a.cleared_at),
                        },
                    )
                )
            return out

    def run_once(self, now: datetime | None = None) -> int:
        """Attempt every due delivery once; returns how many were attempted. A webhook
        that fails is not tried again in the same pass (its other deliveries wait for
        the next one), so one dead receiver costs one timeout per pass, not one each."""
        now = now or utcnow()
        due = self._due(now)
        if not due:
            return 0
        client = self._client or httpx.Client(timeout=self.settings.webhook_timeout, follow_redirects=False)
        failed_hooks: set[int] = set()
        attempted = 0
        try:
            for d in due:
                if d.webhook_id in failed_hooks:
                    continue
                if not d.enabled:
                    self._record(d, ok=False, error="the webhook is disabled", now=now, give_up=True)
                    continue
                attempted += 1
                error = self._post(client, d)
                self._record(d, ok=error is None, error=error, now=now)
                if error is not None:
                    failed_hooks.add(d.webhook_id)
        finally:
            if self._client is None:
                client.close()
        return attempted

    def _post(self, client: httpx.Client, d: _Due) -> str | None:
        """Send one delivery; None when the receiver took it, else why not."""
        body = body_bytes(d.event, d.alert)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"standby/{__version__}",
            "X-Standby-Event": d.event,
            "X-Standby-Delivery": str(d.id),
        }
        if d.secret:
            headers[SIGNATURE_HEADER] = signature(d.secret, body)
        try:
            resp = client.post(d.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            # The exception text names the URL at most; strip credentials from it.
            reason = str(e).replace(d.url, redact_url(d.url)) or type(e).__name__
            return f"{type(e).__name__}: {reason}"[:ERROR_MAX]
        if 200 <= resp.status_code < 300:
            return None
        snippet = resp.text[:200].strip()
        return f"HTTP {resp.status_code}" + (f": {snippet}" if snippet else "")

    def _record(self, d: _Due, *, ok: bool, error: str | None, now: datetime, give_up: bool = False) -> None:
        attempts = d.attempts + 1
        retry = None if ok or give_up else retry_time(attempts, now)
        with self.store.transaction() as s:
            alerts.record_delivery(s, d.id, ok=ok, error=error, retry_at=retry, now=now)
        if ok:
            log.debug("webhook %s: delivered alert %s (%s)", d.webhook_name, d.alert["id"], d.event)
        elif retry is None:
            log.warning("webhook %s (%s): gave up on alert %s (%s) after %d attempt(s): %s",
                        d.webhook_name, redact_url(d.url), d.alert["id"], d.event, attempts, error)
        else:
            log.info("webhook %s (%s): alert %s (%s) not delivered (%s), retrying at %s",
                     d.webhook_name, redact_url(d.url), d.alert["id"], d.event, error, retry.isoformat())

    def run(self, stop: threading.Event, *, interval: float = 1.0) -> None:
        """Deliver until `stop` is set. A failing pass is logged and the next one runs."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - delivery must outlive one bad pass
                log.exception("webhook delivery pass failed")
            stop.wait(interval)
