"""The monitor's own pages against a real HTTP receiver: formats, retries, give-up on 4xx,
a durable queue that survives a restart, and no secret in what the page shows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.model import Incident, IncidentDuty
from monitor.notify import Dispatcher
from monitor.store import open_store
from tests.support.monitor import Clock, ProbeSim, monitor_config
from tests.support.system import Receiver


def outage(
    where: Path | str, notifiers: list[dict[str, Any]]
) -> tuple[MonitorCore, list[tuple[Incident, str]]]:
    """A monitor whose target t1 goes down (one incident), pages collected for the dispatcher."""
    clock = Clock()
    config = monitor_config(where, notifiers=notifiers)
    pages: list[tuple[Incident, str]] = []
    core = MonitorCore(
        config, open_store(config.store.where), CollectorRegistry(),
        pager=lambda i, e: pages.append((i, e)), clock=clock,
    )  # fmt: skip
    sim = ProbeSim("p1")
    for confirm in (False, True):
        core.handle(sim.topic("t1"), sim.result("t1", "fail", clock(), confirm=confirm).to_json())
    core.store.commit()
    core.evaluate(clock())
    assert [e for _, e in pages] == ["trigger"]
    return core, pages


def deliver(core: MonitorCore, pages: list[tuple[Incident, str]], until: Callable[[], bool]) -> Dispatcher:
    async def go() -> Dispatcher:
        dispatcher = Dispatcher(
            store=core.store, notifiers=core.config.notifiers, metrics=core.metrics, monitor="m1",
            status_url="http://127.0.0.1:9470/",
        )  # fmt: skip
        for incident, event in pages:
            dispatcher.page(incident, event)
        task = asyncio.create_task(dispatcher.run())
        async with asyncio.timeout(20):
            while not until():  # noqa: ASYNC110 - set by the receiver thread, not the loop
                await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return dispatcher

    return asyncio.run(go())


def sent(core: MonitorCore, notifier: str, outcome: str) -> float:
    value = core.metrics.notifications.labels(notifier, outcome)._value.get()
    return float(value)


def every_kind(receiver: Receiver) -> list[dict[str, Any]]:
    """A webhook, a PagerDuty and a Slack notifier, all posting to ``receiver``."""
    return [
        {"type": "webhook", "name": "hook", "url": receiver.url},
        {"type": "pagerduty", "name": "pd", "url": f"{receiver.base}/pd", "routing_key": "R0UTING"},
        {"type": "slack", "name": "slack", "url": f"{receiver.base}/slack"},
    ]


def test_webhook_pagerduty_and_slack_bodies(store_where: str) -> None:
    receiver = Receiver()
    try:
        core, pages = outage(store_where, every_kind(receiver))
        deliver(core, pages, lambda: len(receiver.bodies) == 3)
        by_path = dict(zip(receiver.paths, receiver.bodies, strict=True))
        hook, pd, slack = by_path["/hook"], by_path["/pd"], by_path["/slack"]
        assert hook["event"] == "trigger" and hook["incident"]["target"] == "t1"
        assert hook["dedup_key"] == "ecpm-m1-incident-1"
        assert hook["incident"]["kind"] == "down" and hook["incident"]["detection_latency_seconds"] == 2.0
        assert pd["routing_key"] == "R0UTING" and pd["event_action"] == "trigger"
        assert pd["dedup_key"] == hook["dedup_key"]
        assert pd["payload"]["severity"] == "critical" and pd["payload"]["component"] == "t1"
        assert slack["text"].startswith(":rotating_light: t1: emergency path DOWN")
        headers = dict(zip(receiver.paths, receiver.headers, strict=True))
        assert headers["/hook"]["idempotency-key"] == "ecpm-m1-incident-1-trigger"
        assert "idempotency-key" not in headers["/slack"]  # Slack has no such key: repeats possible
        assert "idempotency-key" not in headers["/pd"]  # PagerDuty dedups by the body's dedup_key
        # nothing secret was stored with the queued page
        stored = core.store._db.execute("SELECT payload FROM notifications").fetchall()
        assert all("R0UTING" not in row[0] for row in stored)
        assert sent(core, "pd", "sent") == 1.0
    finally:
        receiver.close()


def test_retries_on_5xx_then_succeeds(store_where: str) -> None:
    receiver = Receiver()
    receiver.statuses.extend([500, 503])
    try:
        core, pages = outage(
            store_where, [{"type": "webhook", "name": "hook", "url": receiver.url, "backoff": "100ms"}]
        )
        deliver(core, pages, lambda: sent(core, "hook", "sent") == 1.0)
        assert len(receiver.bodies) == 3  # two refused, the third delivered
        assert sent(core, "hook", "retry") == 2.0
        note = core.store.incidents()[0].notifications[0]
        assert (note.state, note.attempts) == ("sent", 3)
    finally:
        receiver.close()


def test_a_4xx_fails_at_once_and_the_error_shows_no_secret(store_where: str) -> None:
    receiver = Receiver()
    receiver.statuses.append(400)
    secret_url = f"{receiver.base}/services/T000/B000/XXXXSECRET"
    try:
        core, pages = outage(store_where, [{"type": "slack", "name": "slack", "url": secret_url}])
        deliver(core, pages, lambda: sent(core, "slack", "failed") == 1.0)
        note = core.store.incidents()[0].notifications[0]
        assert (note.state, note.attempts) == ("failed", 1)
        assert note.last_error is not None and "HTTP 400" in note.last_error
        assert "XXXXSECRET" not in note.last_error
    finally:
        receiver.close()


def test_gives_up_after_its_retries(store_where: str) -> None:
    receiver = Receiver()
    receiver.statuses.extend([502] * 10)
    try:
        core, pages = outage(
            store_where,
            [{"type": "webhook", "name": "hook", "url": receiver.url, "retries": 2, "backoff": "50ms"}],
        )
        deliver(core, pages, lambda: sent(core, "hook", "failed") == 1.0)
        assert len(receiver.bodies) == 3  # first try + 2 retries
    finally:
        receiver.close()


def test_a_page_queued_before_a_restart_is_delivered_after_it(store_where: str) -> None:
    receiver = Receiver()
    try:
        notifiers = [{"type": "webhook", "name": "hook", "url": receiver.url}]
        core, pages = outage(store_where, notifiers)
        dispatcher = Dispatcher(
            store=core.store, notifiers=core.config.notifiers, metrics=core.metrics, monitor="m1"
        )
        for incident, event in pages:
            dispatcher.page(incident, event)  # queued durably, never sent: the monitor "dies" here
        core.store.close()
        config = monitor_config(store_where, notifiers=notifiers)
        again = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=Clock())
        deliver(again, [], lambda: len(receiver.bodies) == 1)
        assert receiver.bodies[0]["event"] == "trigger"
        # and the restart did not queue it twice
        assert len(again.store.due_notifications(Clock().advance(3600) + timedelta(days=1))) == 0
    finally:
        receiver.close()


def test_a_resolve_never_overtakes_its_trigger(store_where: str) -> None:
    receiver = Receiver()
    receiver.statuses.append(503)  # the trigger's first attempt fails
    try:
        core, pages = outage(
            store_where, [{"type": "webhook", "name": "hook", "url": receiver.url, "backoff": "300ms"}]
        )
        incident = pages[0][0]
        resolved = core.store.incidents()[0]
        pages.append((resolved, "resolve"))  # the path recovered at once: resolve queued right away
        deliver(core, pages, lambda: sent(core, "hook", "sent") == 2.0)
        assert [b["event"] for b in receiver.bodies] == ["trigger", "trigger", "resolve"]
        assert incident.id == resolved.id
    finally:
        receiver.close()


def test_an_unusable_url_fails_the_page_without_stopping_the_dispatcher(store_where: str) -> None:
    receiver = Receiver()
    try:
        core, pages = outage(store_where, [
            {"type": "webhook", "name": "broken", "url": "http://[::1/x"},
            {"type": "webhook", "name": "hook", "url": receiver.url},
        ])  # fmt: skip
        deliver(
            core, pages, lambda: sent(core, "hook", "sent") == 1.0 and sent(core, "broken", "failed") == 1.0
        )
    finally:
        receiver.close()


def test_a_webhook_retry_carries_the_same_idempotency_key(store_where: str) -> None:
    receiver = Receiver()
    receiver.statuses.extend([503, 500])
    try:
        core, pages = outage(
            store_where, [{"type": "webhook", "name": "hook", "url": receiver.url, "backoff": "50ms"}]
        )
        deliver(core, pages, lambda: sent(core, "hook", "sent") == 1.0)
        assert len(receiver.headers) == 3  # two refused, the third delivered
        assert [h.get("idempotency-key") for h in receiver.headers] == ["ecpm-m1-incident-1-trigger"] * 3
    finally:
        receiver.close()


def test_a_page_in_flight_when_the_monitor_dies_is_sent_again_with_the_same_key(store_where: str) -> None:
    """At-least-once: the receiver took the POST, the monitor died before marking it sent."""
    receiver = Receiver()
    receiver.hold(1)  # take the POST, do not answer it
    try:
        notifiers = [{"type": "webhook", "name": "hook", "url": receiver.url, "timeout": "20s"}]
        core, pages = outage(store_where, notifiers)
        deliver(core, pages, lambda: len(receiver.bodies) == 1)  # cancelled mid-POST: the "crash"
        assert core.store.incidents()[0].notifications[0].state == "pending"
        core.store.close()
        receiver.release()
        config = monitor_config(store_where, notifiers=notifiers)
        again = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=Clock())
        deliver(again, [], lambda: sent(again, "hook", "sent") == 1.0)
        assert [b["event"] for b in receiver.bodies] == ["trigger", "trigger"]  # a repeat, as documented
        keys = [h["idempotency-key"] for h in receiver.headers]
        assert keys == ["ecpm-m1-incident-1-trigger"] * 2
        resolved = replace(again.store.incidents()[0], resolved_at=Clock()())
        deliver(again, [(resolved, "resolve")], lambda: len(receiver.bodies) == 3)
        assert receiver.headers[2]["idempotency-key"] == "ecpm-m1-incident-1-resolve"
    finally:
        receiver.close()


def test_an_escalation_goes_to_its_route_only_in_each_notifiers_shape(store_where: str) -> None:
    receiver = Receiver()
    try:
        core, pages = outage(store_where, every_kind(receiver))
        incident = pages[0][0]
        due = incident.opened_at + timedelta(minutes=30)
        duty = IncidentDuty(
            "us-fcc-psap", "notify the PSAPs", due, due - timedelta(minutes=10), ("hook", "pd")
        )
        dispatcher = deliver(core, [], lambda: True)
        dispatcher.escalate(incident, duty)
        dispatcher.escalate(incident, duty)  # once per incident and duty, however often asked
        deliver(core, [], lambda: len(receiver.bodies) == 2)
        by_path = dict(zip(receiver.paths, receiver.bodies, strict=True))
        assert set(by_path) == {"/hook", "/pd"}  # the route: not Slack
        hook, pd = by_path["/hook"], by_path["/pd"]
        assert hook["event"] == "escalate" and hook["duty"]["name"] == "us-fcc-psap"
        assert hook["dedup_key"] == "ecpm-m1-incident-1-duty-us-fcc-psap"
        assert pd["event_action"] == "trigger" and pd["dedup_key"] == hook["dedup_key"]
        assert pd["payload"]["summary"].startswith("DUTY NOT ACKNOWLEDGED: us-fcc-psap for incident 1")
        assert pd["payload"]["custom_details"]["duty"]["text"] == "notify the PSAPs"
        headers = dict(zip(receiver.paths, receiver.headers, strict=True))
        assert headers["/hook"]["idempotency-key"] == "ecpm-m1-incident-1-duty-us-fcc-psap-escalate"
        events = [n.event for n in core.store.open_incidents()[0].notifications]
        assert events.count("escalate:us-fcc-psap") == 2  # hook and pd, one row each
    finally:
        receiver.close()
