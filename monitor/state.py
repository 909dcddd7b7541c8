"""Reachability: from a target's recent results to ``up`` / ``degraded`` / ``down`` / ``unknown``.

Pure logic, no I/O: the service feeds results and asks for a verdict at a time.

- ``down`` needs confirmation: the latest K decisive results (pass or fail; an
  inconclusive NENA 486 is neither) all failed, **and** at least M probes have a
  failure as their latest decisive result, where M is ``min_failing_probes`` capped at
  the number of probes covering the target: those with a fresh decisive call result,
  plus those that announced the target and came online within the last interval (their
  first result is still due). One flaky probe never makes a target down when another
  probe gets through; a probe that only pings OPTIONS or only gets 486 does not cover.
- ``unknown``: no fresh result within ``stale_after × interval`` — a monitoring gap.
  Fresh is by each result's judged time (``monitor.skew``), never the probe's own stamp.
- ``degraded``: not down, but something is wrong: some probe's latest call failed,
  the latest results are inconclusive, or a pass had poor media or slow post-dial delay.
- ``up``: otherwise.

The calls decide (``invite``, the kinds in ``CALL_KINDS``, a flag of each check kind's
registry entry); ``options`` results (the pings) decide only for a target that has
never had an invite result (monitored by OPTIONS alone). Once a target has been
called, OPTIONS answering while no call result is fresh is ``unknown``: the calls
stopped (the Vonage pattern), whatever a ping says. A failing OPTIONS ping makes an
otherwise-up target degraded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ecpm.configfile import format_duration
from monitor.config import MonitoredTarget, Reachability
from monitor.model import ResultSummary, TargetStateName
from probes.result import CALL_KINDS

# How many recent results a tracker keeps per target (enough for K and every probe).
MAX_KEPT = 200


@dataclass(frozen=True, slots=True)
class Verdict:
    state: TargetStateName
    why: str
    covering_probes: tuple[str, ...]


def _latest_by_probe(results: Iterable[ResultSummary]) -> dict[str, ResultSummary]:
    latest: dict[str, ResultSummary] = {}
    for r in results:  # newest first
        latest.setdefault(r.probe, r)
    return latest


class TargetTracker:
    """Recent results of one target, and the verdict they support."""

    def __init__(self, target: MonitoredTarget, rules: Reachability) -> None:
        self.target = target
        self.rules = rules
        self._results: deque[ResultSummary] = deque(maxlen=MAX_KEPT)  # oldest ... newest
        self.seen_invite = False  # once a target was called, OPTIONS alone can never make it up

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.rules.stale_after * self.target.interval)

    def add(self, result: ResultSummary) -> None:
        self.seen_invite = self.seen_invite or result.check in CALL_KINDS
        # results arrive nearly in order; keep the deque sorted by judged time (monitor.skew)
        if not self._results or result.judged >= self._results[-1].judged:
            self._results.append(result)
            return
        items = sorted([*self._results, result], key=lambda r: r.judged)
        self._results = deque(items[-MAX_KEPT:], maxlen=MAX_KEPT)

    def recent(self) -> list[ResultSummary]:
        """Newest first."""
        return list(reversed(self._results))

    def last_success(self) -> ResultSummary | None:
        return next((r for r in self._deciding(self.recent()) if r.outcome == "pass"), None)

    def failure_run(self) -> tuple[ResultSummary | None, ResultSummary | None]:
        """(last good, first failed) around the current run of failures of the deciding check."""
        deciding = self._deciding(self.recent())
        first_failed = None
        for r in deciding:
            if r.outcome == "pass":
                return r, first_failed
            if r.outcome == "fail":
                first_failed = r
        return None, first_failed

    def _deciding(self, newest_first: list[ResultSummary]) -> list[ResultSummary]:
        invites = [r for r in newest_first if r.check in CALL_KINDS]
        return invites if invites or self.seen_invite else newest_first

    def evaluate(self, now: datetime, expected: frozenset[str] = frozenset()) -> Verdict:
        """The verdict at ``now``. ``expected``: probes that announced this target and came
        online within the last interval — they cover it before their first result, so one
        failing probe cannot make a target down while another is still starting (but only
        for one interval: a probe that never calls cannot hold ``down`` off)."""
        rules = self.rules
        fresh = [r for r in self.recent() if r.judged >= now - self.window]
        if not fresh:
            last = self._results[-1].judged if self._results else None
            age = "never" if last is None else f"{format_duration((now - last).total_seconds())} ago"
            return Verdict(
                "unknown",
                f"no fresh result within {format_duration(self.window.total_seconds())} (last: {age})",
                (),
            )
        deciding = self._deciding(fresh)
        if not deciding:  # only OPTIONS still answer: the calls themselves have stopped
            return Verdict(
                "unknown",
                f"no fresh test call within {format_duration(self.window.total_seconds())}"
                " (OPTIONS still answer)",
                (),
            )
        decisive = [r for r in deciding if r.outcome != "inconclusive"]
        # covering: probes whose calls decide now, plus those that just came online for it
        covering = tuple(sorted({r.probe for r in decisive} | (expected - {r.probe for r in deciding})))
        latest = _latest_by_probe(decisive)
        failing_probes = sorted(p for p, r in latest.items() if r.outcome == "fail")
        needed = min(rules.min_failing_probes, len(covering))
        window = decisive[: rules.confirm_results]
        if (
            len(window) == rules.confirm_results
            and all(r.outcome == "fail" for r in window)
            and len(failing_probes) >= needed
        ):
            r = window[0]
            status = f" {r.sip_status}" if r.sip_status else ""
            return Verdict(
                "down",
                f"last {len(window)} calls failed at {r.stage or '?'}{status}"
                f" from {len(failing_probes)} of {len(covering)} probes",
                covering,
            )
        if failing_probes:
            return Verdict(
                "degraded",
                f"failing from {', '.join(failing_probes)} ({len(failing_probes)} of {len(covering)} probes)",
                covering,
            )
        if deciding[0].outcome == "inconclusive":
            return Verdict("degraded", "latest call inconclusive (test-call limit or similar)", covering)
        if not decisive:
            return Verdict("degraded", "only inconclusive results", covering)
        for probe, r in sorted(latest.items()):
            if r.post_dial_delay is not None and r.post_dial_delay > rules.degraded_post_dial_delay:
                return Verdict(
                    "degraded", f"slow post-dial delay {r.post_dial_delay:.2f}s from {probe}", covering
                )
            if r.mos is not None and r.mos < rules.degraded_mos:
                return Verdict("degraded", f"poor audio: MOS {r.mos:.2f} from {probe}", covering)
        options_failing = sorted(
            p
            for p, r in _latest_by_probe(x for x in fresh if x.check not in CALL_KINDS).items()
            if r.outcome == "fail"
        )
        if any(r.check in CALL_KINDS for r in fresh) and options_failing:
            return Verdict("degraded", f"OPTIONS failing from {', '.join(options_failing)}", covering)
        return Verdict(
            "up", f"calls pass from {len(covering)} probe{'s' if len(covering) != 1 else ''}", covering
        )
