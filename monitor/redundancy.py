"""Redundancy as a state: a service's primary and backup paths, each a target.

Pure logic, no I/O. A path is **lost** when its target is ``down`` or ``unknown`` (a
backup nobody has called successfully lately is as good as none); ``degraded`` and
``up`` paths still carry calls. A service is

- ``up``: no path lost;
- ``degraded``: some path lost, another not — still available, but redundancy is lost
  (``ecpm_service_redundancy_lost``, the ``EmergencyRedundancyLost`` alert);
- ``down``: every path lost and one of them down;
- ``unknown``: every path unknown.

Probes call every path, backup included (each path is a target of its own in the
probes' config), so a broken backup is seen before the primary fails. The evidence
report takes the lost periods from the targets' recorded state changes
(``lost_periods``), so nothing more is stored for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from monitor.config import Service
from monitor.model import PathRole, PathView, ServiceView, StateChange, TargetStateName, TargetView

LOST_STATES: frozenset[TargetStateName] = frozenset({"down", "unknown"})


def paths(service: Service) -> list[tuple[str, PathRole]]:
    return [*((t, "primary") for t in service.primary), *((t, "backup") for t in service.backup)]


def service_state(states: Sequence[TargetStateName]) -> TargetStateName:
    lost = [s for s in states if s in LOST_STATES]
    if not lost:
        return "up"
    if len(lost) < len(states):
        return "degraded"
    return "down" if "down" in lost else "unknown"


def service_views(services: Sequence[Service], targets: Mapping[str, TargetView]) -> dict[str, ServiceView]:
    views = {}
    for s in services:
        members = tuple(
            PathView(t, role, state, state in LOST_STATES)
            for t, role in paths(s)
            for state in [targets[t].state if t in targets else "unknown"]
        )
        views[s.id] = ServiceView(s.id, s.description, service_state([p.state for p in members]), members)
    return views


@dataclass(frozen=True, slots=True)
class LostPeriod:
    """A stretch of ``[start, end)`` in which some path of ``service`` was lost."""

    service: str
    start: datetime
    end: datetime
    lost: tuple[str, ...]  # every path lost at some time in it, primary first
    worst: TargetStateName  # the service's worst state in it: degraded, down or unknown

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


_WORSE: Mapping[TargetStateName, int] = {"up": 0, "degraded": 1, "unknown": 2, "down": 3}


def lost_periods(
    service: Service,
    baseline: Mapping[str, TargetStateName],
    changes: Sequence[StateChange],
    *,
    start: datetime,
    end: datetime,
) -> list[LostPeriod]:
    """The periods in ``[start, end)`` with a path of ``service`` lost, from each path's state
    at ``start`` (``baseline``; missing: unknown) and the state changes after it (oldest first)."""
    members = paths(service)
    names = [t for t, _ in members]
    state: dict[str, TargetStateName] = {t: baseline.get(t, "unknown") for t in names}
    out: list[LostPeriod] = []
    opened: datetime | None = None
    lost: list[str] = []
    worst: TargetStateName = "up"

    def look(at: datetime) -> None:
        nonlocal opened, lost, worst
        now_lost = [t for t in names if state[t] in LOST_STATES]
        if now_lost and opened is None:
            opened, lost, worst = at, [], "up"
        if opened is not None:
            lost += [t for t in now_lost if t not in lost]
            current = service_state([state[t] for t in names])
            worst = current if _WORSE[current] > _WORSE[worst] else worst
            if not now_lost:
                if at > opened:  # changes at one instant (one evaluation) make no period
                    out.append(
                        LostPeriod(service.id, opened, at, tuple(t for t in names if t in lost), worst)
                    )
                opened = None

    look(start)
    for c in changes:
        if c.target in state and start <= c.at < end:
            state[c.target] = c.state
            look(c.at)
    if opened is not None:
        out.append(LostPeriod(service.id, opened, end, tuple(t for t in names if t in lost), worst))
    return out
