"""Scheduler logic against a fake runner, on an event loop whose clock is virtual.

The loop's selector never sleeps: when nothing is ready it advances the clock to the
next timer. Every asyncio timer (sleep, wait, timeout) then runs in virtual time, so
hours of schedule take milliseconds and timings are exact.
"""

from __future__ import annotations

import asyncio
import logging
import random
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, TypeVar

import pytest

from probes.config import ScheduleSettings, Target
from probes.outcome import CheckOutcome
from probes.scheduler import CheckReport, Scheduler, verdict_ready

T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready  # type: ignore[no-any-return]
        if timeout is None:  # nothing scheduled: only I/O (another thread) can wake us
            return super().select(None)  # type: ignore[no-any-return]
        self.now += timeout
        return []


def _virtual_loop() -> asyncio.AbstractEventLoop:
    selector = _VirtualSelector()
    loop = asyncio.SelectorEventLoop(selector)
    loop.time = lambda: selector.now  # type: ignore[method-assign]
    return loop


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_virtual_loop) as runner:
        return runner.run(coro)


def target(
    tid: str = "t1",
    *,
    spacing: str = "1s",
    invite: str | None = "30s",
    options: str | None = None,
    max_duration: str = "20s",
) -> Target:
    checks: dict[str, Any] = {}
    if invite is not None:
        checks["invite"] = {
            "interval": invite,
            "max_duration": max_duration,
            "answer_timeout": "5s",
            "media_time": "1s",
        }
    if options is not None:
        checks["options"] = {"interval": options, "timeout": "2s"}
    return Target(
        id=tid, uri=f"sip:{tid}@127.0.0.1:5090", test_endpoint=True, min_spacing=spacing, checks=checks
    )


def settings(**kw: Any) -> ScheduleSettings:
    base: dict[str, Any] = {"jitter": 0.0, "check_timeout_margin": "5s"}
    base.update(kw)
    return ScheduleSettings(**base)


@dataclass
class Call:
    target: str
    kind: str
    start: float
    end: float | None = None
    cancelled: bool = False


Behaviour = Callable[[str, str, int], Awaitable[CheckOutcome]]


@dataclass
class Fake:
    """A runner that records every call and asks ``behaviour`` what to do."""

    behaviour: Behaviour | None = None
    calls: list[Call] = field(default_factory=list)
    reports: list[tuple[float, CheckReport]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    active: set[tuple[str, str]] = field(default_factory=set)
    overlaps: int = 0

    async def run(self, tgt: Target, kind: str) -> CheckOutcome:
        loop = asyncio.get_running_loop()
        call = Call(tgt.id, kind, loop.time())
        self.calls.append(call)
        n = sum(1 for c in self.calls if c.target == tgt.id and c.kind == kind)
        if (tgt.id, kind) in self.active:
            self.overlaps += 1
        self.active.add((tgt.id, kind))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.behaviour is None:
                await asyncio.sleep(0.5)
                return outcome(kind, "pass")
            return await self.behaviour(tgt.id, kind, n)
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            call.end = loop.time()
            self.in_flight -= 1
            self.active.discard((tgt.id, kind))

    async def sink(self, report: CheckReport) -> None:
        self.reports.append((asyncio.get_running_loop().time(), report))

    def starts(self, tid: str, kind: str) -> list[float]:
        return [c.start for c in self.calls if c.target == tid and c.kind == kind]


def outcome(kind: str, result: str = "pass", **kw: Any) -> CheckOutcome:
    now = datetime.now(UTC)
    return CheckOutcome(check=kind, outcome=result, started_at=now, finished_at=now, **kw)  # type: ignore[arg-type]


async def run_for(sched: Scheduler, seconds: float, **stop: Any) -> None:
    task = asyncio.create_task(sched.run())
    await asyncio.sleep(seconds)
    await sched.stop(**stop)
    await task


def make(fake: Fake, targets: list[Target], **kw: Any) -> Scheduler:
    return Scheduler(
        targets=targets, settings=settings(**kw), runner=fake.run, sink=fake.sink, rng=random.Random(1)
    )


# ---------------------------------------------------------------- timing


def test_each_kind_keeps_its_interval_and_targets_are_spaced() -> None:
    fake = Fake()
    sched = make(fake, [target(spacing="1s", invite="10s", options="3s")])
    run_virtual(run_for(sched, 60.5))
    invites, options = fake.starts("t1", "invite"), fake.starts("t1", "options")
    assert invites == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert options[0] == 1.0  # first check at start, one spacing after the invite
    gaps = [b - a for a, b in pairwise(options)]
    assert all(3.0 <= g <= 4.0 for g in gaps), gaps  # 3 s, or pushed by spacing
    every = sorted(invites + options)
    assert min(b - a for a, b in pairwise(every)) >= 1.0
    assert len(fake.reports) == len(fake.calls)
    assert all(not r.confirm and r.request_id is None for _, r in fake.reports)


def test_jitter_spreads_starts_without_changing_the_mean() -> None:
    fake = Fake()
    sched = make(fake, [target(invite="10s")], jitter=0.2)
    run_virtual(run_for(sched, 2000))
    starts = fake.starts("t1", "invite")
    assert 0.0 <= starts[0] <= 2.0  # first check at start, within jitter × interval
    gaps = [b - a for a, b in pairwise(starts)]
    assert all(8.0 <= g <= 12.0 for g in gaps)
    assert len({round(g, 3) for g in gaps}) > len(gaps) // 2  # not lock-step
    assert 9.8 <= sum(gaps) / len(gaps) <= 10.2


def test_without_first_check_at_start_the_first_waits_an_interval() -> None:
    fake = Fake()
    sched = make(fake, [target(invite="10s")], jitter=0.1, first_check_at_start=False)
    run_virtual(run_for(sched, 15))
    assert 9.0 <= fake.starts("t1", "invite")[0] <= 11.0


def test_no_overlap_and_global_limit_with_slow_checks() -> None:
    async def slow(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(7.0)
        return outcome(kind)

    fake = Fake(slow)
    targets = [target(f"t{i}", invite="5s", options="2s", spacing="0.5s") for i in range(5)]
    sched = make(fake, targets, max_concurrent_checks=3)
    run_virtual(run_for(sched, 100))
    assert fake.overlaps == 0
    assert fake.max_in_flight == 3
    for t in targets:
        for kind in ("invite", "options"):
            s = [c for c in fake.calls if c.target == t.id and c.kind == kind]
            for a, b in pairwise(s):
                assert a.end is not None and b.start >= a.end  # overrun: next one waits, no stacking
    everyone = sorted(c.start for c in fake.calls)
    assert len(everyone) >= 35  # 3 slots × 100 s / 7 s, nearly
    for t in targets:
        mine = sorted(c.start for c in fake.calls if c.target == t.id)
        assert min(b - a for a, b in pairwise(mine)) >= 0.5


# ---------------------------------------------------------------- confirmation, backoff


def test_a_failure_is_confirmed_once_at_once() -> None:
    async def failing(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(1.0)
        return outcome(kind, "fail", stage="answer", reason="timeout", sip_status=408)

    fake = Fake(failing)
    sched = make(fake, [target(invite="30s", spacing="2s")])
    run_virtual(run_for(sched, 40))
    got = [(round(t, 3), r.confirm) for t, r in fake.reports]
    # 0: fail (reported at 1) → confirmation at 2 (spacing from 0), reported at 3;
    # the failed confirmation is not confirmed again; next scheduled at 30 → confirm at 32
    assert got == [(1.0, False), (3.0, True), (31.0, False), (33.0, True)]
    assert fake.starts("t1", "invite") == [0.0, 2.0, 30.0, 32.0]


def test_an_early_verdict_is_reported_at_once_and_the_slot_waits_for_the_call() -> None:
    async def announcing(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(2.0)  # the media window: no test endpoint heard
        failed = outcome(kind, "fail", stage="media", reason="no_tone")
        verdict_ready(failed)
        await asyncio.sleep(4.0)  # the announcement, then the hang-up
        return outcome(kind, "fail", stage="media", reason="no_tone", timings={"teardown": 0.1})

    fake = Fake(announcing)
    sched = make(fake, [target(invite="30s", spacing="1s")])
    run_virtual(run_for(sched, 20))
    got = [(round(t, 3), r.confirm, r.outcome.timings) for t, r in fake.reports]
    # reported when the verdict was ready (2 s), once; the confirmation starts when the
    # first call has ended (6 s), never while it is still up
    assert got == [(2.0, False, {}), (8.0, True, {})]
    assert fake.starts("t1", "invite") == [0.0, 6.0]
    assert fake.overlaps == 0
    verdict_ready(outcome("invite"))  # outside a scheduled runner: nothing happens


def test_confirmation_can_be_turned_off() -> None:
    async def failing(tid: str, kind: str, n: int) -> CheckOutcome:
        return outcome(kind, "fail", stage="transport", reason="timeout")

    fake = Fake(failing)
    sched = make(fake, [target(invite="30s")], confirm_failures=False)
    run_virtual(run_for(sched, 40))
    assert [r.confirm for _, r in fake.reports] == [False, False]


def test_busy_486_backs_off_scheduled_checks_of_that_kind(caplog: pytest.LogCaptureFixture) -> None:
    async def busy_once(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(0.1)
        if kind == "invite" and n == 1:
            return outcome(kind, "inconclusive", stage="answer", reason="busy", sip_status=486)
        return outcome(kind)

    fake = Fake(busy_once)
    sched = make(fake, [target(invite="10s", options="10s")], backoff_after_busy="60s")

    async def main() -> None:
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(30)
        assert sched.request("t1", "invite", "req-during-backoff") is None  # operator asks
        await asyncio.sleep(70)
        await sched.stop()
        await task

    with caplog.at_level(logging.WARNING, logger="probes.scheduler"):
        run_virtual(main())
    invites = fake.starts("t1", "invite")
    assert invites[0] == 0.0
    assert invites[1] == 30.0  # the request, despite the backoff
    assert invites[2] == pytest.approx(60.1)  # backoff from the 486 at 0.1 s
    assert all(b - a == pytest.approx(10.0) for a, b in pairwise(invites[2:]))
    assert fake.starts("t1", "options")[:4] == [1.0, 11.0, 21.0, 31.0]  # unaffected
    assert not any(r.confirm for _, r in fake.reports)  # inconclusive is never confirmed
    assert "backing off" in caplog.text


# ---------------------------------------------------------------- hard timeout, errors


def test_a_hung_check_is_reported_at_its_hard_timeout() -> None:
    async def hang(tid: str, kind: str, n: int) -> CheckOutcome:
        if n == 1:
            await asyncio.sleep(3600)
        return outcome(kind)

    fake = Fake(hang)
    sched = make(fake, [target(invite="60s", max_duration="20s")], check_timeout_margin="5s")
    run_virtual(run_for(sched, 30))
    first_time, first = fake.reports[0]
    assert first_time == 25.0  # max_duration 20 s + margin 5 s
    assert first.outcome.outcome == "fail" and first.outcome.reason == "hard_timeout"
    assert first.outcome.stage is None and first.outcome.check == "invite"
    assert fake.calls[0].cancelled and fake.calls[0].end == 25.0  # the runner was told to hang up
    assert fake.reports[1][1].confirm  # and a confirmation followed, which passed
    assert fake.calls[1].start == 25.0
    assert sched.stats().hard_timeouts_total == 1


def test_a_runner_slow_to_hang_up_keeps_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    async def stubborn(tid: str, kind: str, n: int) -> CheckOutcome:
        if n == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(12)  # a hang-up that takes its time
                raise
        return outcome(kind)

    fake = Fake(stubborn)
    sched = make(fake, [target(invite="60s", max_duration="20s")], check_timeout_margin="5s")

    async def main() -> None:
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(31)
        assert sched.stats().stuck == 1
        await asyncio.sleep(9)
        assert sched.stats().stuck == 0
        await sched.stop()
        await task

    with caplog.at_level(logging.ERROR, logger="probes.scheduler"):
        run_virtual(main())
    assert fake.reports[0][0] == 25.0  # reported at the deadline, not when the runner ended
    assert fake.calls[0].end == 37.0
    assert fake.calls[1].start == 37.0  # the confirmation waited for the slot
    assert fake.overlaps == 0
    assert "still running" in caplog.text


def test_a_runner_bug_is_a_failed_result(caplog: pytest.LogCaptureFixture) -> None:
    async def buggy(tid: str, kind: str, n: int) -> CheckOutcome:
        raise ZeroDivisionError("oops")

    fake = Fake(buggy)
    sched = make(fake, [target(invite="30s")], confirm_failures=False)
    with caplog.at_level(logging.ERROR, logger="probes.scheduler"):
        run_virtual(run_for(sched, 5))
    ((_, report),) = fake.reports
    assert report.outcome.outcome == "fail" and report.outcome.reason == "internal_error"
    assert "ZeroDivisionError" in caplog.text
    assert sched.stats().internal_errors_total == 1


def test_a_failing_sink_is_counted_and_the_schedule_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake()
    calls = []

    async def sink(report: CheckReport) -> None:
        calls.append(report)
        raise OSError("disk full")

    sched = Scheduler(targets=[target(invite="10s")], settings=settings(), runner=fake.run, sink=sink)
    with caplog.at_level(logging.ERROR, logger="probes.scheduler"):
        run_virtual(run_for(sched, 25))
    assert len(calls) == 3
    stats = sched.stats()
    assert stats.sink_errors_total == 3
    assert stats.checks_total == {("t1", "invite", "pass"): 3}


# ---------------------------------------------------------------- requests, reload, stop


def test_requests_run_when_spacing_allows_and_carry_their_id() -> None:
    fake = Fake()
    sched = make(
        fake, [target("t1", invite="100s", options="100s", spacing="2s"), target("t2", invite="100s")]
    )

    async def main() -> None:
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(10)
        assert sched.request("t1", "invite", "r1") is None
        assert sched.request("t1", "invite", "r2") is None
        assert sched.request("t1", "invite", "r2") == "duplicate"
        assert sched.request("t1", "options", None) is None
        assert sched.request("nope", "invite", "r3") == "unknown_target"
        assert sched.request("t2", "options", "r4") == "check_disabled"
        for i in range(6):
            assert sched.request("t2", "invite", f"q{i}") is None
        assert sched.request("t2", "invite", "q6") is None
        assert sched.request("t2", "invite", "q7") is None
        assert sched.request("t2", "invite", "q8") == "queue_full"
        await asyncio.sleep(30)
        await sched.stop()
        await task
        assert sched.request("t1", "invite", "late") == "stopping"

    run_virtual(main())
    t1 = [(c.start, c.kind) for c in fake.calls if c.target == "t1"]
    # at start: invite 0, options 2; requests at 10, served in arrival order two
    # seconds apart: r1 at 10, r2 at 12, then the options request at 14
    assert t1 == [(0.0, "invite"), (2.0, "options"), (10.0, "invite"), (12.0, "invite"), (14.0, "options")]
    ids = [(r.target.id, r.request_id) for _, r in fake.reports if r.request_id]
    assert ("t1", "r1") in ids and ("t1", "r2") in ids
    assert [i for t, i in ids if t == "t2"] == [f"q{i}" for i in range(8)]


def test_replace_config_swaps_without_losing_work() -> None:
    async def slow(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(4.0)
        return outcome(kind)

    fake = Fake(slow)
    old = [target("keep", invite="10s"), target("gone", invite="10s")]
    sched = make(fake, old)

    async def main() -> None:
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(1)  # both in flight
        sched.replace_config(
            [target("keep", invite="20s", spacing="3s"), target("new", invite=None, options="5s")]
        )
        assert sched.request("gone", "invite", "x") == "unknown_target"
        await asyncio.sleep(40)
        await sched.stop()
        await task

    run_virtual(main())
    gone = [r for _, r in fake.reports if r.target.id == "gone"]
    assert len(gone) == 1 and gone[0].outcome.outcome == "pass"  # the in-flight one is reported
    assert fake.starts("gone", "invite") == [0.0]
    keep = fake.starts("keep", "invite")
    assert keep[:2] == [0.0, 10.0]  # its old due time is kept (it is sooner than the new one)
    assert keep[2] == 30.0  # then the new interval
    kept_target = [r.target for _, r in fake.reports if r.target.id == "keep"][-1]
    assert kept_target.min_spacing == 3.0  # reports carry the new Target
    assert fake.starts("new", "options")[0] == 1.0


def test_stop_cancels_in_flight_checks_and_keeps_their_results() -> None:
    async def long(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(15)
        return outcome(kind)

    fake = Fake(long)
    sched = make(fake, [target("a", invite="30s"), target("b", invite="30s")])
    run_virtual(run_for(sched, 5))
    assert [c.cancelled for c in fake.calls] == [True, True]
    assert [(r.outcome.outcome, r.outcome.reason) for _, r in fake.reports] == [
        ("inconclusive", "shutdown")
    ] * 2
    assert all(t == 5.0 for t, _ in fake.reports)


def test_stop_can_wait_for_in_flight_checks() -> None:
    async def long(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(15)
        return outcome(kind, "fail", stage="media", reason="no_rtp")

    fake = Fake(long)
    sched = make(fake, [target("a", invite="30s")])
    run_virtual(run_for(sched, 5, cancel_in_flight=False))
    assert [(t, r.outcome.reason, r.confirm) for t, r in fake.reports] == [(15.0, "no_rtp", False)]
    assert len(fake.calls) == 1  # no confirmation once stopping


def test_cancelling_run_stops_like_stop() -> None:
    async def long(tid: str, kind: str, n: int) -> CheckOutcome:
        await asyncio.sleep(15)
        return outcome(kind)

    fake = Fake(long)
    sched = make(fake, [target("a", invite="30s")])

    async def main() -> None:
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_virtual(main())
    assert [r.outcome.reason for _, r in fake.reports] == ["shutdown"]
