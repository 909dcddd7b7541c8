"""The status page: what ``GET /`` shows, built from one Snapshot with ``monitor.html``.

Top to bottom: the verdict, the open incidents (at most ``OPEN_ON_PAGE``), the targets
the query asks for (``monitor.selection``: ``?state=``, ``?q=``, ``?page=`` of
``PAGE_TARGETS``) worst first as cards, every other target asked for as one link to its
card's page, the probes and the recently resolved incidents. So the page stays the same
size whether 10 or 2,000 targets are configured, and a problem is on its first page.

The page is one ``<main id="page">`` inside ``templates/status.html``, whose inline script
fetches the same URL (query and all) every few seconds and swaps that element in place;
without JavaScript the template's ``<noscript>`` refresh reloads it, and the filter links
and the search form are plain query strings.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from importlib import resources
from typing import Final

from monitor.html import Markup, Node, csp_hashes, duration, el, escape, html, utc
from monitor.model import (
    TARGET_STATES,
    Incident,
    Notification,
    ProbeView,
    ResultSummary,
    Snapshot,
    StateChange,
    TargetStateName,
    TargetView,
)
from monitor.selection import WORST_FIRST, Selection, TargetQuery
from monitor.skew import skewed
from monitor.views import finite, probe_status, time_json

__all__ = ["MAX_PAGE_TARGETS", "PAGE_TARGETS", "RESOLVED_ON_PAGE", "Template", "render_page", "title"]

REFRESH_SECONDS: Final = 5
STALE_AFTER: Final = timedelta(minutes=1)  # an older snapshot gets a "stale page" warning
TIMELINE: Final = timedelta(hours=24)
RESOLVED_ON_PAGE: Final = 8
OPEN_ON_PAGE: Final = 50
PAGE_TARGETS: Final = 50  # target cards on a page unless ?limit= asks otherwise
MAX_PAGE_TARGETS: Final = 200


# ---------------------------------------------------------------- page text


def delivery_trouble(p: ProbeView) -> bool:
    """The probe cannot store results, lost or evicted some, or results are outstanding."""
    o = p.outbox
    return p.outstanding > 0 or (o is not None and (o.error is not None or o.lost > 0 or o.evicted > 0))


def delivery_text(p: ProbeView) -> str:
    """One line on the probe's outbox and the results missing from it."""
    o = p.outbox
    parts = [] if o is None else [f"{o.unpublished} unpublished", f"{o.unconfirmed} unconfirmed"]
    if o is not None and o.error is not None:
        parts.insert(0, f"cannot store results ({o.error})")
    if o is not None and o.lost:
        parts.append(f"{o.lost} lost")
    if o is not None and o.evicted:
        parts.append(f"{o.evicted} evicted unconfirmed")
    if p.outstanding:
        parts.append(f"{p.outstanding} missing, being replayed")
    return ", ".join(parts) or "—"


# ---------------------------------------------------------------- formatting


def _ago(value: datetime, now: datetime) -> str:
    delta = (now - utc(value)).total_seconds()
    if -5 < delta < 1:
        return "just now"
    if delta < 0:
        return f"in {duration(delta, coarse=True)}"
    return f"{duration(delta, coarse=True)} ago"


def _abs(value: datetime, ref: datetime | None = None) -> str:
    """Absolute UTC; ``ref`` given, a time on the same UTC day is shown as its clock time only."""
    u = utc(value)
    if ref is not None and u.date() == utc(ref).date():
        return u.strftime("%H:%M:%S UTC")
    return u.strftime("%Y-%m-%d %H:%M:%S UTC")


def when(value: datetime | None, now: datetime, *, short: bool = False, missing: str = "—") -> Markup:
    """Absolute UTC and relative: ``<time>14:03:11 UTC</time> (12 min ago)``."""
    if value is None:
        return html(missing)
    stamp = el(  # the title gives the date a short stamp leaves out
        "time",
        _abs(value, now if short else None),
        datetime=time_json(value),
        title=short and time_json(value),
    )
    return html(stamp, " ", el("span", f"({_ago(value, now)})", class_="muted"))


_STATE_MARK: Final[Mapping[str, str]] = {"up": "✓", "degraded": "▲", "down": "✕", "unknown": "?"}
_OUTCOME_MARK: Final[Mapping[str, str]] = {"pass": "✓", "fail": "✕", "inconclusive": "?"}


def state_badge(state: str) -> Markup:
    return el("span", f"{_STATE_MARK.get(state, '')} {state}".strip(), class_=f"badge s-{state}")


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    value = finite(value)
    return "—" if value is None else f"{value:{fmt}}{unit}"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _sip(status: int | None, reason: str | None) -> str:
    if status is None:
        return "—"
    return f"{status} {reason}" if reason else str(status)


# ---------------------------------------------------------------- the page


def title(snap: Snapshot) -> str:
    counts = _counts(snap)
    bad = [f"{counts[s]} {s}" for s in _BAD_STATES if counts[s]]
    return ("✕ " + ", ".join(bad) if bad else "✓ all up") + " · ecpm"


def _counts(snap: Snapshot) -> dict[TargetStateName, int]:
    counts = dict.fromkeys(TARGET_STATES, 0)
    for t in snap.targets.values():
        counts[t.state] += 1
    return counts


def render_page(snap: Snapshot, recent: Sequence[Incident], *, now: datetime, query: TargetQuery) -> Markup:
    """The ``<main id="page">`` of the status page (the refresh script swaps it in place):
    the targets ``query`` asks for, worst first, as cards; the rest of them as links."""
    chosen = query.select(snap.targets.values(), worst_first=True)
    return el(
        "main",
        _header(snap, now),
        _open_incidents(snap, now),
        _services(snap),
        _targets(snap, chosen, now),
        _probes(snap, now),
        _resolved(recent, now),
        el(
            "footer",
            "ecpm monitor · ",
            [html(el("a", path, href=path), " ") for path in _API_LINKS],
            class_="noprint",
        ),
        id="page",
        data_snapshot_at=time_json(snap.at),
    )


# worst first: what the verdict banner and the tab title lead with
_BAD_STATES: Final[tuple[TargetStateName, ...]] = ("down", "unknown", "degraded")
_API_LINKS: Final = ("/api/v1/targets", "/api/v1/probes", "/api/v1/incidents", "/metrics")


def _header(snap: Snapshot, now: datetime) -> Markup:
    counts = _counts(snap)
    total = len(snap.targets)
    age = now - utc(snap.at)
    stale = None
    if age > STALE_AFTER:
        stale = el(
            "div",
            f"⚠ Stale page: this snapshot is {duration(age.total_seconds(), coarse=True)} old. "
            "The monitor is serving HTTP but its state is not being updated — do not trust this page.",
            class_="banner stale",
            role="alert",
            data_stale="true",
        )
    worst = next((s for s in _BAD_STATES if counts[s]), "up" if total else None)
    if worst is None:
        verdict = "No targets configured"
    elif worst == "up":
        verdict = f"✓ All {total} emergency call paths up"
    else:
        names = _names([t.id for t in snap.targets.values() if t.state == worst])
        label = {"down": "DOWN", "unknown": "UNKNOWN (no fresh results)", "degraded": "DEGRADED"}[worst]
        verdict = f"{_STATE_MARK[worst]} {counts[worst]} of {total} emergency call paths {label}: {names}"
    probes_up = sum(1 for p in snap.probes.values() if p.up)
    return html(
        el(
            "div",
            el("h1", "Emergency call path status"),
            el(
                "p",
                "Snapshot ",
                when(snap.at, now),
                el("span", f" · refreshes every {REFRESH_SECONDS} s", class_="noprint"),
                class_="meta",
            ),
            class_="top",
        ),
        stale,
        el(
            "div",
            verdict,
            el(
                "div",
                [el("span", el("b", str(counts[s])), f" {s}") for s in TARGET_STATES],
                el(
                    "span",
                    el("b", str(len(snap.open_incidents))),
                    _plural(len(snap.open_incidents), " open incident"),
                ),
                el("span", el("b", f"{probes_up}/{len(snap.probes)}"), " probes up"),
                class_="counts",
            ),
            class_=f"banner verdict s-{worst or 'unknown'}",
            role="status",
            data_verdict=worst or "none",
        ),
    )


NAMES_SHOWN: Final = 10  # a list of names longer than this (verdict, a probe's targets) is cut


def _names(ids: Sequence[str]) -> str:
    more = len(ids) - NAMES_SHOWN
    return ", ".join(ids[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _targets(snap: Snapshot, chosen: Selection, now: datetime) -> Markup:
    if not snap.targets:
        return html(el("h2", "Targets"), el("p", "No targets configured.", class_="empty"))
    changes: dict[str, list[StateChange]] = {}
    for c in snap.timeline:  # one pass, not one per card
        changes.setdefault(c.target, []).append(c)
    cards = [_target_card(t, snap, changes.get(t.id, ()), now) for t in chosen.shown]
    if not cards:
        nothing = "No targets on this page." if chosen.matched else "No targets match this filter."
        cards = [el("p", nothing, " ", el("a", "Show all targets", href="?"), class_="empty")]
    pager = _pager(chosen)
    return html(el("h2", "Targets"), _filter(chosen), pager, cards, pager, _rest(chosen))


_FILTERS: Final[tuple[tuple[str, tuple[TargetStateName, ...]], ...]] = (
    ("all", ()),
    ("problems", _BAD_STATES),
    *((s, (s,)) for s in WORST_FIRST),
)


def _filter(chosen: Selection) -> Markup:
    """Links to each state's targets (with their counts) and a search box: query strings
    both, so they work without JavaScript."""
    q = chosen.query
    links = []
    for label, states in _FILTERS:
        count = sum(chosen.counts[s] for s in states or TARGET_STATES)
        current = "page" if states == q.states else None
        links.append(el("a", f"{label} {count}", href=q.href(states=states), aria_current=current))
    keep = [("state", ",".join(q.states))] if q.states else []
    keep += [("limit", str(q.limit))] if q.limit != q.default_limit else []
    search = el(
        "form",
        [el("input", type="hidden", name=name, value=value) for name, value in keep],
        el("input", type="search", name="q", value=q.text, placeholder="target or description"),
        el("button", "Search", type="submit"),
        method="get",
        role="search",
        aria_label="Search targets",
    )
    return el("div", el("nav", links, aria_label="Filter targets by state"), search, class_="filter noprint")


PAGER_AROUND: Final = 4  # page links either side of the current one


def _pager(chosen: Selection) -> Markup | None:
    if chosen.pages <= 1 and chosen.query.page == 1:
        return None
    q, last = chosen.query, chosen.pages
    first = chosen.start + 1
    shown = f"{first}–{chosen.start + len(chosen.shown)}" if chosen.shown else "none"
    numbers = sorted({1, last, *range(max(1, q.page - PAGER_AROUND), min(last, q.page + PAGER_AROUND) + 1)})
    links: list[Node] = []
    if q.page > 1:
        links.append(el("a", "‹ previous", href=q.href(page=min(q.page - 1, last)), rel="prev"))
    for n in numbers:
        current = "page" if n == q.page else None
        links.append(el("a", str(n), href=q.href(page=n), aria_current=current))
    if q.page < last:
        links.append(el("a", "next ›", href=q.href(page=q.page + 1), rel="next"))
    return el(
        "nav",
        el("span", f"Targets {shown} of {len(chosen.matched)}, worst first · page {q.page} of {last}"),
        links,
        class_="pager noprint",
        aria_label="Target pages",
    )


def _rest(chosen: Selection) -> Markup | None:
    """The targets asked for that are not on this page: one link each, to its card's page."""
    end = chosen.start + len(chosen.shown)
    groups: dict[TargetStateName, list[Node]] = {}
    hrefs: dict[int, str] = {}  # one query string per page, not one per target
    for i, t in enumerate(chosen.matched):
        if not chosen.start <= i < end:
            page = chosen.page_of(i)
            href = hrefs.get(page) or hrefs.setdefault(page, chosen.query.href(page=page))
            groups.setdefault(t.state, []).extend((el("a", t.id, href=f"{href}#target-{t.id}"), " "))
    if not groups:
        return None
    lines = [
        el("p", el("b", f"{_STATE_MARK[s]} {s} ({len(links) // 2})"), " ", links, class_=f"rest-{s}")
        for s, links in groups.items()
    ]
    return html(
        el("h2", f"Not on this page ({len(chosen.matched) - len(chosen.shown)})"),
        el("div", lines, class_="rest"),
    )


def _target_card(t: TargetView, snap: Snapshot, changes: Sequence[StateChange], now: datetime) -> Markup:
    facts = [
        el("span", el("b", "Since "), when(t.since, now)),
        el("span", el("b", "Last success "), when(t.last_success_at, now, missing="never")),
        el("span", el("b", "Probes reporting "), ", ".join(t.covering_probes) or "none"),
        el("span", el("b", "Interval "), duration(t.interval, coarse=True)),
    ]
    if t.open_incident is not None:
        facts.append(
            el(
                "span",
                el("b", "Incident "),
                el("a", f"#{t.open_incident}", href=f"#incident-{t.open_incident}"),
            )
        )
    return el(
        "article",
        el(
            "div",
            state_badge(t.state),
            el("h3", t.id, class_="mono"),
            el("span", t.description, class_="muted") if t.description else None,
            class_="card-head",
        ),
        el("p", t.why, class_="why"),
        el("div", facts, class_="facts"),
        _timeline(t, changes, snap.at),
        _results(t.latest, now, snap.max_clock_skew),
        class_=f"card st-{t.state}",
        id=f"target-{t.id}",
        data_target=t.id,
        data_state=t.state,
    )


_MARK: Final = Markup("\x00")  # split out of a constant column template; data never meets it


class _Table:
    """A table that becomes "label: value" lines on a narrow screen."""

    def __init__(self, *head: str, numeric: Iterable[str] = ()) -> None:
        self.head = head
        self.numeric = frozenset(numeric)
        self.rows: list[Markup] = []
        # each column's <td> built once, around a mark split off: a card has hundreds of cells
        self._cells = [
            el("td", el("span", _MARK), class_=self._class(label), data_label=label).split(_MARK)
            for label in head
        ]

    def _class(self, label: str) -> str | None:
        return "num" if label in self.numeric else None

    def row(self, *cells: Node, **attrs: str | None) -> None:
        tds = [Markup(f"{a}{html(cell)}{b}") for (a, b), cell in zip(self._cells, cells, strict=True)]
        self.rows.append(el("tr", tds, **attrs))

    def render(self) -> Markup:
        head = el("tr", [el("th", label, class_=self._class(label)) for label in self.head])
        table = el("table", el("thead", head), el("tbody", self.rows), class_="stack")
        return el("div", table, class_="panel")


def _skew_tag(skew: float | None, bound: float) -> Markup | None:
    """A mark on a result judged with a clock skew beyond ``ingest.max_clock_skew``."""
    if not skewed(skew, bound):
        return None
    assert skew is not None
    return el("span", f"probe clock {skew:+.1f} s", class_="tag", title="judged by the monitor's clock")


def _results(results: Sequence[ResultSummary], now: datetime, bound: float = 30.0) -> Markup:
    if not results:
        return el("p", "No results yet.", class_="empty")
    table = _Table(
        "Probe",
        "Check",
        "Outcome",
        "Stage",
        "SIP",
        "Post-dial delay",
        "MOS",
        "Finished",
        numeric=("Post-dial delay", "MOS"),
    )
    for r in results:
        tags = [
            el("span", "confirm", class_="tag") if r.confirm else None,
            el("span", "on demand", class_="tag", title=f"request {r.request_id}") if r.request_id else None,
            _skew_tag(r.clock_skew, bound),
        ]
        table.row(
            el("span", r.probe, class_="mono"),
            html(r.check, " ", tags),
            el("span", f"{_OUTCOME_MARK[r.outcome]} {r.outcome}", class_=f"o-{r.outcome}"),
            html(r.stage or "—", f" · {r.reason}" if r.reason else None),
            _sip(r.sip_status, r.sip_reason),
            _num(r.post_dial_delay, ".2f", " s"),
            _num(r.mos, ".2f"),
            when(r.judged, now, short=True),
            data_probe=r.probe,
            data_check=r.check,
            data_outcome=r.outcome,
        )
    return table.render()


def _segments(
    t: TargetView, changes: Sequence[StateChange], start: datetime, end: datetime
) -> list[tuple[str, datetime, datetime]]:
    """(state or "none" for no record, from, to) covering [start, end]."""
    points: list[tuple[datetime, str]] = [(min(max(utc(c.at), start), end), c.state) for c in changes]
    if not points:
        since = utc(t.since) if t.since is not None else start
        points = [(min(max(since, start), end), t.state)]
    out: list[tuple[str, datetime, datetime]] = []
    state, frm = "none", start
    for at, new in [*points, (end, "")]:
        if at > frm:
            out.append((state, frm, at))
            frm = at
        state = new
    return out


_STRIP_WIDTH: Final = 1440.0  # SVG units: one per minute of the 24 h
_STRIP_MIN: Final = 8.0  # a bad spell is drawn at least this wide, so a short outage still shows
_TICKS: Final = (("t0", "24 h ago"), ("t25", "18 h"), ("t50", "12 h"), ("t75", "6 h"), ("t100", "now"))


def _timeline(t: TargetView, changes: Sequence[StateChange], at: datetime) -> Markup:
    end = utc(at)
    start = end - TIMELINE
    span = TIMELINE.total_seconds()
    segments = _segments(t, changes, start, end)
    share: dict[str, float] = {}
    good: list[Markup] = []
    bad: list[Markup] = []  # bad spells are painted last, on top
    for state, frm, to in segments:
        seconds = (to - frm).total_seconds()
        share[state] = share.get(state, 0.0) + seconds
        x = (frm - start).total_seconds() / span * _STRIP_WIDTH
        w = seconds / span * _STRIP_WIDTH
        if state not in ("up", "none") and w < _STRIP_MIN:
            w = _STRIP_MIN
            x = min(x, _STRIP_WIDTH - w)
        label = "no record" if state == "none" else state
        rect = el(
            "rect",
            el("title", f"{label}: {_abs(frm)} – {_abs(to)} ({duration(seconds, coarse=True)})"),
            x=f"{x:.2f}",
            y="0",
            width=f"{w:.2f}",
            height="10",
            class_=f"s-{state}",
        )
        (good if state in ("up", "none") else bad).append(rect)
    svg = el(
        "svg",
        good,
        bad,
        viewBox=f"0 0 {_STRIP_WIDTH:.0f} 10",
        preserveAspectRatio="none",
        role="img",
        aria_label=f"State of {t.id} over the last 24 hours",
    )
    summary = " · ".join(
        f"{'no record' if s == 'none' else s} {share[s] / span:.1%}"
        for s in (*TARGET_STATES, "none")
        if share.get(s, 0.0) > 0
    )
    ticks = el(
        "div", [el("span", text, class_=css) for css, text in _TICKS], class_="ticks", aria_hidden="true"
    )
    return html(el("div", svg, ticks, class_="strip"), el("p", f"Last 24 h: {summary}", class_="share"))


def _notifications(items: Sequence[Notification]) -> Markup:
    if not items:
        return el("span", "none yet", class_="n-pending")
    mark = {"sent": "✓", "failed": "✕", "pending": "…"}
    lines = []
    for n in items:
        tries = f" ({n.attempts} tries)" if n.attempts > 1 else ""
        text = f"{mark[n.state]} {n.notifier} {n.event} {n.state}{tries}"
        lines.append(el("div", text, class_=f"n-{n.state}", title=n.last_error))
    return html(lines)


def countdown(seconds: float) -> str:
    """``12:05 left``, ``1:02:05 left``, ``overdue 0:42``: what the page's script keeps counting
    (the same format in ``templates/status.html``)."""
    whole = int(abs(seconds)) if seconds >= 0 else int(-seconds) + (-seconds % 1 > 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{text} left" if seconds >= 0 else f"overdue {text}"


_DUTY_CLASS: Final[Mapping[str, str]] = {"pending": "n-pending", "met": "n-sent", "missed": "n-failed"}


def _duties(i: Incident, now: datetime) -> Markup:
    """Each duty: its status, due time and, while pending, a countdown the page's script
    advances every second (``data-due``: the seconds left when rendered)."""
    lines: list[Node] = []
    if i.ack is not None:
        lines.append(
            el("div", f"✓ incident acknowledged by {i.ack.by} ({i.ack.ref}): no more escalation pages",
               class_="n-sent", data_incident_ack="true")
        )  # fmt: skip
    for d in i.duties:
        status = d.status(now)
        left = (d.due_at - now).total_seconds()
        if d.ack is not None:
            detail: Node = f"acknowledged {_abs(d.ack.at, now)} by {d.ack.by} ({d.ack.ref})"
        else:
            detail = el("span", countdown(left), class_="countdown", data_due=f"{left:.3f}")
        lines.append(
            el(
                "div",
                el("b", d.name), " ",
                el("span", status.upper() if status != "pending" else "due", class_="muted"),
                " ", when(d.due_at, now, short=True), " · ", detail,
                " · escalated" if d.escalated_at is not None else None,
                class_=_DUTY_CLASS[status], title=d.text, data_duty=d.name, data_status=status,
            )
        )  # fmt: skip
    return html(lines) if lines else el("span", "none", class_="muted")


def _kind_badge(kind: str) -> Markup:
    return state_badge("down") if kind == "down" else el("span", "? gap", class_="badge s-unknown")


def _open_incidents(snap: Snapshot, now: datetime) -> Markup:
    if not snap.open_incidents:
        return html(el("h2", "Open incidents"), el("p", "No open incidents.", class_="empty"))
    table = _Table(
        "#",
        "Target",
        "Kind",
        "Opened (detected)",
        "First failure",
        "Detection latency",
        "Notifications",
        "Duties",
        "Summary",
        numeric=("#", "Detection latency"),
    )
    for i in snap.open_incidents[:OPEN_ON_PAGE]:
        table.row(
            str(i.id),
            el("b", i.target, class_="mono"),
            _kind_badge(i.kind),
            when(i.opened_at, now),
            when(i.first_failed_at, now, short=True),
            _num(i.detection_latency, ".1f", " s"),
            _notifications(i.notifications),
            _duties(i, now),
            i.summary,
            id=f"incident-{i.id}",
            data_incident=str(i.id),
            data_target=i.target,
        )
    more = len(snap.open_incidents) - OPEN_ON_PAGE
    rest = None
    if more > 0:
        api = el("a", "/api/v1/incidents", href="/api/v1/incidents")
        rest = el("p", f"and {more} newer ones (each down target's card names its own), all in ", api)
    return html(el("h2", f"Open incidents ({len(snap.open_incidents)})"), table.render(), rest)


_PROBE_BADGE: Final[Mapping[str, tuple[str, str]]] = {
    "online": ("s-up", "✓"),
    "stale": ("s-degraded", "▲"),
    "offline": ("s-down", "✕"),
    "unknown": ("s-unknown", "?"),
}


def _services(snap: Snapshot) -> Markup:
    """Services of redundant paths (``monitor.redundancy``): degraded = a path lost."""
    if not snap.services:
        return html()
    table = _Table("Service", "State", "Paths")
    for s in snap.services.values():
        paths = [
            el("div", f"{p.role} ", el("span", p.target, class_="mono"), " ", state_badge(p.state),
               " lost" if p.lost else None, data_path=p.target, data_lost=str(p.lost).lower())
            for p in s.paths
        ]  # fmt: skip
        name = html(el("b", s.id, class_="mono"), " ", el("span", s.description, class_="muted"))
        what = " — redundancy LOST" if s.redundancy_lost and s.state == "degraded" else None
        table.row(name, html(state_badge(s.state), what), paths, data_service=s.id, data_state=s.state)
    return html(el("h2", f"Services ({len(snap.services)})"), table.render())


def _probes(snap: Snapshot, now: datetime) -> Markup:
    if not snap.probes:
        return html(el("h2", "Probes"), el("p", "No probes known.", class_="empty"))
    table = _Table(
        "Probe",
        "Status",
        "Last result",
        "Last status message",
        "Delivery",
        "Clock skew",
        "Version",
        "Targets",
    )
    for p in snap.probes.values():
        status = probe_status(p)
        css, mark = _PROBE_BADGE[status]
        trouble = delivery_trouble(p)
        table.row(
            el("span", p.id, class_="mono"),
            el("span", f"{mark} {status}", class_=f"badge {css}"),
            when(p.last_result_at, now, missing="never"),
            when(p.status_at, now, missing="never"),
            el("span", delivery_text(p), class_="badge s-down" if trouble else ""),
            html(
                _num(p.clock_skew, "+.1f", " s"),
                " ",
                el("span", f"beyond {snap.max_clock_skew:g} s", class_="tag") if p.clock_skewed else None,
            ),
            p.version or "—",
            _names(p.targets) or "—",
            data_probe=p.id,
            data_status=status,
            data_delivery="trouble" if trouble else "ok",
        )
    return html(el("h2", "Probes"), table.render())


def _resolved(recent: Sequence[Incident], now: datetime) -> Markup:
    done = [i for i in recent if i.resolved_at is not None][:RESOLVED_ON_PAGE]
    if not done:
        return html()
    table = _Table(
        "#", "Target", "Kind", "Opened", "Resolved", "Lasted", "Duties", "Summary", numeric=("#", "Lasted")
    )  # a resolved incident's duties still count down: a short outage still had to be notified
    for i in done:
        assert i.resolved_at is not None
        table.row(
            str(i.id),
            el("span", i.target, class_="mono"),
            i.kind,
            when(i.opened_at, now),
            when(i.resolved_at, now),
            duration((utc(i.resolved_at) - utc(i.opened_at)).total_seconds(), coarse=True),
            _duties(i, now),
            i.summary,
            data_incident=str(i.id),
        )
    return html(el("h2", "Recently resolved incidents"), table.render())


# ---------------------------------------------------------------- page template


class Template:
    """``templates/status.html`` with its inline style and script pinned by a CSP hash."""

    def __init__(self, text: str) -> None:
        self._template = string.Template(text)
        hashes = {kind: csp_hashes(text, kind) for kind in ("style", "script")}
        self.headers = {
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": (
                f"default-src 'none'; style-src {hashes['style']}; script-src {hashes['script']}; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'self'; "
                "frame-ancestors 'none'"
            ),
        }

    @classmethod
    def load(cls) -> Template:
        text = resources.files("monitor").joinpath("templates/status.html").read_text("utf-8")
        return cls(text)

    def render(self, *, title: str, page: Markup) -> str:
        return self._template.substitute(title=escape(title), page=page, refresh=REFRESH_SECONDS)
