"""``report.html``: one self-contained file with inline CSS and inline SVG charts, no
script and no external asset (its Content-Security-Policy allows nothing else); every
value from the store is escaped. Prints to PDF with a page per target.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import statistics
import string
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from html import escape
from importlib import resources
from pathlib import Path
from typing import Final

from monitor.report import Bucket, Notice, ProbeOutage, ProbeSkew, Report, Span, TargetReport
from monitor.report_render.json import took_seconds
from probes.result import format_time

__all__ = ["HTML_ROWS", "pct", "render_html", "write_html"]

HTML_ROWS: Final = 200  # longest table the HTML shows; the CSV and JSON have every row


# ---------------------------------------------------------------- HTML: formatting


def _e(value: object) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return escape(str(value), quote=True)


def pct(ratio: float | None) -> str:
    """A ratio as a percentage with four decimals, rounded *down*, so a figure short of
    the target never reads as 99.9990 %."""
    if ratio is None:
        return "n/a"
    return f"{math.floor(ratio * 1_000_000 + 1e-6) / 10_000:.4f} %"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


def target_pct(ratio: float) -> str:
    """The availability target as people write it: 99.999 %."""
    return f"{ratio * 100:.6g} %"


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    text = format_time(moment)
    text = text.replace(".000Z", "Z")
    return text.replace("T", " ")


def _time(moment: datetime | None) -> str:
    """A ``<time>``; a narrow column may wrap it between date and time of day, nowhere else."""
    if moment is None:
        return "—"
    date, _, clock = when(moment).partition(" ")
    return (
        f'<time datetime="{_e(format_time(moment))}"><span class="nw">{_e(date)}</span>'
        f' <span class="nw">{_e(clock)}</span></time>'
    )


def _verdict(met: bool | None) -> str:
    if met is None:
        return '<span class="verdict na" data-verdict="n/a">n/a</span>'
    if met:
        return '<span class="verdict met" data-verdict="met">met</span>'
    return '<span class="verdict not-met" data-verdict="not met">not met</span>'


def _table(
    headers: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[str]],
    *,
    empty: str,
    name: str,
    total: int | None = None,
    csv_name: str = "",
    row_attrs: Sequence[str] | None = None,
) -> str:
    """``headers``: (label, css class); ``rows``: cells already HTML."""
    if not rows:
        return f'<p class="empty" data-table="{_e(name)}">{_e(empty)}</p>'
    head = "".join(f'<th class="{_e(c)}">{_e(label)}</th>' for label, c in headers)
    body = []
    for n, row in enumerate(rows):
        attrs = row_attrs[n] if row_attrs else ""
        cells = "".join(f'<td class="{_e(c)}">{cell}</td>' for (_, c), cell in zip(headers, row, strict=True))
        body.append(f"<tr{attrs}>{cells}</tr>")
    more = ""
    if total is not None and total > len(rows):
        more = (
            f'<p class="more">{len(rows)} of {total} rows shown;'
            f" all are in {_e(csv_name)} and report.json.</p>"
        )
    return (
        f'<table data-table="{_e(name)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{more}"
    )


# ---------------------------------------------------------------- HTML: charts

_W: Final = 1000.0  # chart width in SVG units
_LEFT: Final = 64.0  # room for row labels


def _ticks(start: datetime, end: datetime) -> list[tuple[datetime, str]]:
    seconds = (end - start).total_seconds()
    steps = [3600 * h for h in (1, 2, 3, 6, 12)] + [86400 * d for d in (1, 2, 7, 14, 30, 61, 91)]
    step = next((s for s in steps if seconds / s <= 12), steps[-1])
    first = datetime.fromtimestamp(math.ceil(start.timestamp() / step) * step, UTC)
    ticks, t = [], first
    while t <= end:
        if step < 86400:
            label = t.strftime("%H:%M") if t.hour or t.minute else t.strftime("%d %b")
        else:
            label = t.strftime("%d %b")
        ticks.append((t, label))
        t += timedelta(seconds=step)
    return ticks


def _x(moment: datetime, start: datetime, end: datetime) -> float:
    span = (end - start).total_seconds() or 1.0
    return _LEFT + (_W - _LEFT) * (moment - start).total_seconds() / span


def _axis(start: datetime, end: datetime, y: float, height: float) -> str:
    out = []
    for t, label in _ticks(start, end):
        x = _x(t, start, end)
        anchor = "start" if x < _LEFT + 20 else "end" if x > _W - 20 else "middle"
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{y - height:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 12:.1f}" text-anchor="{anchor}">{_e(label)}</text>')
    return "".join(out)


def _svg(height: float, body: str, label: str, *, crisp: bool = False) -> str:
    edges = ' shape-rendering="crispEdges"' if crisp else ""
    return (
        f'<svg viewBox="0 0 {_W:.0f} {height:.0f}" role="img" aria-label="{_e(label)}"{edges}'
        f' xmlns="http://www.w3.org/2000/svg"><title>{_e(label)}</title>{body}</svg>'
    )


def timeline_svg(report: Report, t: TargetReport) -> str:
    """The state timeline: one bar over the period, coloured by state."""
    start, end = report.start, report.measured_until
    bar = 26.0
    rects = []
    # up first, the others on top, each at least one unit wide so a short outage in a year shows
    for span in sorted(t.timeline, key=lambda s: s.state != "up"):
        x0, x1 = _x(span.start, start, end), _x(span.end, start, end)
        width = max(x1 - x0, 1.0 if span.state != "up" else 0.0)
        rects.append(
            f'<rect class="s-{_e(span.state)}" data-state="{_e(span.state)}" x="{x0:.2f}" y="2"'
            f' width="{width:.2f}" height="{bar:.0f}"><title>{_e(span.state)} {_e(when(span.start))}'
            f" – {_e(when(span.end))} ({_e(duration(span.seconds))})</title></rect>"
        )
    label = f'<text x="0" y="{bar / 2 + 6:.0f}">state</text>'
    body = label + "".join(rects) + _axis(start, end, bar + 6, bar + 4)
    return _svg(bar + 22, body, f"State timeline of {t.id}", crisp=True)


def heat_svg(report: Report, t: TargetReport) -> str:
    """15-minute buckets: one row per UTC day, 96 columns, coloured by the worst state."""
    if not t.buckets:
        return ""
    first_day = t.buckets[0].start.replace(hour=0, minute=0, second=0, microsecond=0)
    days = (t.buckets[-1].start - first_day).days + 1
    row = 18.0 if days <= 7 else max(1.5, min(18.0, 420.0 / days))
    cell = (_W - _LEFT) / 96
    runs: list[str] = []
    labels: list[str] = []
    current: tuple[int, int, str, Bucket, Bucket] | None = None  # day, first column, state, first, last

    def close(run: tuple[int, int, str, Bucket, Bucket], last_col: int) -> None:
        day, col, state, b0, b1 = run
        tip = f"{when(b0.start)} – {when(b1.end)}: worst {state}"
        if b0 is b1:
            tip += f"; {b0.calls} calls, {b0.failed} failed, availability {pct(b0.availability)}"
        runs.append(
            f'<rect class="s-{_e(state)}" x="{_LEFT + col * cell:.2f}" y="{day * row:.2f}"'
            f' width="{(last_col - col + 1) * cell:.2f}" height="{max(row - (1 if row > 4 else 0), 1):.2f}">'
            f"<title>{_e(tip)}</title></rect>"
        )

    last_col = -1
    for b in t.buckets:
        day = (b.start - first_day).days
        col = (b.start.hour * 60 + b.start.minute) // 15
        if current is not None and (current[0] != day or current[2] != b.worst_state or col != last_col + 1):
            close(current, last_col)
            current = None
        current = (day, col, b.worst_state, b, b) if current is None else (*current[:4], b)
        last_col = col
    if current is not None:
        close(current, last_col)
    label_every = max(1, math.ceil(12 / row)) if row < 12 else 1
    for day in range(0, days, label_every):
        moment = first_day + timedelta(days=day)
        y = day * row + max(min(row, 12) - 1, 10)
        labels.append(f'<text x="0" y="{y:.1f}">{_e(moment.strftime("%d %b"))}</text>')
    height = days * row
    hours = []
    for h in range(0, 25, 3):
        x = _LEFT + h * 4 * cell
        anchor = "start" if h == 0 else "end" if h == 24 else "middle"
        hours.append(f'<text x="{x:.1f}" y="{height + 13:.1f}" text-anchor="{anchor}">{h:02d}:00</text>')
    body = "".join(labels) + "".join(runs) + "".join(hours)
    return _svg(height + 17, body, f"15-minute buckets of {t.id}, worst state per quarter hour", crisp=True)


def pdd_svg(report: Report, t: TargetReport) -> str:
    """Post-dial delay (stage ``ringing``) of passed calls: median and maximum per quarter hour."""
    points = [b for b in t.buckets if b.pdd_median is not None]
    if not points:
        return ""
    start, end = report.start, report.measured_until
    top = max(report.pdd_threshold * 1.25, max(b.pdd_max or 0.0 for b in points) * 1.1)
    height, pad = 120.0, 6.0

    def y(value: float) -> float:
        return pad + (height - pad) * (1 - value / top)

    # one column per SVG unit: median of the medians, maximum of the maxima
    columns: dict[int, tuple[list[float], float, datetime]] = {}
    for b in points:
        mid = b.start + (b.end - b.start) / 2
        col = int(_x(mid, start, end))
        medians, peak, _ = columns.get(col, ([], 0.0, mid))
        medians.append(b.pdd_median or 0.0)
        columns[col] = (medians, max(peak, b.pdd_max or 0.0), mid)
    lines: list[list[str]] = []
    previous = None
    gap = max(3.0, (_W - _LEFT) * 2 * report.bucket_seconds / max((end - start).total_seconds(), 1.0))
    dots = []
    for col in sorted(columns):
        medians, peak, _ = columns[col]
        if previous is None or col - previous > gap:
            lines.append([])
        lines[-1].append(f"{col:.0f},{y(statistics.median(medians)):.1f}")
        dots.append(f'<rect class="max" x="{col - 0.8:.1f}" y="{y(peak):.1f}" width="1.6" height="1.6"/>')
        previous = col
    paths = "".join(f'<polyline class="median" points="{" ".join(line)}"/>' for line in lines)
    limit = y(report.pdd_threshold)
    grid = []
    for value in _nice_steps(top):
        grid.append(
            f'<line class="grid" x1="{_LEFT:.0f}" x2="{_W:.0f}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
            f'<text x="{_LEFT - 4:.0f}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g} s</text>'
        )
    body = (
        "".join(grid)
        + f'<line class="limit" x1="{_LEFT:.0f}" x2="{_W:.0f}" y1="{limit:.1f}" y2="{limit:.1f}"/>'
        + f'<text x="{_W - 2:.0f}" y="{limit - 3:.1f}" text-anchor="end">degraded above'
        f" {report.pdd_threshold:g} s</text>" + "".join(dots) + paths + _axis(start, end, height + 4, 0)
    )
    return _svg(height + 20, body, f"Post-dial delay of {t.id}: median and maximum per quarter hour")


def _nice_steps(top: float) -> list[float]:
    for step in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        if top / step <= 5:
            return [round(step * i, 3) for i in range(int(top / step) + 1)]
    return [0.0, top]


# ---------------------------------------------------------------- HTML: sections


def _ledger_html(report: Report) -> str:
    led = report.ledger
    if led.ok:
        return (
            f'<div class="ledger ok" data-ledger="verified">Ledger verified: every stored row'
            f" ({led.rows_checked}) chains to the one before it."
            f'<span class="sub">Last row overall #{_e(led.last_row or "—")}: <code class="hash">'
            f"{_e(led.last_hash or led.verified_hash)}</code></span></div>"
        )
    return (
        f'<div class="ledger broken" role="alert" data-ledger="broken">Ledger {_e(led.status)}'
        f'<span class="sub">The stored results were altered, removed or reordered at or after that row;'
        f" {led.rows_checked - 1} rows before it verified. Figures below are computed from the store"
        f" as it is now and cannot be relied on.</span></div>"
    )


def _overview(report: Report) -> str:
    rows = []
    for t in report.targets:
        tw, cw = t.time, t.by_calls
        rows.append(
            [
                f'<a href="#t-{_e(t.id)}">{_e(t.id)}</a>',
                str(t.calls.placed),
                str(t.calls.passed),
                _n(t.calls.failed, "bad"),
                _n(t.calls.inconclusive, "warn"),
                f"{pct(tw.availability)} {_verdict(tw.met)}",
                f"{_e(duration(tw.down_seconds))} / {_e(duration(tw.allowed_downtime_seconds))}",
                f"{pct(cw.availability)} {_verdict(cw.met)}",
                pct(tw.monitored_fraction),
                str(len(t.incidents)),
                _n(t.blocked, "bad"),
            ]
        )
    table = _table(
        [
            ("Target", ""), ("Calls", "num"), ("Passed", "num"), ("Failed", "num"), ("Inconcl.", "num"),
            ("Availability (time)", "num"), ("Down / allowed", "num"), ("Availability (calls)", "num"),
            ("Monitored", "num"), ("Incidents", "num"), ("Blocked", "num"),
        ],
        rows,
        empty="No targets.",
        name="overview",
        row_attrs=[f' data-target="{_e(t.id)}"' for t in report.targets],
    )  # fmt: skip
    return f'<section class="panel"><h2>Summary</h2>{table}</section>'


def _n(count: int, cls: str) -> str:
    return f'<span class="{cls}">{count}</span>' if count else "0"


def _fig(name: str, label: str, value: str, note: str) -> str:
    return (
        f'<div class="fig" data-figure="{_e(name)}"><div class="label">{_e(label)}</div>'
        f'<div class="value">{value}</div><div class="note">{note}</div></div>'
    )


def _target_html(report: Report, t: TargetReport) -> str:
    tw, cw, c, p = t.time, t.by_calls, t.calls, t.pings
    verdict = (
        "v-met"
        if tw.met and cw.met is not False
        else "v-not-met"
        if tw.met is False or cw.met is False
        else ""
    )
    figures = "".join(
        [
            _fig(
                "availability-time",
                "Availability, time-weighted",
                f"{pct(tw.availability)} {_verdict(tw.met)}",
                f"down {_e(duration(tw.down_seconds))}, allowed {_e(duration(tw.allowed_downtime_seconds))}"
                f" at {_e(target_pct(report.availability_target))}",
            ),
            _fig(
                "availability-calls",
                "Availability, call-weighted",
                f"{pct(cw.availability)} {_verdict(cw.met)}",
                f"{cw.failed} failed of {cw.passed + cw.failed}, allowed {cw.allowed_failures:.3f}",
            ),
            _fig(
                "monitored",
                "Monitored",
                pct(tw.monitored_fraction),
                f"unmonitored {_e(duration(tw.unmonitored_seconds))}; if all of it was down:"
                f" {_e(pct(tw.lower_bound))}",
            ),
            _fig(
                "calls",
                "Test calls placed",
                str(c.placed),
                f'<span class="good">{c.passed} passed</span>, {_n(c.failed, "bad")} failed,'
                f" {_n(c.inconclusive, 'warn')} inconclusive; {c.scheduled} scheduled,"
                f" {c.confirmations} confirmations, {c.on_demand} on demand."
                f" OPTIONS: {p.sent} sent, {p.passed} passed, {p.failed} failed, {p.inconclusive} inconcl."
                f" Blocked dial attempts: {_n(t.blocked, 'bad')}.",
            ),
        ]
    )
    title = _e(t.id) + (f' <span class="muted">— {_e(t.description)}</span>' if t.description else "")
    charts = (
        "<h3>State over the period</h3>"
        f'<div class="chart" data-chart="timeline">{timeline_svg(report, t)}</div>'
        '<p class="legend"><i class="s-up"></i>up<i class="s-degraded"></i>degraded<i class="s-down"></i>down'
        '<i class="s-unknown"></i>unknown (unmonitored)</p>'
        f'<h3>Quarter hours (UTC), worst state in each</h3><div class="chart" data-chart="heat">'
        f"{heat_svg(report, t)}</div>"
    )
    pdd = pdd_svg(report, t)
    charts += "<h3>Post-dial delay of passed calls (median line, maximum dots, per quarter hour)</h3>" + (
        f'<div class="chart" data-chart="pdd">{pdd}</div>' if pdd else '<p class="empty">No passed calls.</p>'
    )
    sections = [
        _incidents_html(t),
        _gaps_html(t),
        _verifications_html(t),
        _refusals_html(t),
        _coverage_html(t),
        _buckets_html(t),
    ]
    return (
        f'<section class="panel target {verdict}" id="t-{_e(t.id)}" data-target="{_e(t.id)}">'
        f'<h2>{title}</h2><div class="figures">{figures}</div>{charts}{"".join(sections)}</section>'
    )


def _page_html(n: Notice) -> str:
    head = f"<b>{_e(n.notifier)}</b> {_e(n.event)} "
    if n.state == "sent":
        after = duration(n.after_detection_seconds)
        return head + f'<span class="good">sent</span> {_time(n.sent_at)} (+{_e(after)})'
    cls = "bad" if n.state == "failed" else "warn"
    tries = f"{n.attempts} attempt{'s' if n.attempts != 1 else ''}"
    error = f": {_e(n.last_error)}" if n.last_error else ""
    return head + f'<span class="{cls}">{_e(n.state)}</span> after {tries}{error}'


def _incidents_html(t: TargetReport) -> str:
    headers = [
        ("#", ""), ("Kind", ""), ("Last good", "t"), ("First failure", "t"), ("Detected", "t"),
        ("Detection latency", "num"), ("Notified", "t"), ("To notify", "num"), ("Resolved", "t"),
        ("Duration", "num"),
    ]  # fmt: skip
    if not t.incidents:
        return '<h3>Incidents</h3><p class="empty" data-table="incidents">No incidents in the period.</p>'
    body = []
    for i in t.incidents[:HTML_ROWS]:
        kind = "down" if i.kind == "down" else "unknown"
        cells = [
            f"#{i.id}",
            f'<span class="st s-{kind}">{_e(i.kind)}</span>',
            _time(i.last_good_at),
            _time(i.first_failed_at),
            _time(i.detected_at),
            _e(duration(i.detection_latency_seconds)),
            _time(i.notified_at) if i.notified_at else '<span class="bad">not sent</span>',
            _e(duration(i.time_to_notify_seconds)),
            _time(i.resolved_at) if i.resolved_at else '<span class="bad">open</span>',
            _e(duration(i.duration_seconds)),
        ]
        row = "".join(f'<td class="{c}">{cell}</td>' for (_, c), cell in zip(headers, cells, strict=True))
        pages = " · ".join(_page_html(n) for n in i.notifications) or "no notifier configured"
        body.append(
            f'<tr class="main" data-incident="{i.id}">{row}</tr>'
            f'<tr class="detail" data-incident-detail="{i.id}"><td></td><td colspan="{len(headers) - 1}">'
            f"{_e(i.summary)}<br>Pages: {pages}</td></tr>"
        )
    head = "".join(f'<th class="{c}">{_e(label)}</th>' for label, c in headers)
    more = ""
    if len(t.incidents) > HTML_ROWS:
        more = (
            f'<p class="more">{HTML_ROWS} of {len(t.incidents)} shown;'
            " all are in incidents.csv and report.json.</p>"
        )
    return (
        '<h3>Incidents</h3><table class="incidents" data-table="incidents">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"
    )


def _span_note(s: Span | ProbeOutage) -> str:
    notes = []
    if s.open_at_start:
        notes.append("began before the period")
    if s.open_at_end:
        notes.append("still open at its end")
    return ", ".join(notes)


def _gaps_html(t: TargetReport) -> str:
    rows = [
        [_time(s.start), _time(s.end), _e(duration(s.seconds)), _e(_span_note(s))] for s in t.gaps[:HTML_ROWS]
    ]
    silence = t.longest_silence
    note = (
        f'<p class="more">Longest stretch without any result: {_e(duration(silence.seconds))}'
        f" ({_e(when(silence.start))} – {_e(when(silence.end))}).</p>"
    )
    return (
        f"<h3>Monitoring gaps (unknown: no result within {_e(duration(t.fresh_within))})</h3>"
        + _table(
            [("From", "t"), ("To", "t"), ("Length", "num"), ("", "")],
            rows,
            empty="No monitoring gaps.",
            name="gaps",
            total=len(t.gaps),
            csv_name="gaps.csv",
        )
        + note
    )


def _verifications_html(t: TargetReport) -> str:
    rows = []
    for v in t.verifications[:HTML_ROWS]:
        detail = "; ".join(
            f"{p}: {d.get('outcome', '?') if isinstance(d, dict) else d}" for p, d in sorted(v.detail.items())
        )
        cls = {"pass": "good", "fail": "bad"}.get(v.outcome, "warn")
        rows.append(
            [
                _e(v.change_ref or "—"),
                f"<code>{_e(v.request_id)}</code>",
                _time(v.requested_at),
                _time(v.finished_at),
                _e(duration(took_seconds(v))),
                _e(", ".join(v.probes)),
                str(v.required),
                f'<span class="{cls}">{_e(v.outcome)}</span>',
                _e(detail),
            ]
        )
    return "<h3>Post-change verifications</h3>" + _table(
        [
            ("Change", ""), ("Request", ""), ("Requested", "t"), ("Finished", "t"), ("Took", "num"),
            ("Probes", ""), ("Required", "num"), ("Outcome", ""), ("Per probe", ""),
        ],
        rows,
        empty="No post-change verifications in the period.",
        name="verifications",
        total=len(t.verifications),
        csv_name="verifications.csv",
    )  # fmt: skip


def _refusals_html(t: TargetReport) -> str:
    rows = [
        [_time(r.finished_at), _e(r.probe), _e(r.check), f"<code>{_e(r.id)}</code>", _e(r.request_id or "")]
        for r in t.refusals[:HTML_ROWS]
    ]
    return "<h3>Blocked dial attempts (live-number guard refused the call)</h3>" + _table(
        [("At", "t"), ("Probe", ""), ("Check", ""), ("Result", ""), ("Request", "")],
        rows,
        empty="None: no call was refused by the guard.",
        name="refusals",
        total=len(t.refusals),
        csv_name="refusals.csv",
    )


def _coverage_html(t: TargetReport) -> str:
    rows = [[_e(c.probe), str(c.results), _time(c.first_at), _time(c.last_at)] for c in t.coverage]
    return "<h3>Probe coverage</h3>" + _table(
        [("Probe", ""), ("Results", "num"), ("First", "t"), ("Last", "t")],
        rows,
        empty="No probe reported on this target in the period.",
        name="coverage",
    )


def _buckets_html(t: TargetReport) -> str:
    flagged = [b for b in t.buckets if not b.perfect]
    rows = [
        [
            _time(b.start),
            str(b.calls),
            str(b.passed),
            _n(b.failed, "bad"),
            _n(b.inconclusive, "warn"),
            pct(b.availability),
            _e(duration(b.down_seconds)),
            _e(duration(b.unmonitored_seconds)),
            f'<span class="st s-{_e(b.worst_state)}">{_e(b.worst_state)}</span>',
        ]
        for b in flagged[:HTML_ROWS]
    ]
    perfect = len(t.buckets) - len(flagged)
    return (
        f"<h3>Quarter hours that were not all up ({len(flagged)} of {len(t.buckets)};"
        f" {perfect} were up throughout with no failed call)</h3>"
        + _table(
            [
                ("Quarter hour", "t"), ("Calls", "num"), ("Passed", "num"), ("Failed", "num"),
                ("Inconcl.", "num"), ("Availability", "num"), ("Down", "num"), ("Unmonitored", "num"),
                ("Worst", ""),
            ],
            rows,
            empty="Every quarter hour was up with no failed call.",
            name="buckets",
            total=len(flagged),
            csv_name="buckets.csv",
            row_attrs=[f' data-bucket="{_e(format_time(b.start))}"' for b in flagged[:HTML_ROWS]],
        )
    )  # fmt: skip


def _probes_html(report: Report) -> str:
    outages = [
        [_e(o.probe), _time(o.start), _time(o.end), _e(duration(o.seconds)), _e(_span_note(o))]
        for o in report.probe_outages[:HTML_ROWS]
    ]
    gaps = [
        [
            _e(g.probe),
            str(g.after_seq),
            str(g.next_seq),
            str(g.missing),
            _time(g.detected_at),
            str(g.repaired),
            str(g.unrecoverable),
            _time(g.closed_at) if g.closed_at is not None else f"open: {g.outstanding} outstanding",
        ]
        for g in report.seq_gaps[:HTML_ROWS]
    ]
    versions = [
        [
            _e(v.probe),
            f"<code>{_e(v.version)}</code>",
            _time(v.first_seen),
            _time(v.last_seen),
            str(v.results),
        ]
        for v in report.versions
    ]
    bound = report.max_clock_skew
    skews = [
        [
            _e(k.probe),
            str(k.results),
            _e(_skew_range(k)),
            f'<span class="bad">{k.skewed}</span>' if k.skewed else "0",
            _time(k.first_skewed_at) if k.first_skewed_at else "—",
            _time(k.last_skewed_at) if k.last_skewed_at else "—",
        ]
        for k in report.clock_skew
    ]
    listed = [x for k in report.clock_skew for x in k.listed]
    skewed_rows = [
        [
            _e(x.probe),
            _e(x.target),
            str(x.seq),
            f"<code>{_e(x.id)}</code>",
            _time(x.finished_at),
            _time(x.judged_at),
            _e(f"{x.clock_skew:+.3f} s"),
        ]
        for x in listed[:HTML_ROWS]
    ]
    skewed_table = ""
    if skewed_rows:
        skewed_table = _table(
            [("Probe", ""), ("Target", ""), ("Seq", "num"), ("Result", ""), ("Probe's stamp", "t"),
             ("Judged", "t"), ("Skew", "num")],
            skewed_rows,
            empty="",
            name="skewed-results",
            total=sum(k.skewed for k in report.clock_skew),
            csv_name="skewed_results.csv",
        )  # fmt: skip
    unreadable = ""
    if report.unreadable:
        unreadable = "<h3>Stored results that could not be read</h3>" + _table(
            [("Target", ""), ("From", "t"), ("To", "t"), ("Problem", "")],
            [[_e(u.target), _time(u.start), _time(u.end), _e(u.problem)] for u in report.unreadable],
            empty="",
            name="unreadable",
        )
    return (
        '<section class="panel" data-section="probes"><h2>Probes</h2>'
        "<h3>Probe outages (offline, from the probes' status and last will)</h3>"
        + _table(
            [("Probe", ""), ("From", "t"), ("To", "t"), ("Length", "num"), ("", "")],
            outages,
            empty="No probe was offline in the period.",
            name="probe-outages",
            total=len(report.probe_outages),
            csv_name="probe_outages.csv",
        )
        + "<h3>Missing results (gaps in a probe's sequence numbers), and their repair</h3>"
        + _table(
            [
                *(("Probe", ""), ("After seq", "num"), ("Next seq", "num"), ("Missing", "num")),
                *(("Noticed", "t"), ("Repaired", "num"), ("Unrecoverable", "num"), ("Closed", "t")),
            ],
            gaps,
            empty="No result went missing.",
            name="sequence-gaps",
            total=len(report.seq_gaps),
            csv_name="sequence_gaps.csv",
        )
        + f"<h3>Probe clocks (results judged with a skew beyond {_e(duration(bound))} are marked)</h3>"
        + "<p>Every time in this report is the monitor's judged time: the probe's own stamp corrected"
        " by the probe's estimated clock skew, never later than the monitor received it.</p>"
        + _table(
            [
                ("Probe", ""),
                ("Results", "num"),
                ("Skew seen", "num"),
                ("Beyond the bound", "num"),
                ("First", "t"),
                ("Last", "t"),
            ],
            skews,
            empty="No results in the period.",
            name="clock-skew",
        )
        + skewed_table
        + "<h3>Software versions seen (from the signed results)</h3>"
        + _table(
            [("Probe", ""), ("Version", ""), ("First seen", "t"), ("Last seen", "t"), ("Results", "num")],
            versions,
            empty="No results in the period.",
            name="versions",
        )
        + unreadable
        + "</section>"
    )


def _skew_range(k: ProbeSkew) -> str:
    if k.min_seconds is None or k.max_seconds is None:
        return "not known"
    if k.min_seconds == k.max_seconds:
        return f"{k.min_seconds:+.3f} s"
    return f"{k.min_seconds:+.3f} … {k.max_seconds:+.3f} s"


def _ledger_detail(report: Report) -> str:
    led = report.ledger

    def row(label: str, value: str) -> str:
        return f"<dt>{_e(label)}</dt><dd>{value}</dd>"

    verdict = '<span class="good">intact</span>' if led.ok else f'<span class="bad">{_e(led.status)}</span>'
    items = [
        row("Chain", f"{verdict}; checked over every row in the store, not only this period"),
        row("Rows", f"{led.rows_checked} verified of {led.rows_total} stored"),
        row(
            "Last row in the period",
            "none"
            if led.period_last_row is None
            else f"#{led.period_last_row} (result <code>{_e(led.period_last_id)}</code>)<br>"
            f'<code class="hash" data-hash="period">{_e(led.period_last_hash)}</code>',
        ),
        row(
            "Last row overall",
            "none"
            if led.last_row is None
            else f"#{led.last_row} (result <code>{_e(led.last_id)}</code>)<br>"
            f'<code class="hash" data-hash="last">{_e(led.last_hash)}</code>',
        ),
        row(
            "To confirm later",
            "run <code>ecpm ledger verify --db STORE</code>: it must say the chain is intact and print"
            " the last hash above (or a later one, if rows were added since); and"
            ' <code>sqlite3 STORE "SELECT hash FROM results WHERE row = N"</code> for the period\'s last'
            " row must print the period hash above. Both hashes commit to every row up to them.",
        ),
    ]
    return (
        '<section class="panel" data-section="ledger"><h2>Ledger</h2>'
        f'<dl class="defs">{"".join(items)}</dl></section>'
    )


def _definitions(report: Report) -> str:
    target = target_pct(report.availability_target)
    items = {
        "Period": "half-open [from, to) in UTC; cut at the time the report was generated when it runs on"
        " into the future.",
        "Availability, time-weighted": "from the monitor's recorded state timeline: up and degraded are"
        " available, down is not; unknown, time before any recorded state, and any time in which the"
        " target had no result within its freshness window (whatever state was recorded) are"
        f" unmonitored and left out. Available ÷ monitored time. Met at {target} or better; allowed"
        " downtime = (1 − target) × monitored time. The lower bound counts every unmonitored second as down.",
        "Availability, call-weighted": "passed ÷ (passed + failed) invite test calls placed in the period"
        " (scheduled, confirmation and on-demand); inconclusive calls and blocked dial attempts count in"
        f" neither. Met at {target} or better.",
        "Quarter hours": f"{report.bucket_seconds // 60}-minute buckets aligned to UTC quarter hours; a call"
        " belongs to the bucket in which it finished, by the monitor's judged time.",
        "Judged time": "the time a result finished as the monitor judges it: the probe's own stamp"
        " corrected by the probe's estimated clock skew (the largest stamp − arrival difference over"
        " the last 5 minutes of results), never later than the monitor received it. A probe clock"
        f" off by more than {duration(report.max_clock_skew)} (ingest.max_clock_skew) is marked.",
        "Detection latency": "detected (incident opened) − start of the first failed call.",
        "Time to notify": "first trigger page delivered by the monitor's own notifiers − detected.",
        "Blocked dial attempts": "results whose reason is guard_refused: the live-number guard refused"
        " the SIP send; never placed, so not counted as calls.",
    }
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items.items())
    return f'<section class="panel"><h2>Definitions</h2><dl class="defs">{body}</dl></section>'


def render_html(report: Report) -> str:
    template = resources.files("monitor").joinpath("templates/report.html").read_text("utf-8")
    styles = re.findall(r"<style>(.*?)</style>", template, re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in styles
    )
    period = (
        f"{when(report.start)} – {when(report.end)}"
        + (f" (measured until {when(report.measured_until)})" if report.measured_until < report.end else "")
        + f", {duration((report.measured_until - report.start).total_seconds())}"
    )
    header = (
        _ledger_html(report)
        + "<h1>Emergency call path: evidence report</h1>"
        + f'<p class="meta" data-period="{_e(format_time(report.start))}/{_e(format_time(report.end))}">'
        + f"Period {_e(period)} · {len(report.targets)} target{'s' if len(report.targets) != 1 else ''}"
        + f" · generated {_e(when(report.generated_at))} by ecpm {_e(report.software)}"
        + (f" from <code>{_e(report.store)}</code>" if report.store else "")
        + f" · availability target {_e(target_pct(report.availability_target))}"
        + " · Ofcom General Condition A3.2(b)</p>"
    )
    body = (
        header
        + _overview(report)
        + "".join(_target_html(report, t) for t in report.targets)
        + _probes_html(report)
        + _ledger_detail(report)
        + _definitions(report)
        + f"<footer>ecpm {_e(report.software)} · report schema {_e(report.schema)}</footer>"
    )
    title = f"ecpm evidence report {when(report.start)} – {when(report.end)}"
    return string.Template(template).substitute(
        csp=_e(f"default-src 'none'; style-src {hashes}; img-src data:; base-uri 'none'; form-action 'none'"),
        generator=_e(f"ecpm {report.software}"),
        title=_e(title),
        body=body,
    )


def write_html(report: Report, path: Path) -> Path:
    path.write_text(render_html(report), encoding="utf-8")
    return path
