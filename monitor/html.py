"""The one way the monitor writes HTML: the status page (``monitor.status_page``) and the evidence
report (``monitor.report_render.html``) both build it here.

``el`` and ``html`` escape every plain ``str``; only a :class:`Markup` (what they return)
goes in as is, so a value from a probe or the store can never become markup. The same
module holds what both pages format alike: durations, UTC times, and the
Content-Security-Policy hashes that pin a template's inline ``<style>``/``<script>``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeAlias

from probes.result import format_time

__all__ = ["Markup", "Node", "csp_hashes", "duration", "el", "escape", "html", "readable_time", "utc"]


class Markup(str):
    """Text that is already HTML: inserted as is. Every other ``str`` gets escaped."""

    __slots__ = ()


Node: TypeAlias = "str | Sequence[Node] | None"


def escape(text: str) -> str:
    """For HTML text and quoted attributes alike."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#x27;")
    )


def _flatten(nodes: Sequence[Node], out: list[str]) -> None:
    for node in nodes:
        if node is None:
            continue
        if type(node) is Markup:  # the common case first: a page is mostly built elements
            out.append(node)
        elif isinstance(node, str):
            out.append(node if isinstance(node, Markup) else escape(node))
        else:
            _flatten(node, out)


def html(*children: Node) -> Markup:
    """Join children into markup, escaping every plain string."""
    out: list[str] = []
    _flatten(children, out)
    return Markup("".join(out))


_VOID = frozenset({"br", "meta", "link", "input"})
_SVG_EMPTY = frozenset({"line", "polyline", "rect"})  # written ``<line .../>`` when childless


def el(name: str, /, *children: Node, **attrs: str | int | float | bool | None) -> Markup:
    """``el("td", "x", class_="num", data_label="MOS")`` → ``<td class="num" data-label="MOS">x</td>``.

    An attribute that is None or False is left out; True writes it bare. A trailing ``_``
    is dropped (``class_``) and any other ``_`` becomes ``-`` (``data_label``)."""
    opening = "<" + name
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        opening += f" {attr}" if value is True else f' {attr}="{escape(str(value))}"'
    if name in _VOID:
        return Markup(opening + ">")
    out: list[str] = []
    _flatten(children, out)
    inner = "".join(out)
    if not inner and name in _SVG_EMPTY:
        return Markup(opening + "/>")
    return Markup(f"{opening}>{inner}</{name}>")


# ---------------------------------------------------------------- formatting


def utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def readable_time(moment: datetime | None) -> str:
    """``2026-11-02 10:07:33Z``: RFC 3339 for people (a space, milliseconds only when not 0)."""
    if moment is None:
        return "—"
    return format_time(moment).replace(".000Z", "Z").replace("T", " ")


def duration(seconds: float | None, *, coarse: bool = False) -> str:
    """``3 min 50 s``, exact to the second (to the millisecond below a minute), for the
    evidence report; ``coarse`` rounds to the two leading units (``2 h 05 min``), for the
    status page, where a glance matters more than the last second. ``None`` is ``—``."""
    if seconds is None:
        return "—"
    if coarse:
        seconds = abs(seconds)
        if seconds < 60:
            return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
        hours, minutes = divmod(int(seconds // 60), 60)
        days, hours = divmod(hours, 24)
        if days:
            return f"{days} d {hours} h"
        return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + " s"
    days, rest = divmod(round(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


def csp_hashes(template: str, kind: str) -> str:
    """``'sha256-…'`` sources for every inline ``<kind>`` (style or script) in ``template``,
    for a Content-Security-Policy that allows those and nothing else."""
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in re.findall(rf"<{kind}>(.*?)</{kind}>", template, re.S)
    )
