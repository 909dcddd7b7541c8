"""When each check runs: intervals with jitter, spacing, concurrency, confirmation, backoff.

The scheduler knows nothing of SIP, nor which check kinds exist: it schedules whatever a
target's ``checks:`` enables (``Checks.enabled()``, each with its ``interval`` and
``time_limit``). It calls an injected runner
``async def run(target, kind) -> CheckOutcome`` and hands every outcome, as a
``CheckReport``, to an injected async sink (the agent stores it in the outbox).

Rules, in the order they are applied when deciding what may start now:

- A (target, kind) never has two checks in flight ("one slot per kind").
- Per target, two starts (of any kind) are at least ``Target.min_spacing`` apart.
- At most ``ScheduleSettings.max_concurrent_checks`` checks run at once.
- Priority among what is ready: on-demand requests, then confirmations, then
  scheduled checks by due time.

Timing
    Each kind has its own interval. The next scheduled start is the actual start
    plus ``interval × (1 + U(-jitter, +jitter))``, so probes started together drift
    apart instead of calling a test endpoint in lock-step. With
    ``first_check_at_start`` the first check is due at ``U(0, jitter) × interval``
    after start (immediately when jitter is 0); otherwise after one jittered
    interval. A check that overruns its interval is not stacked: the next one
    starts when it has finished (and spacing allows), without catch-up bursts.

Hard timeout
    A check gets its own limit (its settings' ``time_limit``: ``InviteCheck.max_duration``,
    ``OptionsCheck.timeout``) plus ``check_timeout_margin``. At that deadline the
    runner is cancelled (it hangs up) and a ``fail`` outcome with reason
    ``hard_timeout`` (stage null) is reported at once. The slot stays taken until
    the runner has really finished (no overlapping calls, even then); a runner
    still not finished after another margin is logged at ERROR and counted as stuck.

Early verdict
    A runner whose verdict is final before it returns hands it over with
    ``verdict_ready(outcome)`` (the invite check does, before it plays its
    announcement to a far end that is not a test endpoint): the report goes at once,
    and the slot stays taken until the runner has ended (the call is hung up), within
    the same hard timeout. What the runner returns afterwards is not reported again.

Confirmation
    After a ``fail`` (including ``hard_timeout``), when ``confirm_failures`` is on,
    one immediate check of the same kind follows, subject to spacing and the
    concurrency limit, reported with ``confirm=True``. A confirmation is never
    itself confirmed. It starts when the failed check's slot is free, so never while
    that call is still up.

Backoff
    An ``inconclusive`` outcome with SIP status 486 (the NENA test-call service is
    over its limit) holds that (target, kind)'s *scheduled* checks back for
    ``backoff_after_busy``. On-demand requests are still honoured (an operator
    asked for exactly one call).

Errors are values
    A runner that raises is a bug: it is logged with its traceback and reported as
    ``fail`` with reason ``internal_error``. A check cancelled by ``stop()`` is
    reported as ``inconclusive`` with reason ``shutdown`` (unless the runner returns
    an outcome of its own). A sink that raises is logged and counted; the
    scheduler carries on.

Reload
    ``replace_config(targets)`` swaps the schedule: kept (target, kind) pairs keep
    their timing and state and see the new ``Target``; new ones are scheduled as at
    start; removed ones lose their queued requests and confirmations, but a check in
    flight finishes and is reported.

Time is the event loop's clock (``loop.time()``), so tests drive the scheduler
with a virtual-time loop (tests/test_scheduler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

from probes.config import CheckSettings, ScheduleSettings, Target
from probes.outcome import CheckOutcome

logger = logging.getLogger(__name__)

# The reasons the scheduler itself reports around a check (docs/checks.md), besides those
# of the check kinds (probes.check_kinds)
SCHEDULER_REASONS: Final = ("hard_timeout", "internal_error", "shutdown")
BUSY_STATUS: Final = 486  # NENA i3 test-call service: over its test-call limit
MAX_QUEUED_REQUESTS: Final = 8  # per (target, kind)

CheckRunner = Callable[[Target, str], Awaitable[CheckOutcome]]
# set in each runner's own task by the scheduler; unset elsewhere (``ecpm call``, tests)
_EARLY: Final[contextvars.ContextVar[Callable[[CheckOutcome], None]]] = contextvars.ContextVar("ecpm_early")


def verdict_ready(outcome: CheckOutcome) -> None:
    """A runner's verdict is final: report it now, although the runner goes on (module
    docstring, *Early verdict*). Outside the scheduler it does nothing."""
    deliver = _EARLY.get(None)
    if deliver is not None:
        deliver(outcome)


def relay_verdicts(deliver: Callable[[CheckOutcome], None]) -> None:
    """Make :func:`verdict_ready` in the current task call ``deliver``: what the scheduler
    does in each runner's task, and a SIP worker in each check's (it relays the verdict to
    the agent, whose runner task hands it to the scheduler)."""
    _EARLY.set(deliver)


RequestRefusal = Literal["unknown_target", "check_disabled", "duplicate", "queue_full", "stopping"]


@dataclass(frozen=True, slots=True)
class CheckReport:
    """One finished check, as handed to the sink."""

    target: Target
    kind: str
    outcome: CheckOutcome
    confirm: bool
    request_id: str | None


ReportSink = Callable[[CheckReport], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    in_flight: int
    stuck: int  # checks still running past hard timeout + margin
    hard_timeouts_total: int
    sink_errors_total: int
    internal_errors_total: int
    checks_total: Mapping[tuple[str, str, str], int]  # (target, check, outcome) -> count
    configured: tuple[tuple[str, str], ...]  # (target, check) pairs scheduled now


def _settings(target: Target, kind: str) -> CheckSettings:
    settings = target.checks.enabled().get(kind)
    if settings is None:
        raise KeyError(f"target {target.id} has no {kind} check")
    return settings


def check_limit(target: Target, kind: str) -> float:
    """The check's own maximum duration in seconds (without the margin)."""
    return _settings(target, kind).time_limit


def check_interval(target: Target, kind: str) -> float:
    return _settings(target, kind).interval


def enabled_kinds(target: Target) -> list[str]:
    return list(target.checks.enabled())


@dataclass(slots=True)
class _Slot:
    target: Target
    kind: str
    next_due: float
    backoff_until: float = -math.inf
    confirm_pending: bool = False
    confirm_since: float = 0.0
    requests: deque[tuple[str | None, float]] = field(default_factory=deque)  # (id, queued at)
    busy: bool = False
    removed: bool = False
    runner_task: asyncio.Task[CheckOutcome] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.target.id, self.kind)


class Scheduler:
    """Runs checks for a set of targets until ``stop()``; see the module docstring."""

    def __init__(
        self,
        *,
        targets: Sequence[Target],
        settings: ScheduleSettings,
        runner: CheckRunner,
        sink: ReportSink,
        rng: random.Random | None = None,
    ) -> None:
        self._targets = list(targets)
        self._settings = settings
        self._runner = runner
        self._sink = sink
        self._rng = rng if rng is not None else random.Random()
        self._slots: dict[tuple[str, str], _Slot] | None = None
        self._last_start: dict[str, float] = {}
        self._running = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._started = False
        self._finished: asyncio.Event | None = None
        self._stats_lock = threading.Lock()  # stats() may be called from the metrics thread
        self._checks_total: dict[tuple[str, str, str], int] = {}
        self._hard_timeouts = 0
        self._sink_errors = 0
        self._internal_errors = 0
        self._stuck = 0
        self._cancel_on_stop = True
        self._stop_grace: float | None = None

    # ------------------------------------------------------------ public API

    async def run(self) -> None:
        """Dispatch checks until ``stop()`` (or cancellation, which stops as ``stop()``)."""
        if self._started:
            raise RuntimeError("Scheduler.run() may be called once")
        self._started = True
        loop = asyncio.get_running_loop()
        self._ensure_slots(loop.time())
        wake = self._event()
        self._finished = asyncio.Event()
        try:
            while not self._stopping:
                wake.clear()
                wake_at = self._dispatch(loop.time())
                timeout = None if wake_at is None else max(0.0, wake_at - loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await wake.wait()
            await self._wind_down(cancel=self._cancel_on_stop, grace=self._stop_grace)
        except asyncio.CancelledError:
            self._stopping = True
            await self._wind_down(cancel=True, grace=self._settings.check_timeout_margin)
            raise
        finally:
            self._finished.set()

    async def stop(self, *, cancel_in_flight: bool = True, grace: float | None = None) -> None:
        """Stop dispatching; cancel (default) or await checks in flight; return when done.

        Cancelled checks are still reported (``inconclusive``/``shutdown`` unless the
        runner returns its own outcome). ``grace`` bounds the wait for checks in
        flight (default: the longest hard timeout plus twice the margin).
        """
        self._cancel_on_stop = cancel_in_flight
        self._stop_grace = grace
        self._stopping = True
        if not self._started:
            return
        self._event().set()
        assert self._finished is not None
        await self._finished.wait()

    def request(self, target_id: str, kind: str, request_id: str | None = None) -> RequestRefusal | None:
        """Queue an on-demand check; None when accepted, else the refusal reason.

        It runs as soon as spacing and the concurrency limit allow, after any check of
        the same kind already in flight, and its report carries ``request_id``.
        """
        if self._stopping:
            return "stopping"
        slots = self._ensure_slots(asyncio.get_running_loop().time())
        slot = slots.get((target_id, kind))
        if slot is None or slot.removed:
            if any(t.id == target_id for t in self._targets):
                return "check_disabled"
            return "unknown_target"
        if request_id is not None and any(rid == request_id for rid, _ in slot.requests):
            return "duplicate"
        if len(slot.requests) >= MAX_QUEUED_REQUESTS:
            return "queue_full"
        slot.requests.append((request_id, asyncio.get_running_loop().time()))
        logger.info("on-demand %s check of %s queued (request %s)", kind, target_id, request_id)
        self._event().set()
        return None

    def replace_config(self, targets: Sequence[Target], settings: ScheduleSettings | None = None) -> None:
        """Swap the targets (and optionally the settings); the caller has validated them."""
        self._targets = list(targets)
        if settings is not None:
            self._settings = settings
        if self._slots is None:
            return
        now = asyncio.get_running_loop().time()
        wanted = {(t.id, k): t for t in self._targets for k in enabled_kinds(t)}
        for key, slot in list(self._slots.items()):
            if key in wanted:
                old_interval = check_interval(slot.target, slot.kind)
                slot.target = wanted[key]
                slot.removed = False
                new_interval = check_interval(slot.target, slot.kind)
                if new_interval != old_interval:
                    slot.next_due = min(slot.next_due, now + self._jittered(new_interval))
                continue
            if slot.requests or slot.confirm_pending:
                logger.warning(
                    "%s check of %s removed by reload: %d queued request(s)%s dropped",
                    slot.kind,
                    slot.target.id,
                    len(slot.requests),
                    " and a confirmation" if slot.confirm_pending else "",
                )
            slot.requests.clear()
            slot.confirm_pending = False
            if slot.busy:
                slot.removed = True  # deleted when the check in flight has been reported
            else:
                del self._slots[key]
        for key, target in wanted.items():
            if key not in self._slots:
                self._slots[key] = self._new_slot(target, key[1], now)
        live = {t.id for t in self._targets}
        self._last_start = {
            tid: t for tid, t in self._last_start.items() if tid in live or self._busy_target(tid)
        }
        self._event().set()

    def stats(self) -> SchedulerStats:
        with self._stats_lock:
            return SchedulerStats(
                in_flight=self._running,
                stuck=self._stuck,
                hard_timeouts_total=self._hard_timeouts,
                sink_errors_total=self._sink_errors,
                internal_errors_total=self._internal_errors,
                checks_total=dict(self._checks_total),
                configured=tuple((t.id, k) for t in self._targets for k in enabled_kinds(t)),
            )

    # ------------------------------------------------------------ internals

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def _jittered(self, interval: float) -> float:
        j = self._settings.jitter
        return interval * (1.0 + self._rng.uniform(-j, j))

    def _new_slot(self, target: Target, kind: str, now: float) -> _Slot:
        interval = check_interval(target, kind)
        if self._settings.first_check_at_start:
            due = now + interval * self._rng.uniform(0.0, self._settings.jitter)
        else:
            due = now + self._jittered(interval)
        return _Slot(target=target, kind=kind, next_due=due)

    def _ensure_slots(self, now: float) -> dict[tuple[str, str], _Slot]:
        if self._slots is None:
            self._slots = {
                (t.id, k): self._new_slot(t, k, now) for t in self._targets for k in enabled_kinds(t)
            }
        return self._slots

    def _busy_target(self, target_id: str) -> bool:
        return any(s.busy and s.target.id == target_id for s in (self._slots or {}).values())

    def _dispatch(self, now: float) -> float | None:
        """Start everything that may start now; return when to look again (None: on events)."""
        assert self._slots is not None
        candidates: list[tuple[int, float, _Slot]] = []
        for slot in self._slots.values():
            if slot.busy or slot.removed:
                continue
            if slot.requests:
                candidates.append((0, slot.requests[0][1], slot))  # first come, first served
            elif slot.confirm_pending:
                candidates.append((1, slot.confirm_since, slot))
            else:
                candidates.append((2, max(slot.next_due, slot.backoff_until), slot))
        candidates.sort(key=lambda c: (c[0], c[1]))
        wake_at: float | None = None
        for _priority, ready_at, slot in candidates:
            target = slot.target
            spaced = self._last_start.get(target.id, -math.inf) + target.min_spacing
            ready = max(ready_at, spaced)
            if ready <= now + 1e-9:
                if self._running >= self._settings.max_concurrent_checks:
                    continue  # a finishing check wakes the dispatcher
                self._start(slot, now)
            else:
                wake_at = ready if wake_at is None else min(wake_at, ready)
        return wake_at

    def _start(self, slot: _Slot, now: float) -> None:
        if slot.requests:
            confirm, request_id = False, slot.requests.popleft()[0]
        elif slot.confirm_pending:
            confirm, request_id = True, None
            slot.confirm_pending = False
        else:
            confirm, request_id = False, None
            slot.next_due = now + self._jittered(check_interval(slot.target, slot.kind))
        slot.busy = True
        self._running += 1
        self._last_start[slot.target.id] = now
        job = asyncio.create_task(
            self._job(slot, slot.target, slot.kind, confirm, request_id),
            name=f"ecpm-check-{slot.target.id}-{slot.kind}",
        )
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _call_runner(
        self, target: Target, kind: str, early: asyncio.Future[CheckOutcome]
    ) -> CheckOutcome:
        _EARLY.set(lambda outcome: None if early.done() else early.set_result(outcome))  # this task only
        return await self._runner(target, kind)

    async def _job(
        self, slot: _Slot, target: Target, kind: str, confirm: bool, request_id: str | None
    ) -> None:
        loop = asyncio.get_running_loop()
        started_at = datetime.now(UTC)
        margin = self._settings.check_timeout_margin
        hard = check_limit(target, kind) + margin
        deadline = loop.time() + hard
        early: asyncio.Future[CheckOutcome] = loop.create_future()
        task = asyncio.create_task(self._call_runner(target, kind, early))
        slot.runner_task = task
        try:
            done, _ = await asyncio.wait({task, early}, timeout=hard, return_when=asyncio.FIRST_COMPLETED)
            reported_early = early in done
            if reported_early:
                outcome = early.result()
            elif task in done:
                outcome = self._outcome_of(task, target, kind, started_at)
            else:
                task.cancel()
                with self._stats_lock:
                    self._hard_timeouts += 1
                logger.warning(
                    "%s check of %s exceeded its hard timeout (%.1f s): reported as failed",
                    kind,
                    target.id,
                    hard,
                )
                outcome = CheckOutcome(
                    check=kind,
                    outcome="fail",
                    started_at=started_at,
                    finished_at=datetime.now(UTC),
                    reason="hard_timeout",
                )
            self._after(slot, outcome, confirm, loop.time())
            await self._emit(CheckReport(target, kind, outcome, confirm, request_id))
            if reported_early:
                await self._after_verdict(task, target, kind, deadline - loop.time())
            if not task.done():
                await self._await_cleanup(task, target, kind, margin)
        finally:
            if not task.done():  # only when this job itself was cancelled
                task.cancel()
            slot.busy = False
            slot.runner_task = None
            self._running -= 1
            if slot.removed and self._slots is not None and self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            self._event().set()

    async def _after_verdict(
        self, task: asyncio.Task[CheckOutcome], target: Target, kind: str, left: float
    ) -> None:
        """A runner that reported early finishes within its hard timeout, or is cancelled."""
        done, _ = await asyncio.wait({task}, timeout=max(0.0, left))
        if not done:
            logger.warning("%s check of %s overran its hard timeout after its verdict", kind, target.id)
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            logger.error(
                "%s check of %s raised after its verdict (a bug in ecpm)",
                kind,
                target.id,
                exc_info=task.exception(),
            )

    async def _await_cleanup(
        self, task: asyncio.Task[CheckOutcome], target: Target, kind: str, margin: float
    ) -> None:
        """Wait for a cancelled runner to hang up; the slot stays taken meanwhile."""
        done, _ = await asyncio.wait({task}, timeout=margin)
        if not done:
            with self._stats_lock:
                self._stuck += 1
            logger.error(
                "%s check of %s still running %.1f s after it was cancelled;"
                " its slot stays taken until it ends (no overlapping calls)",
                kind,
                target.id,
                margin,
            )
            try:
                await asyncio.wait({task})
            finally:
                with self._stats_lock:
                    self._stuck -= 1
        _consume(task)

    def _outcome_of(
        self, task: asyncio.Task[CheckOutcome], target: Target, kind: str, started_at: datetime
    ) -> CheckOutcome:
        if task.cancelled():
            return CheckOutcome(
                check=kind,
                outcome="inconclusive",
                started_at=started_at,
                finished_at=datetime.now(UTC),
                reason="shutdown",
            )
        exc = task.exception()
        if exc is None and isinstance(task.result(), CheckOutcome):
            return task.result()
        if exc is not None:
            logger.error("%s check of %s raised (a bug in ecpm)", kind, target.id, exc_info=exc)
        else:
            logger.error("%s check of %s returned %r, not a CheckOutcome", kind, target.id, task.result())
        with self._stats_lock:
            self._internal_errors += 1
        return CheckOutcome(
            check=kind,
            outcome="fail",
            started_at=started_at,
            finished_at=datetime.now(UTC),
            reason="internal_error",
        )

    def _after(self, slot: _Slot, outcome: CheckOutcome, confirm: bool, now: float) -> None:
        if outcome.outcome == "inconclusive" and outcome.sip_status == BUSY_STATUS:
            pause = self._settings.backoff_after_busy
            slot.backoff_until = now + pause
            logger.warning(
                "%s check of %s: test-call service busy (486); backing off %.0f s",
                slot.kind,
                slot.target.id,
                pause,
            )
        if (
            outcome.outcome == "fail"
            and not confirm
            and self._settings.confirm_failures
            and not slot.removed
            and not self._stopping
        ):
            slot.confirm_pending = True
            slot.confirm_since = now

    async def _emit(self, report: CheckReport) -> None:
        key = (report.target.id, report.kind, report.outcome.outcome)
        with self._stats_lock:
            self._checks_total[key] = self._checks_total.get(key, 0) + 1
        try:
            await self._sink(report)
        except Exception:
            with self._stats_lock:
                self._sink_errors += 1
            logger.exception("could not hand over the %s result of %s", report.kind, report.target.id)

    async def _wind_down(self, *, cancel: bool, grace: float | None) -> None:
        if self._slots is not None:
            for slot in self._slots.values():
                slot.requests.clear()
                slot.confirm_pending = False
                if cancel and slot.runner_task is not None:
                    slot.runner_task.cancel()
        if not self._jobs:
            return
        if grace is None:
            longest = max(
                (check_limit(s.target, s.kind) for s in (self._slots or {}).values()),
                default=0.0,
            )
            grace = longest + 2 * self._settings.check_timeout_margin
        _, pending = await asyncio.wait(set(self._jobs), timeout=grace)
        if pending:
            logger.error("%d check(s) did not finish within %.1f s of stop", len(pending), grace)


def _consume(task: asyncio.Task[CheckOutcome]) -> None:
    """Retrieve a finished runner's exception so asyncio does not warn about it."""
    if task.done() and not task.cancelled():
        exc = task.exception()
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            logger.debug("runner finished after its hard timeout with %r", exc)
