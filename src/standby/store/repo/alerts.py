"""Alerts, webhooks and the webhook outbox.

Raising an alert that is already open updates it (message, severity, last seen) rather
than opening a second one. Raising and clearing write one delivery row per matching
webhook in the same transaction (an outbox): a delivery worker drains `due_deliveries`
and records each attempt, so a restart loses no notification.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import exc, or_, select
from sqlalchemy.orm import Session

from standby.errors import BadInput, NotFound
from standby.store.models import DELIVERY_STATES, SEVERITIES, Alert, AlertDelivery, Webhook
from standby.store.repo._common import by_name, get, now_or

KNOWN_KINDS = ("rpo_breach", "resync_required", "heartbeat_lost", "secondary_storage_low")


def _severity_rank(severity: str) -> int:
    if severity not in SEVERITIES:
        raise BadInput(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    return SEVERITIES.index(severity)


def _open_key(kind: str, subject: str) -> str:
    return f"{kind}|{subject}"


def open_alert(session: Session, kind: str, subject: str) -> Alert | None:
    return session.scalars(select(Alert).where(Alert.open_key == _open_key(kind, subject))).one_or_none()


def raise_alert(
    session: Session,
    *,
    kind: str,
    severity: str,
    subject: str,
    message: str,
    item_id: int | None = None,
    agent_id: int | None = None,
    now: datetime | None = None,
) -> tuple[Alert, bool]:
    """(alert, newly raised). An open alert of the same kind and subject is updated; a
    new one queues a `raised` delivery for each webhook that wants it."""
    _severity_rank(severity)
    if not kind or not subject:
        raise BadInput("an alert needs a kind and a subject")
    now = now_or(now)
    for _ in range(2):
        alert = open_alert(session, kind, subject)
        if alert is not None:
            alert.severity = severity
            alert.message = message
            alert.last_seen_at = now
            session.flush()
            return alert, False
        alert = Alert(
            kind=kind,
            severity=severity,
            subject=subject,
            message=message,
            item_id=item_id,
            agent_id=agent_id,
            raised_at=now,
            last_seen_at=now,
            open_key=_open_key(kind, subject),
        )
        try:
            with session.begin_nested():  # a concurrent raiser may win the unique open_key
                session.add(alert)
        except exc.IntegrityError:
            continue
        _queue_deliveries(session, alert, "raised", now)
        return alert, True
    raise RuntimeError(f"could not raise or find the open {kind} alert for {subject}")


def clear_alert(session: Session, *, kind: str, subject: str, now: datetime | None = None) -> Alert | None:
    """Clear the open alert of this kind and subject, if any; queues `cleared` deliveries."""
    alert = open_alert(session, kind, subject)
    if alert is None:
        return None
    return _clear(session, alert, now_or(now))


def clear_alert_by_id(session: Session, alert_id: int, *, now: datetime | None = None) -> Alert:
    alert = get(session, Alert, alert_id, "alert", lock=True)
    if alert.cleared_at is None:
        _clear(session, alert, now_or(now))
    return alert


def _clear(session: Session, alert: Alert, now: datetime) -> Alert:
    alert.cleared_at = now
    alert.open_key = None
    session.flush()
    _queue_deliveries(session, alert, "cleared", now)
    return alert


def list_alerts(
    session: Session,
    *,
    open_only: bool = False,
    kind: str | None = None,
    subject: str | None = None,
    item_id: int | None = None,
    limit: int = 200,
    before_id: int | None = None,
) -> list[Alert]:
    """Newest first; page with `before_id` (the smallest id of the previous page)."""
    q = select(Alert).order_by(Alert.id.desc()).limit(limit)
    if before_id is not None:
        q = q.where(Alert.id < before_id)
    if open_only:
        q = q.where(Alert.cleared_at.is_(None))
    if kind is not None:
        q = q.where(Alert.kind == kind)
    if subject is not None:
        q = q.where(Alert.subject == subject)
    if item_id is not None:
        q = q.where(Alert.item_id == item_id)
    return list(session.scalars(q))


# ---------------------------------------------------------------- webhooks


def add_webhook(
    session: Session,
    name: str,
    url: str,
    *,
    secret: str | None = None,
    kinds: Sequence[str] = (),
    min_severity: str = "info",
    enabled: bool = True,
) -> Webhook:
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"webhook URL {url!r} is not http(s)")
    _severity_rank(min_severity)
    hook = Webhook(name=name, url=url, secret=secret, kinds=list(kinds), min_severity=min_severity, enabled=enabled)
    session.add(hook)
    session.flush()
    return hook


def get_webhook(session: Session, name: str) -> Webhook:
    return by_name(session, Webhook, name, "webhook")


def list_webhooks(session: Session) -> list[Webhook]:
    return list(session.scalars(select(Webhook).order_by(Webhook.name)))


def set_webhook_enabled(session: Session, name: str, enabled: bool) -> Webhook:
    hook = get_webhook(session, name)
    hook.enabled = enabled
    session.flush()
    return hook


def remove_webhook(session: Session, name: str) -> None:
    session.delete(get_webhook(session, name))
    session.flush()


def _wants(hook: Webhook, alert: Alert) -> bool:
    if not hook.enabled:
        return False
    if hook.kinds and alert.kind not in hook.kinds:
        return False
    return _severity_rank(alert.severity) >= _severity_rank(hook.min_severity)


def _queue_deliveries(session: Session, alert: Alert, event: str, now: datetime) -> None:
    for hook in session.scalars(select(Webhook).where(Webhook.enabled.is_(True))):
        if _wants(hook, alert):
            session.add(
                AlertDelivery(
                    alert_id=alert.id,
                    webhook_id=hook.id,
                    event=event,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    session.flush()
    session.expire(alert, ["deliveries"])


# ---------------------------------------------------------------- deliveries (the outbox)


def due_deliveries(session: Session, *, now: datetime | None = None, limit: int = 100) -> list[AlertDelivery]:
    """Pending deliveries whose next attempt is due, oldest first."""
    now = now_or(now)
    q = (
        select(AlertDelivery)
        .where(
            AlertDelivery.state == "pending",
            or_(AlertDelivery.next_attempt_at.is_(None), AlertDelivery.next_attempt_at <= now),
        )
        .order_by(AlertDelivery.id)
        .limit(limit)
    )
    return list(session.scalars(q))


def record_delivery(
    session: Session,
    delivery_id: int,
    *,
    ok: bool,
    error: str | None = None,
    retry_at: datetime | None = None,
    now: datetime | None = None,
) -> AlertDelivery:
    """Record one attempt: delivered, or failed with `error` and retried at `retry_at`
    (no `retry_at`: given up, the delivery is `failed`)."""
    now = now_or(now)
    d = get(session, AlertDelivery, delivery_id, "alert delivery", lock=True)
    if d.state != "pending":
        raise BadInput(f"delivery {d.id} is {d.state}, not pending")
    d.attempts += 1
    d.last_attempt_at = now
    if ok:
        d.state = "delivered"
        d.delivered_at = now
        d.last_error = None
        d.next_attempt_at = None
    else:
        d.last_error = error or "delivery failed"
        d.next_attempt_at = retry_at
        if retry_at is None:
            d.state = "failed"
    session.flush()
    return d


def deliveries_of(session: Session, alert_id: int) -> list[AlertDelivery]:
    if session.get(Alert, alert_id) is None:
        raise NotFound(f"alert {alert_id} does not exist")
    return list(
        session.scalars(select(AlertDelivery).where(AlertDelivery.alert_id == alert_id).order_by(AlertDelivery.id))
    )


def delivery_summary(session: Session, alert_id: int) -> dict[str, int]:
    """How many of the alert's deliveries are in each state (pending, delivered, failed)."""
    counts = {s: 0 for s in DELIVERY_STATES}
    for d in deliveries_of(session, alert_id):
        counts[d.state] += 1
    return counts
