"""``report.json``: the report as JSON-ready data, following ``docs/schema/report-v1.json``.

The CSV tables (``monitor.report_render.csv``) flatten these same views, so a figure has
one rounding and one time format in both. The ledger comes first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.redundancy import LostPeriod
from monitor.report import (
    Bucket,
    DutyEntry,
    IncidentEntry,
    LedgerCheck,
    Notice,
    ProbeOutage,
    ProbeSkew,
    Report,
    Span,
    TargetReport,
)
from monitor.store import Verification
from monitor.views import ack_json, bounds_json, duty_json, notification_json
from monitor.views import time_json as _t

__all__ = [
    "bucket_json",
    "duty_entry_json",
    "ledger_json",
    "lost_json",
    "report_json",
    "rounded",
    "span_json",
    "took_seconds",
    "write_json",
]


def rounded(seconds: float | None) -> float | None:
    """Seconds, rounded to the millisecond the store keeps."""
    return None if seconds is None else round(seconds, 3)


def took_seconds(v: Verification) -> float | None:
    return None if v.finished_at is None else rounded((v.finished_at - v.requested_at).total_seconds())


def span_json(s: Span) -> dict[str, Any]:
    return {"state": s.state, **_interval(s)}


def _interval(s: Span | ProbeOutage) -> dict[str, Any]:
    return {
        "start": _t(s.start),
        "end": _t(s.end),
        "seconds": rounded(s.seconds),
        "open_at_start": s.open_at_start,
        "open_at_end": s.open_at_end,
    }


def bucket_json(b: Bucket) -> dict[str, Any]:
    return {
        "start": _t(b.start),
        "end": _t(b.end),
        "calls": b.calls,
        "passed": b.passed,
        "failed": b.failed,
        "inconclusive": b.inconclusive,
        "options": b.pings,
        "up_seconds": rounded(b.up_seconds),
        "degraded_seconds": rounded(b.degraded_seconds),
        "down_seconds": rounded(b.down_seconds),
        "unmonitored_seconds": rounded(b.unmonitored_seconds),
        "availability": b.availability,
        "worst_state": b.worst_state,
        "pdd_median_seconds": b.pdd_median,
        "pdd_max_seconds": b.pdd_max,
    }


def _incident(i: IncidentEntry) -> dict[str, Any]:
    return {
        "id": i.id,
        "kind": i.kind,
        "summary": i.summary,
        **bounds_json(i),
        "detected_at": _t(i.detected_at),
        "notified_at": _t(i.notified_at),
        "resolved_at": _t(i.resolved_at),
        "detection_latency_seconds": rounded(i.detection_latency_seconds),
        "time_to_notify_seconds": rounded(i.time_to_notify_seconds),
        "duration_seconds": rounded(i.duration_seconds),
        "notifications": [_notice(n) for n in i.notifications],
        "acknowledged": ack_json(i.acknowledged),
        "duties": [duty_entry_json(d) for d in i.duties],
    }


def duty_entry_json(d: DutyEntry) -> dict[str, Any]:
    """The API's view of a duty (``monitor.views.duty_json``) at the measured end, without the
    seconds left (a countdown, not evidence)."""
    view = duty_json(d.duty, d.at)
    del view["remaining_seconds"]
    return view


def lost_json(p: LostPeriod) -> dict[str, Any]:
    return {
        "service": p.service,
        "start": _t(p.start),
        "end": _t(p.end),
        "seconds": rounded(p.seconds),
        "lost_paths": list(p.lost),
        "worst_state": p.worst,
    }


def _notice(n: Notice) -> dict[str, Any]:
    """The monitor's notification view, with how long after detection it was sent."""
    view = notification_json(n)
    last_error = view.pop("last_error")  # last in the schema's order
    return {**view, "after_detection_seconds": rounded(n.after_detection_seconds), "last_error": last_error}


def _verification(v: Verification) -> dict[str, Any]:
    return {
        "request_id": v.request_id,
        "target": v.target,
        "change_ref": v.change_ref,
        "probes": list(v.probes),
        "required": v.required,
        "requested_at": _t(v.requested_at),
        "deadline": _t(v.deadline),
        "finished_at": _t(v.finished_at),
        "outcome": v.outcome,
        "took_seconds": took_seconds(v),
        "detail": v.detail,
    }


def ledger_json(ledger: LedgerCheck) -> dict[str, Any]:
    return {
        "status": ledger.status,
        "ok": ledger.ok,
        "scope": "every row in the store",
        "rows_checked": ledger.rows_checked,
        "rows_total": ledger.rows_total,
        "first_broken_row": ledger.first_broken_row,
        "first_broken_id": ledger.first_broken_id,
        "problem": ledger.problem,
        "verified_hash": ledger.verified_hash,
        "period_last_row": ledger.period_last_row,
        "period_last_id": ledger.period_last_id,
        "period_last_hash": ledger.period_last_hash,
        "last_row": ledger.last_row,
        "last_id": ledger.last_id,
        "last_hash": ledger.last_hash,
    }


def _target(t: TargetReport) -> dict[str, Any]:
    tw, cw = t.time, t.by_calls
    return {
        "id": t.id,
        "description": t.description,
        "calls": {
            "placed": t.calls.placed,
            "passed": t.calls.passed,
            "failed": t.calls.failed,
            "inconclusive": t.calls.inconclusive,
            "scheduled": t.calls.scheduled,
            "confirmations": t.calls.confirmations,
            "on_demand": t.calls.on_demand,
        },
        "options": {
            "sent": t.pings.sent,
            "passed": t.pings.passed,
            "failed": t.pings.failed,
            "inconclusive": t.pings.inconclusive,
        },
        "register": {
            "sent": t.registrations.sent,
            "passed": t.registrations.passed,
            "failed": t.registrations.failed,
            "inconclusive": t.registrations.inconclusive,
        },
        "identity": {
            "failed": t.identity.failed,
            "cli_missing": t.identity.cli_missing,
            "cli_mismatch": t.identity.cli_mismatch,
            "location_missing": t.identity.location_missing,
            "location_mismatch": t.identity.location_mismatch,
        },
        "blocked_dial_attempts": t.blocked,
        "fresh_within_seconds": rounded(t.fresh_within),
        "availability": {
            "time_weighted": {
                "availability": tw.availability,
                "met": tw.met,
                "period_seconds": rounded(tw.period_seconds),
                "monitored_seconds": rounded(tw.monitored_seconds),
                "unmonitored_seconds": rounded(tw.unmonitored_seconds),
                "monitored_fraction": tw.monitored_fraction,
                "up_seconds": rounded(tw.up_seconds),
                "degraded_seconds": rounded(tw.degraded_seconds),
                "down_seconds": rounded(tw.down_seconds),
                "allowed_downtime_seconds": rounded(tw.allowed_downtime_seconds),
                "lower_bound": tw.lower_bound,
            },
            "call_weighted": {
                "availability": cw.availability,
                "met": cw.met,
                "passed": cw.passed,
                "failed": cw.failed,
                "allowed_failures": round(cw.allowed_failures, 6),
            },
        },
        "incidents": [_incident(i) for i in t.incidents],
        "monitoring_gaps": [span_json(s) for s in t.gaps],
        "verifications": [_verification(v) for v in t.verifications],
        "refusals": [
            {
                "at": _t(r.judged),
                "probe": r.probe,
                "check": r.check,
                "stage": r.stage,
                "result_id": r.id,
                "request_id": r.request_id,
                "confirm": r.confirm,
            }
            for r in t.refusals
        ],
        "coverage": [
            {"probe": c.probe, "results": c.results, "first_at": _t(c.first_at), "last_at": _t(c.last_at)}
            for c in t.coverage
        ],
        "longest_silence": {
            "start": _t(t.longest_silence.start),
            "end": _t(t.longest_silence.end),
            "seconds": rounded(t.longest_silence.seconds),
        },
        "timeline": [span_json(s) for s in t.timeline],
        "buckets": [bucket_json(b) for b in t.buckets],
    }


def report_json(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (``docs/schema/report-v1.json``); the ledger comes first."""
    return {
        "schema": report.schema,
        "ledger": ledger_json(report.ledger),
        "generated_at": _t(report.generated_at),
        "software": f"ecpm {report.software}",
        "store": report.store,
        "period": {
            "start": _t(report.start),
            "end": _t(report.end),
            "measured_until": _t(report.measured_until),
            "seconds": rounded((report.measured_until - report.start).total_seconds()),
        },
        "definitions": {
            "availability_target": report.availability_target,
            "bucket_seconds": report.bucket_seconds,
            "pdd_threshold_seconds": report.pdd_threshold,
            "max_clock_skew_seconds": report.max_clock_skew,
            "judged_time": "every time taken from a result is the monitor-judged time: the probe's "
            "finished_at corrected by the probe's estimated clock skew, never later than the monitor "
            "received it",
            "time_weighted": "(up + degraded) / (up + degraded + down) seconds of the recorded state "
            "timeline; unknown, and any time without a result within fresh_within_seconds, is "
            "unmonitored and excluded (see monitored_fraction, lower_bound)",
            "call_weighted": "passed / (passed + failed) invite test calls placed; inconclusive and "
            "blocked dial attempts excluded",
        },
        "targets": [_target(t) for t in report.targets],
        "probes": {
            "outages": [{"probe": o.probe, **_interval(o)} for o in report.probe_outages],
            "sequence_gaps": [
                {
                    "probe": g.probe,
                    "after_seq": g.after_seq,
                    "next_seq": g.next_seq,
                    "missing": g.missing,
                    "detected_at": _t(g.detected_at),
                    "repaired": g.repaired,
                    "unrecoverable": g.unrecoverable,
                    "closed_at": _t(g.closed_at) if g.closed_at is not None else None,
                }
                for g in report.seq_gaps
            ],
            "clock_skew": [_probe_skew(k) for k in report.clock_skew],
            "versions": [
                {
                    "probe": v.probe,
                    "version": v.version,
                    "first_seen": _t(v.first_seen),
                    "last_seen": _t(v.last_seen),
                    "results": v.results,
                }
                for v in report.versions
            ],
        },
        "unreadable": [
            {"target": u.target, "start": _t(u.start), "end": _t(u.end), "problem": u.problem}
            for u in report.unreadable
        ],
        "redundancy_lost": [lost_json(p) for p in report.redundancy],
    }


def _probe_skew(k: ProbeSkew) -> dict[str, Any]:
    return {
        "probe": k.probe,
        "results": k.results,
        "estimated": k.estimated,
        "min_seconds": k.min_seconds,
        "max_seconds": k.max_seconds,
        "skewed": k.skewed,
        "first_skewed_at": _t(k.first_skewed_at),
        "last_skewed_at": _t(k.last_skewed_at),
        "skewed_results": [
            {
                "result_id": x.id,
                "target": x.target,
                "seq": x.seq,
                "finished_at": _t(x.finished_at),
                "judged_at": _t(x.judged_at),
                "clock_skew_seconds": x.clock_skew,
            }
            for x in k.listed
        ],
    }


def write_json(report: Report, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        json.dump(report_json(report), f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return path
