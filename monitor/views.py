"""The JSON views of the monitor's values: one shape each for a result, target, probe,
incident and notification, served by the API (``monitor.web``), returned by the verify
action and sent in pages (``monitor.notify``).

Field names are stable (add fields, never rename); ``monitor.web``'s docstring lists them.
Times are RFC 3339 UTC with milliseconds (``probes.result.format_time``), durations
seconds in fields named ``*_seconds``, ``null`` is not known (so is a non-finite number).
The evidence report's JSON (``docs/schema/report-v1.json``) is a contract of its own, on
the report's values: ``monitor.report_render.json``.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from monitor.model import (
    Ack,
    Incident,
    IncidentDuty,
    Notification,
    ProbeView,
    ResultSummary,
    ServiceView,
    TargetView,
)
from probes.result import format_time

__all__ = [
    "PAGED_INCIDENT_FIELDS",
    "Bounded",
    "bounds_json",
    "finite",
    "incident_json",
    "notification_json",
    "paged_incident_json",
    "probe_json",
    "probe_status",
    "result_json",
    "target_json",
    "time_json",
]


def time_json(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def result_json(r: ResultSummary) -> dict[str, Any]:
    return {
        "id": r.id,
        "probe": r.probe,
        "target": r.target,
        "check": r.check,
        "seq": r.seq,
        "started_at": time_json(r.started_at),
        "finished_at": time_json(r.finished_at),
        "outcome": r.outcome,
        "stage": r.stage,
        "reason": r.reason,
        "sip_status": r.sip_status,
        "sip_reason": r.sip_reason,
        "post_dial_delay_seconds": finite(r.post_dial_delay),
        "mos": finite(r.mos),
        "confirm": r.confirm,
        "request_id": r.request_id,
        "version": r.version,
        "judged_at": time_json(r.judged),
        "clock_skew_seconds": finite(r.clock_skew),
    }


def target_json(t: TargetView) -> dict[str, Any]:
    return {
        "id": t.id,
        "description": t.description,
        "interval_seconds": t.interval,
        "state": t.state,
        "since": time_json(t.since),
        "why": t.why,
        "last_success_at": time_json(t.last_success_at),
        "covering_probes": list(t.covering_probes),
        "open_incident": t.open_incident,
        "latest": [result_json(r) for r in t.latest],
    }


def probe_status(p: ProbeView) -> str:
    """online | stale (online but not reporting on time) | offline | unknown (never heard of)."""
    if p.online is None:
        return "unknown"
    if not p.online:
        return "offline"
    return "online" if p.up else "stale"


def probe_json(p: ProbeView) -> dict[str, Any]:
    return {
        "id": p.id,
        "status": probe_status(p),
        "online": p.online,
        "up": p.up,
        "status_at": time_json(p.status_at),
        "last_result_at": time_json(p.last_result_at),
        "version": p.version,
        "targets": list(p.targets),
        "outbox": None if p.outbox is None else p.outbox.to_dict(),
        "results_outstanding": p.outstanding,
        "clock_skew_seconds": finite(p.clock_skew),
        "clock_skewed": p.clock_skewed,
    }


def notification_json(n: Notification) -> dict[str, Any]:
    return {
        "notifier": n.notifier,
        "event": n.event,
        "state": n.state,
        "attempts": n.attempts,
        "created_at": time_json(n.created_at),
        "sent_at": time_json(n.sent_at),
        "last_error": n.last_error,
    }


class Bounded(Protocol):
    """What an incident knows of its start: an ``Incident``, or the report's entry of one."""

    @property
    def last_good_id(self) -> str | None: ...
    @property
    def last_good_at(self) -> datetime | None: ...
    @property
    def first_failed_id(self) -> str | None: ...
    @property
    def first_failed_at(self) -> datetime | None: ...


def bounds_json(i: Bounded) -> dict[str, Any]:
    """The last good and the first failed result of an incident, as every incident view has them."""
    return {
        "last_good_id": i.last_good_id,
        "last_good_at": time_json(i.last_good_at),
        "first_failed_id": i.first_failed_id,
        "first_failed_at": time_json(i.first_failed_at),
    }


def service_json(s: ServiceView) -> dict[str, Any]:
    """``id, description, state, paths`` [{target, role, state, lost}]``, redundancy_lost``."""
    return {**dataclasses.asdict(s), "redundancy_lost": s.redundancy_lost}


def ack_json(a: Ack | None) -> dict[str, Any] | None:
    return None if a is None else {"at": time_json(a.at), "by": a.by, "ref": a.ref}


def duty_json(d: IncidentDuty, now: datetime) -> dict[str, Any]:
    """A duty at ``now``: its status, and the seconds left to its due time (negative: overdue)."""
    return {
        "name": d.name,
        "text": d.text,
        "due_at": time_json(d.due_at),
        "escalate_at": time_json(d.escalate_at),
        "route": list(d.route),
        "status": d.status(now),
        "remaining_seconds": round((d.due_at - now).total_seconds(), 3),
        "escalated_at": time_json(d.escalated_at),
        "ack": ack_json(d.ack),
    }


def incident_json(i: Incident, now: datetime | None = None) -> dict[str, Any]:
    """An incident as the API shows it; its duties counted at ``now`` (default: the clock's now)."""
    at = now or datetime.now(UTC)
    return {
        "id": i.id,
        "target": i.target,
        "kind": i.kind,
        "state": "open" if i.resolved_at is None else "resolved",
        "opened_at": time_json(i.opened_at),
        "resolved_at": time_json(i.resolved_at),
        **bounds_json(i),
        "detection_latency_seconds": finite(i.detection_latency),
        "summary": i.summary,
        "notifications": [notification_json(n) for n in i.notifications],
        "ack": ack_json(i.ack),
        "duties": [duty_json(d, at) for d in i.duties],
    }


# What a page carries of its incident (the webhook JSON in docs/monitor.md), in this order: the API's
# view without result ids, state or the page's own delivery record.
PAGED_INCIDENT_FIELDS: Final = (
    "id",
    "target",
    "kind",
    "summary",
    "opened_at",
    "resolved_at",
    "last_good_at",
    "first_failed_at",
    "detection_latency_seconds",
)


def paged_incident_json(i: Incident) -> dict[str, Any]:
    full = incident_json(i)
    return {name: full[name] for name in PAGED_INCIDENT_FIELDS}
