"""The monitor's own pages, independent of Alertmanager: webhook, PagerDuty Events v2, Slack.

A page is first written to the store's ``notifications`` table (one row per
incident, notifier and event — trigger, resolve, or ``escalate:<duty>``, a notification
duty unacknowledged near its deadline: ``monitor.duties``), then delivered by
``Dispatcher.run``: explicit timeouts, retries with exponential backoff for
network errors, 429 and 5xx, no retry for other 4xx (the request itself is wrong).
A restart resumes from the table, so no page is lost, and the row's uniqueness means
a page is queued once per incident event. Delivery is **at-least-once**, not
exactly-once: a monitor that dies after a receiver took a POST but before the row
was marked sent (or a response lost on the way back, then retried) sends that page
again. Every request therefore names its incident event stably across retries and
restarts (``event_key``): the webhook's ``Idempotency-Key`` header and body, PagerDuty's
``dedup_key`` (a repeated trigger or resolve is a no-op there); Slack has no such key,
so a Slack channel may show a repeat. The stored row holds the neutral event; the
notifier-specific body, with its secrets, is built only at send time.

Several monitors on one store (docs/scaling.md) each run a dispatcher: a page is claimed
before it is sent (``claim_notification``: a row lock on PostgreSQL, held on the
``sender``, the dispatcher's own connection, until the outcome is marked), so one monitor sends it, and
one killed mid-send lets it go at once for another to send (the at-least-once above).

    httpx.HTTPError (network, timeout)  ─┐
    HTTP 429 / 5xx                       ─┼─▶ retry (attempts ≤ retries), else failed
    other HTTP 4xx                       ─┴─▶ failed at once
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import SecretStr

from ecpm.configfile import secret_text
from monitor.config import Notifier, PagerDutyNotifier, SlackNotifier, WebhookNotifier
from monitor.metrics import MonitorMetrics
from monitor.model import Incident, IncidentDuty
from monitor.store import NotificationQueue, QueuedNotification
from monitor.views import paged_incident_json, time_json

logger = logging.getLogger(__name__)


def incident_event(incident: Incident, event: str, *, monitor: str, status_url: str | None) -> dict[str, Any]:
    """The neutral, secret-free record of one page, as stored and as sent by the webhook."""
    return {
        "event": event,
        "dedup_key": f"ecpm-{monitor}-incident-{incident.id}",
        "monitor": monitor,
        "status_url": status_url,
        "incident": paged_incident_json(incident),
    }


def escalation_event(
    incident: Incident, duty: IncidentDuty, *, monitor: str, status_url: str | None
) -> dict[str, Any]:
    """A duty's escalation page (``monitor.duties``): a trigger of its own (its own dedup key,
    so PagerDuty opens it beside the incident's), naming the duty, its text and due time."""
    event = incident_event(incident, "escalate", monitor=monitor, status_url=status_url)
    event["dedup_key"] = f"{event['dedup_key']}-duty-{duty.name}"
    event["duty"] = {"name": duty.name, "text": duty.text, "due_at": time_json(duty.due_at)}
    return event


def event_key(event: dict[str, Any]) -> str:
    """The stable key of one incident event (``<dedup_key>-<trigger|resolve>``): the same
    for every retry and after every restart, since it is built from the stored event."""
    return f"{event['dedup_key']}-{event['event']}"


def _title(event: dict[str, Any]) -> str:
    inc = event["incident"]
    what = "emergency path DOWN" if inc["kind"] == "down" else "monitoring GAP (no fresh results)"
    if event["event"] == "escalate":
        duty = event["duty"]
        return (
            f"DUTY NOT ACKNOWLEDGED: {duty['name']} for incident {inc['id']} ({inc['target']} {what})"
            f" due {duty['due_at']}: {duty['text']}"
        )
    if event["event"] == "resolve":
        return f"RESOLVED: {inc['target']} {what}"
    return f"{inc['target']}: {what} — {inc['summary']}"


def build_request(notifier: Notifier, event: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(url, JSON body, extra headers) for one notifier; secrets are read here, never stored.

    A webhook gets ``Idempotency-Key: <event_key>``: a receiver that has seen that key
    already can drop the repeat an at-least-once delivery may bring (module docstring).
    """
    if isinstance(notifier, WebhookNotifier):
        return notifier.url, event, {"Idempotency-Key": event_key(event)}
    if isinstance(notifier, PagerDutyNotifier):
        body: dict[str, Any] = {
            "routing_key": secret_text(notifier, "routing_key"),
            "event_action": "resolve" if event["event"] == "resolve" else "trigger",
            "dedup_key": event["dedup_key"],
        }
        if event["event"] != "resolve":
            inc = event["incident"]
            body["payload"] = {
                "summary": _title(event)[:1024],
                "source": f"ecpm monitor {event['monitor']}",
                "severity": "critical",
                "component": inc["target"],
                "group": "emergency-call-path",
                "class": inc["kind"],
                "custom_details": {**inc, "duty": event["duty"]} if "duty" in event else inc,
            }
            if event.get("status_url"):
                body["links"] = [{"href": event["status_url"], "text": "ecpm status page"}]
        return notifier.url, body, {}
    if isinstance(notifier, SlackNotifier):
        url = secret_text(notifier, "url")
        assert url is not None  # checked at config load
        icon = ":white_check_mark:" if event["event"] == "resolve" else ":rotating_light:"
        text = f"{icon} {_title(event)}"
        if event.get("status_url"):
            text += f" <{event['status_url']}|status page>"
        return url, {"text": text}, {}
    raise TypeError(f"unknown notifier {notifier!r}")


def _secrets(notifier: Notifier) -> list[str]:
    found = [getattr(notifier, name, None) for name in ("url", "url_file", "routing_key", "routing_key_file")]
    return [s.get_secret_value() for s in found if isinstance(s, SecretStr)]


class Dispatcher:
    """Queues pages in the store and delivers them; one instance per monitor."""

    def __init__(
        self,
        *,
        store: NotificationQueue,
        sender: NotificationQueue | None = None,
        notifiers: Sequence[Notifier],
        metrics: MonitorMetrics,
        monitor: str,
        status_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store  # pages are queued here, in the transaction of their incident
        self._sender = sender or store  # and claimed and marked here (replicas: its own connection)
        self._notifiers = {n.name: n for n in notifiers}
        self._metrics = metrics
        self._monitor = monitor
        self._status_url = status_url
        self._transport = transport
        self._clock = clock
        self._wake = asyncio.Event()

    def page(self, incident: Incident, event: str) -> None:
        """Queue a trigger or resolve for every notifier (idempotent per incident and event),
        durable when this returns — with the incident the caller stored before it."""
        now = self._clock()
        payload = incident_event(incident, event, monitor=self._monitor, status_url=self._status_url)
        with self._store.transaction():
            for name in self._notifiers:
                self._store.enqueue_notification(incident.id, name, event, payload, now)
        self._wake.set()

    def escalate(self, incident: Incident, duty: IncidentDuty) -> None:
        """Queue a duty's escalation page for its route (every notifier if it names none):
        once per incident and duty (the row's uniqueness), durable when this returns."""
        now = self._clock()
        payload = escalation_event(incident, duty, monitor=self._monitor, status_url=self._status_url)
        with self._store.transaction():
            for name in duty.route or tuple(self._notifiers):
                self._store.enqueue_notification(incident.id, name, f"escalate:{duty.name}", payload, now)
        self._wake.set()

    async def run(self) -> None:
        """Deliver due pages until cancelled."""
        async with httpx.AsyncClient(transport=self._transport) as client:
            while True:
                for due in self._sender.due_notifications(self._clock()):
                    with self._sender.claim_notification(due.id, self._clock()) as item:
                        if item is not None:  # else: sent or being sent by another monitor
                            await self._deliver(client, item)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._sleep_for())

    def _sleep_for(self) -> float:
        nxt = self._sender.next_notification_at()
        if nxt is None:
            return 5.0
        return min(5.0, max(0.05, (nxt - self._clock()).total_seconds()))

    def _mark(self, notification_id: int, **outcome: Any) -> None:
        """A page's outcome, durable at once: a restart must not send a sent page again."""
        with self._sender.transaction():
            self._sender.mark_notification(notification_id, **outcome)

    async def _deliver(self, client: httpx.AsyncClient, item: QueuedNotification) -> None:
        notifier = self._notifiers.get(item.notifier)
        now = self._clock()
        attempts = item.attempts + 1
        if notifier is None:  # removed from config since it was queued
            self._mark(
                item.id, state="failed", attempts=attempts, at=now, error="notifier no longer configured"
            )
            return
        url, body, headers = build_request(notifier, item.payload)
        retry, error = False, None
        try:
            response = await client.post(url, json=body, headers=headers, timeout=notifier.timeout)
        except httpx.HTTPError as exc:
            retry, error = True, f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # e.g. httpx.InvalidURL: this page can never be sent as configured
            retry, error = False, f"{type(exc).__name__}: {exc}"[:300]
        else:
            if response.is_success:
                self._mark(item.id, state="sent", attempts=attempts, at=self._clock())
                self._metrics.notifications.labels(item.notifier, "sent").inc()
                logger.info("page %s %s sent via %s", item.event, item.payload["dedup_key"], item.notifier)
                return
            retry = response.status_code == 429 or response.status_code >= 500
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        if error is not None:  # the page and API show errors: never the secret URL or key
            for secret in _secrets(notifier):
                error = error.replace(secret, "<secret>")
        if retry and attempts <= notifier.retries:
            delay = notifier.backoff * 2 ** (attempts - 1)
            self._mark(
                item.id,
                state="pending",
                attempts=attempts,
                at=now,
                next_attempt_at=now + timedelta(seconds=delay),
                error=error,
            )
            self._metrics.notifications.labels(item.notifier, "retry").inc()
            logger.warning(
                "page via %s failed (%s); retry %d in %.1fs", item.notifier, error, attempts, delay
            )
            return
        self._mark(item.id, state="failed", attempts=attempts, at=now, error=error)
        self._metrics.notifications.labels(item.notifier, "failed").inc()
        logger.error("page via %s failed for good after %d attempts: %s", item.notifier, attempts, error)
