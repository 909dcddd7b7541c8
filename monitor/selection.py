"""Which targets a request asks for: the filter and paging of the status page and of
``/api/v1/targets``, from the query string alone (so the page works without JavaScript).

``?state=down,degraded`` one or more states (comma-separated or repeated); ``?q=text``
in the target's id or description, any case; ``?limit=N`` targets a page and ``?page=N``
(from 1). The page shows the worst first (down, unknown, degraded, up), the API keeps
configuration order; either way configuration order within a state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

from ecpm.errors import EcpmError
from monitor.model import TARGET_STATES, TargetStateName, TargetView

__all__ = ["WORST_FIRST", "QueryError", "Selection", "TargetQuery"]

WORST_FIRST: Final[tuple[TargetStateName, ...]] = ("down", "unknown", "degraded", "up")
MAX_TEXT: Final = 200
MAX_PAGE: Final = 1_000_000


class QueryError(EcpmError, ValueError):
    """A query parameter the selection cannot take; its message names the parameter."""


@dataclass(frozen=True, slots=True)
class TargetQuery:
    states: tuple[TargetStateName, ...] = ()  # (): every state
    text: str = ""
    page: int = 1
    limit: int | None = None  # None: every target on one page
    default_limit: int | None = None  # what no ``?limit`` means where this was asked (left out of links)

    @classmethod
    def parse(
        cls, params: Mapping[str, Sequence[str]], *, default_limit: int | None, max_limit: int
    ) -> TargetQuery:
        """From ``{name: [value, ...]}`` (``parse_qs``'s shape); raises :class:`QueryError`."""
        states: list[TargetStateName] = []
        for raw in params.get("state", ()):
            for name in filter(None, raw.split(",")):
                state = next((s for s in TARGET_STATES if s == name), None)
                if state is None:
                    raise QueryError(f"state must be one of {', '.join(TARGET_STATES)}, not {name[:40]!r}")
                if state not in states:
                    states.append(state)
        text = _last(params, "q").strip()
        if len(text) > MAX_TEXT:
            raise QueryError(f"q may be at most {MAX_TEXT} characters")
        limit = _whole(params, "limit", default_limit, 1, max_limit)
        page = _whole(params, "page", 1, 1, MAX_PAGE)
        assert page is not None
        return cls(tuple(sorted(states, key=WORST_FIRST.index)), text, page, limit, default_limit)

    def select(self, targets: Iterable[TargetView], *, worst_first: bool) -> Selection:
        """The targets asked for, in order, and the counts by state of those the text
        matches (what each state's filter link would show)."""
        folded = self.text.casefold()
        counts = dict.fromkeys(TARGET_STATES, 0)
        chosen: list[TargetView] = []
        for t in targets:
            if not folded or folded in t.id.casefold() or folded in t.description.casefold():
                counts[t.state] += 1
                if not self.states or t.state in self.states:
                    chosen.append(t)
        if worst_first:
            chosen.sort(key=lambda t: WORST_FIRST.index(t.state))
        return Selection(self, tuple(chosen), counts)

    def href(self, *, page: int = 1, states: tuple[TargetStateName, ...] | None = None) -> str:
        """The query string of this query on ``page``, with ``states`` instead of its own if
        given; a value left at its default is left out."""
        chosen = self.states if states is None else states
        pairs = [("state", ",".join(chosen))] if chosen else []
        pairs += [("q", self.text)] if self.text else []
        pairs += [("limit", str(self.limit))] if self.limit != self.default_limit else []
        pairs += [("page", str(page))] if page != 1 else []
        return "?" + urlencode(pairs)


@dataclass(frozen=True, slots=True)
class Selection:
    query: TargetQuery
    matched: tuple[TargetView, ...]  # in the order shown, every page
    counts: Mapping[TargetStateName, int]  # by state, of the targets the text matches

    @property
    def pages(self) -> int:
        limit = self.query.limit
        return 1 if limit is None else max(1, math.ceil(len(self.matched) / limit))

    @property
    def start(self) -> int:
        """Index in ``matched`` of the first target on the page asked for."""
        limit = self.query.limit
        return 0 if limit is None else min((self.query.page - 1) * limit, len(self.matched))

    @property
    def shown(self) -> tuple[TargetView, ...]:
        limit = self.query.limit
        return self.matched if limit is None else self.matched[self.start : self.start + limit]

    def page_of(self, index: int) -> int:
        """The page that shows ``matched[index]``."""
        limit = self.query.limit
        return 1 if limit is None else index // limit + 1


def _last(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params.get(name, ())
    return values[-1] if values else ""


def _whole(
    params: Mapping[str, Sequence[str]], name: str, default: int | None, low: int, high: int
) -> int | None:
    raw = _last(params, name)
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise QueryError(f"{name} must be a whole number from {low} to {high}")
    return int(raw)
