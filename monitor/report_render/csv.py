"""The report as CSV: one file per table, each with a header row (``CSV_FILES``).

Text cells that a spreadsheet would run as a formula get a leading ``'`` (OWASP's rule,
applied after NFKC and past leading blanks: a cell starting with tab or CR, or whose
first visible character is ``= + - @`` — also after spaces, newlines, NBSP or zero-width
characters, and in fullwidth forms such as ``＝``); numbers are written as numbers. The
rows are the JSON views (``monitor.report_render.json``) flattened.
"""

from __future__ import annotations

import csv
import json
import math
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from monitor.model import Ack
from monitor.redundancy import LostPeriod
from monitor.report import DutyEntry, Report
from monitor.report_render.json import (
    bucket_json,
    duty_entry_json,
    ledger_json,
    lost_json,
    rounded,
    span_json,
    took_seconds,
)
from probes.result import format_time

__all__ = ["CSV_FILES", "formula_like", "write_csv"]

_FORMULA = ("=", "+", "-", "@")
_BLANK_CATEGORIES = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))  # controls, format chars, spaces


def formula_like(text: str) -> bool:
    """Would a spreadsheet run this cell as a formula? (OWASP CSV injection rule.)

    A cell starting with tab or CR, or one whose first character after NFKC (so
    fullwidth ``＝＋－＠`` count) and after leading whitespace, newlines, control and
    format characters (NBSP, zero-width space, BOM...) is ``= + - @``."""
    if text.startswith(("\t", "\r")):
        return True
    folded = unicodedata.normalize("NFKC", text)
    for c in folded:
        if c.isspace() or unicodedata.category(c) in _BLANK_CATEGORIES:
            continue
        return c in _FORMULA
    return False


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, float):
        return repr(round(value, 9)) if math.isfinite(value) else ""
    if isinstance(value, str) and formula_like(value):
        return "'" + value
    return value


SUMMARY_HEADER: Final = [
    "ledger", "target", "description", "period_start", "period_end", "measured_until",
    "calls_placed", "calls_passed", "calls_failed", "calls_inconclusive",
    "calls_scheduled", "calls_confirmations", "calls_on_demand",
    "options_sent", "options_passed", "options_failed", "options_inconclusive", "blocked_dial_attempts",
    "availability_time", "availability_time_met", "downtime_seconds", "allowed_downtime_seconds",
    "monitored_seconds", "unmonitored_seconds", "monitored_fraction", "availability_time_lower_bound",
    "up_seconds", "degraded_seconds",
    "availability_calls", "availability_calls_met", "failed_calls", "allowed_failed_calls",
    "incidents", "monitoring_gaps", "verifications",
    "register_sent", "register_passed", "register_failed", "register_inconclusive",
    "identity_failed", "identity_cli_missing", "identity_cli_mismatch",
    "identity_location_missing", "identity_location_mismatch",
]  # fmt: skip
INCIDENT_HEADER: Final = [
    "target", "id", "kind", "last_good_id", "last_good_at", "first_failed_id", "first_failed_at",
    "detected_at", "notified_at", "resolved_at", "detection_latency_seconds", "time_to_notify_seconds",
    "duration_seconds", "summary",
]  # fmt: skip
NOTIFICATION_HEADER: Final = [
    "target", "incident_id", "notifier", "event", "state", "attempts", "created_at", "sent_at",
    "after_detection_seconds", "last_error",
]  # fmt: skip
VERIFICATION_HEADER: Final = [
    "target", "request_id", "change_ref", "probes", "required", "requested_at", "deadline", "finished_at",
    "outcome", "took_seconds", "detail",
]  # fmt: skip
BUCKET_HEADER: Final = [
    "target", "start", "end", "calls", "passed", "failed", "inconclusive", "options", "up_seconds",
    "degraded_seconds", "down_seconds", "unmonitored_seconds", "availability", "worst_state",
    "pdd_median_seconds", "pdd_max_seconds",
]  # fmt: skip
SPAN_HEADER: Final = ["target", "state", "start", "end", "seconds", "open_at_start", "open_at_end"]

GAP_FIELDS = (
    "probe", "after_seq", "next_seq", "missing", "detected_at", "repaired", "unrecoverable", "closed_at",
)  # fmt: skip


Rows = Iterable[Sequence[Any]]


def _summary_rows(report: Report) -> Rows:
    for t in report.targets:
        tw, cw, c, p = t.time, t.by_calls, t.calls, t.pings
        r, i = t.registrations, t.identity
        yield (
            report.ledger.status, t.id, t.description, report.start, report.end, report.measured_until,
            c.placed, c.passed, c.failed, c.inconclusive, c.scheduled, c.confirmations, c.on_demand,
            p.sent, p.passed, p.failed, p.inconclusive, t.blocked,
            tw.availability, tw.met, tw.down_seconds, tw.allowed_downtime_seconds,
            tw.monitored_seconds, tw.unmonitored_seconds, tw.monitored_fraction, tw.lower_bound,
            tw.up_seconds, tw.degraded_seconds,
            cw.availability, cw.met, cw.failed, cw.allowed_failures,
            len(t.incidents), len(t.gaps), len(t.verifications),
            r.sent, r.passed, r.failed, r.inconclusive,
            i.failed, i.cli_missing, i.cli_mismatch, i.location_missing, i.location_mismatch,
        )  # fmt: skip


def _incident_rows(report: Report) -> Rows:
    for t in report.targets:
        for i in t.incidents:
            yield (
                t.id, i.id, i.kind, i.last_good_id, i.last_good_at, i.first_failed_id, i.first_failed_at,
                i.detected_at, i.notified_at, i.resolved_at, rounded(i.detection_latency_seconds),
                rounded(i.time_to_notify_seconds), rounded(i.duration_seconds), i.summary,
            )  # fmt: skip


def _notification_rows(report: Report) -> Rows:
    for t in report.targets:
        for i in t.incidents:
            for n in i.notifications:
                yield (
                    t.id, i.id, n.notifier, n.event, n.state, n.attempts, n.created_at, n.sent_at,
                    rounded(n.after_detection_seconds), n.last_error,
                )  # fmt: skip


def _verification_rows(report: Report) -> Rows:
    for t in report.targets:
        for v in t.verifications:
            yield (
                t.id, v.request_id, v.change_ref, " ".join(v.probes), v.required, v.requested_at, v.deadline,
                v.finished_at, v.outcome, took_seconds(v), json.dumps(v.detail, sort_keys=True),
            )  # fmt: skip


def _csv_tables(report: Report) -> list[tuple[str, list[str], Rows]]:
    """(file name, header, rows); rows are generators, so a year of buckets streams out."""
    ts = report.targets
    ledger = ledger_json(report.ledger)
    return [
        ("summary.csv", SUMMARY_HEADER, _summary_rows(report)),
        ("ledger.csv", list(ledger), [list(ledger.values())]),
        ("buckets.csv", BUCKET_HEADER, ((t.id, *bucket_json(b).values()) for t in ts for b in t.buckets)),
        ("timeline.csv", SPAN_HEADER, ((t.id, *span_json(s).values()) for t in ts for s in t.timeline)),
        ("incidents.csv", INCIDENT_HEADER, _incident_rows(report)),
        ("notifications.csv", NOTIFICATION_HEADER, _notification_rows(report)),
        ("gaps.csv", SPAN_HEADER, ((t.id, *span_json(s).values()) for t in ts for s in t.gaps)),
        (
            "probe_outages.csv",
            ["probe", "start", "end", "seconds", "open_at_start", "open_at_end"],
            (
                (o.probe, o.start, o.end, rounded(o.seconds), o.open_at_start, o.open_at_end)
                for o in report.probe_outages
            ),
        ),
        (
            "sequence_gaps.csv",
            list(GAP_FIELDS),
            (tuple(getattr(g, name) for name in GAP_FIELDS) for g in report.seq_gaps),
        ),
        ("verifications.csv", VERIFICATION_HEADER, _verification_rows(report)),
        (
            "versions.csv",
            ["probe", "version", "first_seen", "last_seen", "results"],
            ((v.probe, v.version, v.first_seen, v.last_seen, v.results) for v in report.versions),
        ),
        (
            "refusals.csv",
            ["target", "at", "probe", "check", "stage", "result_id", "request_id", "confirm"],
            (
                (t.id, r.judged, r.probe, r.check, r.stage, r.id, r.request_id, r.confirm)
                for t in ts
                for r in t.refusals
            ),
        ),
        (
            "coverage.csv",
            ["target", "probe", "results", "first_at", "last_at"],
            ((t.id, c.probe, c.results, c.first_at, c.last_at) for t in ts for c in t.coverage),
        ),
        (
            "clock_skew.csv",
            CLOCK_SKEW_HEADER,
            (
                (
                    k.probe,
                    k.results,
                    k.estimated,
                    k.min_seconds,
                    k.max_seconds,
                    k.skewed,
                    k.first_skewed_at,
                    k.last_skewed_at,
                    report.max_clock_skew,
                )
                for k in report.clock_skew
            ),
        ),
        (
            "skewed_results.csv",
            ["probe", "target", "seq", "result_id", "finished_at", "judged_at", "clock_skew_seconds"],
            (
                (x.probe, x.target, x.seq, x.id, x.finished_at, x.judged_at, x.clock_skew)
                for k in report.clock_skew
                for x in k.listed
            ),
        ),
        (
            "unreadable.csv",
            ["target", "start", "end", "problem"],
            ((u.target, u.start, u.end, u.problem) for u in report.unreadable),
        ),
        (
            "duties.csv",
            DUTY_HEADER,
            (
                (t.id, i.id, *_duty_row(d), *_ack(i.acknowledged))
                for t in ts
                for i in t.incidents
                for d in i.duties
            ),
        ),
        ("redundancy_lost.csv", list(lost_json(_NO_LOSS)), (lost_row(p) for p in report.redundancy)),
    ]


DUTY_HEADER: Final = [
    "target", "incident", "name", "text", "due_at", "escalate_at", "route", "status", "escalated_at",
    "acknowledged_at", "acknowledged_by", "reference", "incident_acknowledged_at", "incident_acknowledged_by",
    "incident_reference",
]  # fmt: skip
# its header comes from the JSON view (so the columns cannot drift from report.json)
_NO_LOSS: Final = LostPeriod(
    "", datetime.min.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC), (), "degraded"
)


def _ack(a: Ack | None) -> tuple[Any, Any, Any]:
    return (None, None, None) if a is None else (a.at, a.by, a.ref)


def _duty_row(d: DutyEntry) -> list[Any]:
    """report.json's duty, its route joined and its acknowledgement in three columns."""
    view = duty_entry_json(d)
    view["route"] = " ".join(d.duty.route)
    del view["ack"]
    return [*view.values(), *_ack(d.duty.ack)]


def lost_row(p: LostPeriod) -> list[Any]:
    row = lost_json(p)
    row["lost_paths"] = " ".join(p.lost)
    return list(row.values())


CSV_FILES: Final = (
    "summary.csv", "ledger.csv", "buckets.csv", "timeline.csv", "incidents.csv", "notifications.csv",
    "gaps.csv", "probe_outages.csv", "sequence_gaps.csv", "verifications.csv", "versions.csv",
    "refusals.csv", "coverage.csv", "clock_skew.csv", "skewed_results.csv", "unreadable.csv",
    "duties.csv", "redundancy_lost.csv",
)  # fmt: skip
CLOCK_SKEW_HEADER: Final = [
    "probe", "results", "estimated", "min_seconds", "max_seconds", "skewed", "first_skewed_at",
    "last_skewed_at", "max_clock_skew_seconds",
]  # fmt: skip


def write_csv(report: Report, directory: Path) -> list[Path]:
    written = []
    for name, header, rows in _csv_tables(report):
        path = directory / name
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(header)
            for row in rows:
                writer.writerow([_cell(v) for v in row])
        written.append(path)
    return written
