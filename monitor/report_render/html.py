"""``report.html``: one self-contained file with inline CSS and inline SVG charts, no
script and no external asset (its Content-Security-Policy allows nothing else). Built
with ``monitor.html``'s builder, as the status page is: every value from the store is
escaped unless it is markup the builder made. Prints to PDF with a page per target.
"""

from __future__ import annotations

import math
import statistics
import string
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Final

from monitor.html import Markup, Node, csp_hashes, duration, el, escape, html, readable_time
from monitor.report import Bucket, DutyEntry, Notice, ProbeOutage, ProbeSkew, Report, Span, TargetReport
from monitor.report_render.json import took_seconds
from probes.result import format_time

__all__ = ["HTML_ROWS", "pct", "render_html", "write_html"]

HTML_ROWS: Final = 200  # longest table the HTML shows; the CSV and JSON have every row

# ---------------------------------------------------------------- formatting


def pct(ratio: float | None) -> str:
    """A ratio as a percentage with four decimals, rounded *down*, so a figure short of
    the target never reads as 99.9990 %."""
    if ratio is None:
        return "n/a"
    return f"{math.floor(ratio * 1_000_000 + 1e-6) / 10_000:.4f} %"


def target_pct(ratio: float) -> str:
    """The availability target as people write it: 99.999 %."""
    return f"{ratio * 100:.6g} %"


def _time(moment: datetime | None) -> Node:
    """A ``<time>``; a narrow column may wrap it between date and time of day, nowhere else."""
    if moment is None:
        return "—"
    date, _, clock = readable_time(moment).partition(" ")
    return el(
        "time",
        el("span", date, class_="nw"),
        " ",
        el("span", clock, class_="nw"),
        datetime=format_time(moment),
    )


_VERDICTS: Final[Mapping[bool | None, tuple[str, str]]] = {
    None: ("na", "n/a"),
    True: ("met", "met"),
    False: ("not-met", "not met"),
}


def _verdict(met: bool | None) -> Markup:
    css, text = _VERDICTS[met]
    return el("span", text, class_=f"verdict {css}", data_verdict=text)


def _n(count: int, css: str) -> Node:
    return el("span", str(count), class_=css) if count else "0"


def _joined(separator: str, items: Sequence[Node]) -> Markup:
    return html([html(separator if n else None, item) for n, item in enumerate(items)])


Headers = Sequence[tuple[str, str]]  # (label, css class) per column


def _head(headers: Headers) -> Markup:
    return el("thead", el("tr", [el("th", label, class_=css) for label, css in headers]))


def _row(headers: Headers, cells: Sequence[Node], **attrs: str | None) -> Markup:
    return el(
        "tr", [el("td", cell, class_=css) for (_, css), cell in zip(headers, cells, strict=True)], **attrs
    )


def _table(
    headers: Headers,
    rows: Sequence[Sequence[Node]],
    *,
    title: str | None = None,
    empty: str,
    name: str,
    total: int | None = None,
    csv_name: str = "",
    row_attrs: Sequence[Mapping[str, str]] | None = None,
) -> Markup:
    """A table of ``rows`` (one cell per header) under its ``title``, or the ``empty`` line when
    there is none; a table cut at ``HTML_ROWS`` says where the rest is (``total`` rows in
    ``csv_name``)."""
    heading = None if title is None else el("h3", title)
    if not rows:
        return html(heading, el("p", empty, class_="empty", data_table=name))
    body = [_row(headers, row, **(row_attrs[n] if row_attrs else {})) for n, row in enumerate(rows)]
    more = None
    if total is not None and total > len(rows):
        more = el(
            "p", f"{len(rows)} of {total} rows shown; all are in {csv_name} and report.json.", class_="more"
        )
    return html(heading, el("table", _head(headers), el("tbody", body), data_table=name), more)


# ---------------------------------------------------------------- charts

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


def _axis(start: datetime, end: datetime, y: float, height: float) -> Markup:
    out = []
    for t, label in _ticks(start, end):
        x = _x(t, start, end)
        anchor = "start" if x < _LEFT + 20 else "end" if x > _W - 20 else "middle"
        out.append(
            el("line", class_="grid", x1=f"{x:.1f}", x2=f"{x:.1f}", y1=f"{y - height:.1f}", y2=f"{y:.1f}")
        )
        out.append(el("text", label, x=f"{x:.1f}", y=f"{y + 12:.1f}", text_anchor=anchor))
    return html(out)


def _svg(height: float, body: Node, label: str, *, crisp: bool = False) -> Markup:
    return el(
        "svg",
        el("title", label),
        body,
        viewBox=f"0 0 {_W:.0f} {height:.0f}",
        role="img",
        aria_label=label,
        shape_rendering="crispEdges" if crisp else None,
        xmlns="http://www.w3.org/2000/svg",
    )


def timeline_svg(report: Report, t: TargetReport) -> Markup:
    """The state timeline: one bar over the period, coloured by state."""
    start, end = report.start, report.measured_until
    bar = 26.0
    rects = []
    # up first, the others on top, each at least one unit wide so a short outage in a year shows
    for span in sorted(t.timeline, key=lambda s: s.state != "up"):
        x0, x1 = _x(span.start, start, end), _x(span.end, start, end)
        width = max(x1 - x0, 1.0 if span.state != "up" else 0.0)
        tip = (
            f"{span.state} {readable_time(span.start)} – {readable_time(span.end)} ({duration(span.seconds)})"
        )
        rects.append(
            el(
                "rect",
                el("title", tip),
                class_=f"s-{span.state}",
                data_state=span.state,
                x=f"{x0:.2f}",
                y="2",
                width=f"{width:.2f}",
                height=f"{bar:.0f}",
            )
        )
    label = el("text", "state", x="0", y=f"{bar / 2 + 6:.0f}")
    return _svg(
        bar + 22, [label, rects, _axis(start, end, bar + 6, bar + 4)], f"State timeline of {t.id}", crisp=True
    )


def heat_svg(report: Report, t: TargetReport) -> Markup | None:
    """15-minute buckets: one row per UTC day, 96 columns, coloured by the worst state."""
    if not t.buckets:
        return None
    first_day = t.buckets[0].start.replace(hour=0, minute=0, second=0, microsecond=0)
    days = (t.buckets[-1].start - first_day).days + 1
    row = 18.0 if days <= 7 else max(1.5, min(18.0, 420.0 / days))
    cell = (_W - _LEFT) / 96
    runs: list[Markup] = []
    current: tuple[int, int, str, Bucket, Bucket] | None = None  # day, first column, state, first, last

    def close(run: tuple[int, int, str, Bucket, Bucket], last_col: int) -> None:
        day, col, state, b0, b1 = run
        tip = f"{readable_time(b0.start)} – {readable_time(b1.end)}: worst {state}"
        if b0 is b1:
            tip += f"; {b0.calls} calls, {b0.failed} failed, availability {pct(b0.availability)}"
        runs.append(
            el(
                "rect",
                el("title", tip),
                class_=f"s-{state}",
                x=f"{_LEFT + col * cell:.2f}",
                y=f"{day * row:.2f}",
                width=f"{(last_col - col + 1) * cell:.2f}",
                height=f"{max(row - (1 if row > 4 else 0), 1):.2f}",
            )
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
    labels = [
        el(
            "text",
            (first_day + timedelta(days=day)).strftime("%d %b"),
            x="0",
            y=f"{day * row + max(min(row, 12) - 1, 10):.1f}",
        )
        for day in range(0, days, label_every)
    ]
    height = days * row
    hours = []
    for h in range(0, 25, 3):
        anchor = "start" if h == 0 else "end" if h == 24 else "middle"
        hours.append(
            el(
                "text",
                f"{h:02d}:00",
                x=f"{_LEFT + h * 4 * cell:.1f}",
                y=f"{height + 13:.1f}",
                text_anchor=anchor,
            )
        )
    label = f"15-minute buckets of {t.id}, worst state per quarter hour"
    return _svg(height + 17, [labels, runs, hours], label, crisp=True)


def pdd_svg(report: Report, t: TargetReport) -> Markup | None:
    """Post-dial delay (stage ``ringing``) of passed calls: median and maximum per quarter hour."""
    points = [b for b in t.buckets if b.pdd_median is not None]
    if not points:
        return None
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
        dots.append(
            el("rect", class_="max", x=f"{col - 0.8:.1f}", y=f"{y(peak):.1f}", width="1.6", height="1.6")
        )
        previous = col
    paths = [el("polyline", class_="median", points=" ".join(line)) for line in lines]
    left, right = f"{_LEFT:.0f}", f"{_W:.0f}"
    grid = []
    for value in _nice_steps(top):
        at = f"{y(value):.1f}"
        grid.append(el("line", class_="grid", x1=left, x2=right, y1=at, y2=at))
        grid.append(
            el("text", f"{value:g} s", x=f"{_LEFT - 4:.0f}", y=f"{y(value) + 4:.1f}", text_anchor="end")
        )
    limit = f"{y(report.pdd_threshold):.1f}"
    body = [
        grid,
        el("line", class_="limit", x1=left, x2=right, y1=limit, y2=limit),
        el(
            "text",
            f"degraded above {report.pdd_threshold:g} s",
            x=f"{_W - 2:.0f}",
            y=f"{y(report.pdd_threshold) - 3:.1f}",
            text_anchor="end",
        ),
        dots,
        paths,
        _axis(start, end, height + 4, 0),
    ]
    return _svg(height + 20, body, f"Post-dial delay of {t.id}: median and maximum per quarter hour")


def _nice_steps(top: float) -> list[float]:
    for step in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        if top / step <= 5:
            return [round(step * i, 3) for i in range(int(top / step) + 1)]
    return [0.0, top]


# ---------------------------------------------------------------- sections


def _ledger_html(report: Report) -> Markup:
    led = report.ledger
    if led.ok:
        return el(
            "div",
            f"Ledger verified: every stored row ({led.rows_checked}) chains to the one before it.",
            el(
                "span",
                f"Last row overall #{led.last_row or '—'}: ",
                el("code", led.last_hash or led.verified_hash, class_="hash"),
                class_="sub",
            ),
            class_="ledger ok",
            data_ledger="verified",
        )
    return el(
        "div",
        f"Ledger {led.status}",
        el(
            "span",
            "The stored results were altered, removed or reordered at or after that row;"
            f" {led.rows_checked - 1} rows before it verified. Figures below are computed from the store"
            " as it is now and cannot be relied on.",
            class_="sub",
        ),
        class_="ledger broken",
        role="alert",
        data_ledger="broken",
    )


_OVERVIEW: Final[Headers] = (
    ("Target", ""), ("Calls", "num"), ("Passed", "num"), ("Failed", "num"), ("Inconcl.", "num"),
    ("Availability (time)", "num"), ("Down / allowed", "num"), ("Availability (calls)", "num"),
    ("Monitored", "num"), ("Incidents", "num"), ("Blocked", "num"),
)  # fmt: skip


def _overview(report: Report) -> Markup:
    rows = []
    for t in report.targets:
        tw, cw = t.time, t.by_calls
        rows.append(
            [
                el("a", t.id, href=f"#t-{t.id}"),
                str(t.calls.placed),
                str(t.calls.passed),
                _n(t.calls.failed, "bad"),
                _n(t.calls.inconclusive, "warn"),
                html(f"{pct(tw.availability)} ", _verdict(tw.met)),
                f"{duration(tw.down_seconds)} / {duration(tw.allowed_downtime_seconds)}",
                html(f"{pct(cw.availability)} ", _verdict(cw.met)),
                pct(tw.monitored_fraction),
                str(len(t.incidents)),
                _n(t.blocked, "bad"),
            ]
        )
    table = _table(
        _OVERVIEW,
        rows,
        empty="No targets.",
        name="overview",
        row_attrs=[{"data_target": t.id} for t in report.targets],
    )
    return el("section", el("h2", "Summary"), table, class_="panel")


def _fig(name: str, label: str, value: Node, note: Node) -> Markup:
    return el(
        "div",
        el("div", label, class_="label"),
        el("div", value, class_="value"),
        el("div", note, class_="note"),
        class_="fig",
        data_figure=name,
    )


def _identity_fig(t: TargetReport) -> Markup:
    i = t.identity
    return _fig(
        "identity",
        "Caller number and location lost",
        _n(i.failed, "bad"),
        html(
            "calls failed at stage identity: number missing ", _n(i.cli_missing, "bad"),
            ", changed ", _n(i.cli_mismatch, "bad"),
            "; location missing ", _n(i.location_missing, "bad"),
            ", changed ", _n(i.location_mismatch, "bad"), ".",
        ),
    )  # fmt: skip


def _registration_fig(t: TargetReport) -> Markup:
    r = t.registrations
    return _fig(
        "registrations",
        "Registrations",
        str(r.sent),
        html(
            el("span", f"{r.passed} passed", class_="good"), ", ", _n(r.failed, "bad"), " failed, ",
            _n(r.inconclusive, "warn"), " inconclusive (register checks: REGISTER with digest auth).",
        ),
    )  # fmt: skip


def _target_html(report: Report, t: TargetReport) -> Markup:
    tw, cw, c, p = t.time, t.by_calls, t.calls, t.pings
    verdict = (
        "v-met"
        if tw.met and cw.met is not False
        else "v-not-met"
        if tw.met is False or cw.met is False
        else ""
    )
    figures = [
        _fig(
            "availability-time",
            "Availability, time-weighted",
            html(f"{pct(tw.availability)} ", _verdict(tw.met)),
            f"down {duration(tw.down_seconds)}, allowed {duration(tw.allowed_downtime_seconds)}"
            f" at {target_pct(report.availability_target)}",
        ),
        _fig(
            "availability-calls",
            "Availability, call-weighted",
            html(f"{pct(cw.availability)} ", _verdict(cw.met)),
            f"{cw.failed} failed of {cw.passed + cw.failed}, allowed {cw.allowed_failures:.3f}",
        ),
        _fig(
            "monitored",
            "Monitored",
            pct(tw.monitored_fraction),
            f"unmonitored {duration(tw.unmonitored_seconds)}; if all of it was down: {pct(tw.lower_bound)}",
        ),
        _fig(
            "calls",
            "Test calls placed",
            str(c.placed),
            html(
                el("span", f"{c.passed} passed", class_="good"),
                ", ",
                _n(c.failed, "bad"),
                " failed, ",
                _n(c.inconclusive, "warn"),
                f" inconclusive; {c.scheduled} scheduled, {c.confirmations} confirmations,"
                f" {c.on_demand} on demand. OPTIONS: {p.sent} sent, {p.passed} passed, {p.failed} failed,"
                f" {p.inconclusive} inconcl. Blocked dial attempts: ",
                _n(t.blocked, "bad"),
                ".",
            ),
        ),
        _identity_fig(t),
        _registration_fig(t),
    ]
    title = html(t.id, html(" ", el("span", f"— {t.description}", class_="muted")) if t.description else None)
    pdd = pdd_svg(report, t)
    legend = [html(el("i", class_=f"s-{state}"), text) for state, text in _LEGEND]
    charts = [
        el("h3", "State over the period"),
        el("div", timeline_svg(report, t), class_="chart", data_chart="timeline"),
        el("p", legend, class_="legend"),
        el("h3", "Quarter hours (UTC), worst state in each"),
        el("div", heat_svg(report, t), class_="chart", data_chart="heat"),
        el("h3", "Post-dial delay of passed calls (median line, maximum dots, per quarter hour)"),
        el("div", pdd, class_="chart", data_chart="pdd")
        if pdd
        else el("p", "No passed calls.", class_="empty"),
    ]
    return el(
        "section",
        el("h2", title),
        el("div", figures, class_="figures"),
        charts,
        _incidents_html(t),
        _gaps_html(t),
        _verifications_html(t),
        _refusals_html(t),
        _coverage_html(t),
        _buckets_html(t),
        class_=f"panel target {verdict}",
        id=f"t-{t.id}",
        data_target=t.id,
    )


_LEGEND: Final = (
    ("up", "up"),
    ("degraded", "degraded"),
    ("down", "down"),
    ("unknown", "unknown (unmonitored)"),
)


def _page_html(n: Notice) -> Markup:
    head = html(el("b", n.notifier), f" {n.event} ")
    if n.state == "sent":
        after = duration(n.after_detection_seconds)
        return html(head, el("span", "sent", class_="good"), " ", _time(n.sent_at), f" (+{after})")
    tries = f"{n.attempts} attempt{'s' if n.attempts != 1 else ''}"
    error = f": {n.last_error}" if n.last_error else None
    return html(
        head, el("span", n.state, class_="bad" if n.state == "failed" else "warn"), f" after {tries}", error
    )


_DUTY_CLASS: Final[Mapping[str, str]] = {"met": "good", "missed": "bad", "pending": "warn"}


def _duty_html(d: DutyEntry) -> Markup:
    """A duty of an incident: due, and met or missed (with who acknowledged it, when, the reference)."""
    duty, status = d.duty, d.status
    head = html(el("b", duty.name), " due ", _time(duty.due_at), " ")
    verdict = el("span", status, class_=_DUTY_CLASS[status], data_duty=duty.name, data_status=status)
    if duty.ack is None:
        escalated = html(" (escalated ", _time(duty.escalated_at), ")") if duty.escalated_at else None
        return html(head, verdict, ": not acknowledged", escalated)
    ack = duty.ack
    return html(head, verdict, f": acknowledged by {ack.by} ", _time(ack.at), " ", el("code", ack.ref))


def _redundancy_html(report: Report) -> Markup | None:
    if not report.redundancy:
        return None  # no service, or none lost a path: the section says nothing
    rows = [
        [p.service, _time(p.start), _time(p.end), duration(p.seconds), ", ".join(p.lost),
         el("span", p.worst, class_=f"st s-{p.worst}")]
        for p in report.redundancy[:HTML_ROWS]
    ]  # fmt: skip
    return el(
        "section",
        el("h2", "Redundancy lost"),
        el("p", "Periods in which a path (primary or backup) of a service was down or unknown:"
           " degraded, the service still had another path; down or unknown, it had none.", class_="meta"),
        _table(
            [("Service", ""), ("From", "t"), ("To", "t"), ("Length", "num"), ("Lost paths", ""),
             ("Worst", "")],
            rows, empty="", name="redundancy-lost", total=len(report.redundancy),
            csv_name="redundancy_lost.csv",
        ),
        data_section="redundancy",
    )  # fmt: skip


_INCIDENTS: Final[Headers] = (
    ("#", ""), ("Kind", ""), ("Last good", "t"), ("First failure", "t"), ("Detected", "t"),
    ("Detection latency", "num"), ("Notified", "t"), ("To notify", "num"), ("Resolved", "t"),
    ("Duration", "num"),
)  # fmt: skip


def _incidents_html(t: TargetReport) -> Markup:
    if not t.incidents:
        return html(
            el("h3", "Incidents"),
            el("p", "No incidents in the period.", class_="empty", data_table="incidents"),
        )
    body = []
    for i in t.incidents[:HTML_ROWS]:
        cells = [
            f"#{i.id}",
            el("span", i.kind, class_=f"st s-{'down' if i.kind == 'down' else 'unknown'}"),
            _time(i.last_good_at),
            _time(i.first_failed_at),
            _time(i.detected_at),
            duration(i.detection_latency_seconds),
            _time(i.notified_at) if i.notified_at else el("span", "not sent", class_="bad"),
            duration(i.time_to_notify_seconds),
            _time(i.resolved_at) if i.resolved_at else el("span", "open", class_="bad"),
            duration(i.duration_seconds),
        ]
        pages = _joined(" · ", [_page_html(n) for n in i.notifications]) or "no notifier configured"
        duties = _joined(" · ", [_duty_html(d) for d in i.duties])
        acked = None
        if i.acknowledged is not None:
            a = i.acknowledged
            acked = html(el("br"), f"Incident acknowledged by {a.by} (", el("code", a.ref), ") ", _time(a.at))
        detail = el(
            "td", i.summary, el("br"), "Pages: ", pages,
            html(el("br"), "Duties: ", duties) if i.duties else None, acked,
            colspan=len(_INCIDENTS) - 1,
        )  # fmt: skip
        body.append(_row(_INCIDENTS, cells, class_="main", data_incident=str(i.id)))
        body.append(el("tr", el("td"), detail, class_="detail", data_incident_detail=str(i.id)))
    more = None
    if len(t.incidents) > HTML_ROWS:
        more = el(
            "p",
            f"{HTML_ROWS} of {len(t.incidents)} shown; all are in incidents.csv and report.json.",
            class_="more",
        )
    table = el("table", _head(_INCIDENTS), el("tbody", body), class_="incidents", data_table="incidents")
    return html(el("h3", "Incidents"), table, more)


def _span_note(s: Span | ProbeOutage) -> str:
    notes = []
    if s.open_at_start:
        notes.append("began before the period")
    if s.open_at_end:
        notes.append("still open at its end")
    return ", ".join(notes)


def _gaps_html(t: TargetReport) -> Markup:
    rows = [[_time(s.start), _time(s.end), duration(s.seconds), _span_note(s)] for s in t.gaps[:HTML_ROWS]]
    silence = t.longest_silence
    note = el(
        "p",
        f"Longest stretch without any result: {duration(silence.seconds)}"
        f" ({readable_time(silence.start)} – {readable_time(silence.end)}).",
        class_="more",
    )
    table = _table(
        [("From", "t"), ("To", "t"), ("Length", "num"), ("", "")],
        rows,
        title=f"Monitoring gaps (unknown: no result within {duration(t.fresh_within)})",
        empty="No monitoring gaps.",
        name="gaps",
        total=len(t.gaps),
        csv_name="gaps.csv",
    )
    return html(table, note)


def _verifications_html(t: TargetReport) -> Markup:
    rows = []
    for v in t.verifications[:HTML_ROWS]:
        detail = "; ".join(
            f"{p}: {d.get('outcome', '?') if isinstance(d, dict) else d}" for p, d in sorted(v.detail.items())
        )
        rows.append(
            [
                v.change_ref or "—",
                el("code", v.request_id),
                _time(v.requested_at),
                _time(v.finished_at),
                duration(took_seconds(v)),
                ", ".join(v.probes),
                str(v.required),
                el("span", v.outcome, class_={"pass": "good", "fail": "bad"}.get(v.outcome, "warn")),
                detail,
            ]
        )
    return _table(

        [
            ("Change", ""), ("Request", ""), ("Requested", "t"), ("Finished", "t"), ("Took", "num"),
            ("Probes", ""), ("Required", "num"), ("Outcome", ""), ("Per probe", ""),
        ],
        rows,
        empty="No post-change verifications in the period.",
        name="verifications",
        total=len(t.verifications),
        csv_name="verifications.csv",
        title="Post-change verifications",
    )  # fmt: skip


def _refusals_html(t: TargetReport) -> Markup:
    rows = [
        [_time(r.finished_at), r.probe, r.check, el("code", r.id), r.request_id or ""]
        for r in t.refusals[:HTML_ROWS]
    ]
    return _table(
        [("At", "t"), ("Probe", ""), ("Check", ""), ("Result", ""), ("Request", "")],
        rows,
        empty="None: no call was refused by the guard.",
        name="refusals",
        total=len(t.refusals),
        csv_name="refusals.csv",
        title="Blocked dial attempts (live-number guard refused the call)",
    )


def _coverage_html(t: TargetReport) -> Markup:
    rows = [[c.probe, str(c.results), _time(c.first_at), _time(c.last_at)] for c in t.coverage]
    return _table(
        [("Probe", ""), ("Results", "num"), ("First", "t"), ("Last", "t")],
        rows,
        empty="No probe reported on this target in the period.",
        name="coverage",
        title="Probe coverage",
    )


def _buckets_html(t: TargetReport) -> Markup:
    flagged = [b for b in t.buckets if not b.perfect]
    shown = flagged[:HTML_ROWS]
    rows = [
        [
            _time(b.start),
            str(b.calls),
            str(b.passed),
            _n(b.failed, "bad"),
            _n(b.inconclusive, "warn"),
            pct(b.availability),
            duration(b.down_seconds),
            duration(b.unmonitored_seconds),
            el("span", b.worst_state, class_=f"st s-{b.worst_state}"),
        ]
        for b in shown
    ]
    perfect = len(t.buckets) - len(flagged)
    title = (
        f"Quarter hours that were not all up ({len(flagged)} of {len(t.buckets)};"
        f" {perfect} were up throughout with no failed call)"
    )
    return _table(

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
        row_attrs=[{"data_bucket": format_time(b.start)} for b in shown],
        title=title,
    )  # fmt: skip


def _probes_html(report: Report) -> Markup:
    outages = [
        [o.probe, _time(o.start), _time(o.end), duration(o.seconds), _span_note(o)]
        for o in report.probe_outages[:HTML_ROWS]
    ]
    gaps = [
        [
            g.probe,
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
        [v.probe, el("code", v.version), _time(v.first_seen), _time(v.last_seen), str(v.results)]
        for v in report.versions
    ]
    skews = [
        [
            k.probe,
            str(k.results),
            _skew_range(k),
            el("span", str(k.skewed), class_="bad") if k.skewed else "0",
            _time(k.first_skewed_at) if k.first_skewed_at else "—",
            _time(k.last_skewed_at) if k.last_skewed_at else "—",
        ]
        for k in report.clock_skew
    ]
    listed = [x for k in report.clock_skew for x in k.listed]
    skewed_rows = [
        [
            x.probe,
            x.target,
            str(x.seq),
            el("code", x.id),
            _time(x.finished_at),
            _time(x.judged_at),
            f"{x.clock_skew:+.3f} s",
        ]
        for x in listed[:HTML_ROWS]
    ]
    skewed_table = None
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
    unreadable = None
    if report.unreadable:
        unreadable = _table(
            [("Target", ""), ("From", "t"), ("To", "t"), ("Problem", "")],
            [[u.target, _time(u.start), _time(u.end), u.problem] for u in report.unreadable],
            empty="",
            name="unreadable",
            title="Stored results that could not be read",
        )
    return el(
        "section",
        el("h2", "Probes"),
        _table(
            [("Probe", ""), ("From", "t"), ("To", "t"), ("Length", "num"), ("", "")],
            outages,
            title="Probe outages (offline, from the probes' status and last will)",
            empty="No probe was offline in the period.",
            name="probe-outages",
            total=len(report.probe_outages),
            csv_name="probe_outages.csv",
        ),
        _table(
            [
                *(("Probe", ""), ("After seq", "num"), ("Next seq", "num"), ("Missing", "num")),
                *(("Noticed", "t"), ("Repaired", "num"), ("Unrecoverable", "num"), ("Closed", "t")),
            ],
            gaps,
            title="Missing results (gaps in a probe's sequence numbers), and their repair",
            empty="No result went missing.",
            name="sequence-gaps",
            total=len(report.seq_gaps),
            csv_name="sequence_gaps.csv",
        ),
        el(
            "h3",
            f"Probe clocks (results judged with a skew beyond {duration(report.max_clock_skew)} are marked)",
        ),
        el(
            "p",
            "Every time in this report is the monitor's judged time: the probe's own stamp corrected"
            " by the probe's estimated clock skew, never later than the monitor received it.",
        ),
        _table(
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
        ),
        skewed_table,
        _table(
            [("Probe", ""), ("Version", ""), ("First seen", "t"), ("Last seen", "t"), ("Results", "num")],
            versions,
            title="Software versions seen (from the signed results)",
            empty="No results in the period.",
            name="versions",
        ),
        unreadable,
        class_="panel",
        data_section="probes",
    )


def _skew_range(k: ProbeSkew) -> str:
    if k.min_seconds is None or k.max_seconds is None:
        return "not known"
    if k.min_seconds == k.max_seconds:
        return f"{k.min_seconds:+.3f} s"
    return f"{k.min_seconds:+.3f} … {k.max_seconds:+.3f} s"


def _last_row(row: int | None, result_id: str | None, digest: str | None, name: str) -> Node:
    if row is None:
        return "none"
    return html(
        f"#{row} (result ",
        el("code", result_id),
        ")",
        el("br"),
        el("code", digest, class_="hash", data_hash=name),
    )


def _ledger_detail(report: Report) -> Markup:
    led = report.ledger
    verdict = el("span", "intact", class_="good") if led.ok else el("span", led.status, class_="bad")
    items: list[tuple[str, Node]] = [
        ("Chain", html(verdict, "; checked over every row in the store, not only this period")),
        ("Rows", f"{led.rows_checked} verified of {led.rows_total} stored"),
        (
            "Last row in the period",
            _last_row(led.period_last_row, led.period_last_id, led.period_last_hash, "period"),
        ),
        ("Last row overall", _last_row(led.last_row, led.last_id, led.last_hash, "last")),
        (
            "To confirm later",
            html(
                "run ",
                el("code", "ecpm ledger verify --db STORE"),
                ": it must say the chain is intact and print the last hash above (or a later one, if rows"
                " were added since); and ",
                el("code", 'sqlite3 STORE "SELECT hash FROM results WHERE row = N"'),
                " for the period's last row must print the period hash above. Both hashes commit to every"
                " row up to them.",
            ),
        ),
    ]
    return el("section", el("h2", "Ledger"), _defs(items), class_="panel", data_section="ledger")


def _defs(items: Sequence[tuple[str, Node]]) -> Markup:
    return el("dl", [html(el("dt", term), el("dd", text)) for term, text in items], class_="defs")


def _definitions(report: Report) -> Markup:
    target = target_pct(report.availability_target)
    items: dict[str, Node] = {
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
    return el("section", el("h2", "Definitions"), _defs(list(items.items())), class_="panel")


def render_html(report: Report) -> str:
    template = resources.files("monitor").joinpath("templates/report.html").read_text("utf-8")
    period = (
        f"{readable_time(report.start)} – {readable_time(report.end)}"
        + (
            f" (measured until {readable_time(report.measured_until)})"
            if report.measured_until < report.end
            else ""
        )
        + f", {duration((report.measured_until - report.start).total_seconds())}"
    )
    n = len(report.targets)
    meta = el(
        "p",
        f"Period {period} · {n} target{'s' if n != 1 else ''}"
        f" · generated {readable_time(report.generated_at)} by ecpm {report.software}",
        html(" from ", el("code", report.store)) if report.store else None,
        f" · availability target {target_pct(report.availability_target)} · Ofcom General Condition A3.2(b)",
        class_="meta",
        data_period=f"{format_time(report.start)}/{format_time(report.end)}",
    )
    body = html(
        _ledger_html(report),
        el("h1", "Emergency call path: evidence report"),
        meta,
        _overview(report),
        [_target_html(report, t) for t in report.targets],
        _redundancy_html(report),
        _probes_html(report),
        _ledger_detail(report),
        _definitions(report),
        el("footer", f"ecpm {report.software} · report schema {report.schema}"),
    )
    csp = (
        f"default-src 'none'; style-src {csp_hashes(template, 'style')}; img-src data:; base-uri 'none';"
        " form-action 'none'"
    )
    title = f"ecpm evidence report {readable_time(report.start)} – {readable_time(report.end)}"
    return string.Template(template).substitute(
        csp=escape(csp), generator=escape(f"ecpm {report.software}"), title=escape(title), body=body
    )


def write_html(report: Report, path: Path) -> Path:
    path.write_text(render_html(report), encoding="utf-8")
    return path
