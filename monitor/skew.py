"""Time as the monitor judges it: each probe's clock skew, and each result's judged time.

A probe stamps ``finished_at`` with its own clock; the monitor stamps ``received_at``
with its own. Everything that asks "how recent is this result" (freshness, staleness,
reachability, last success, the status page, the API, the evidence report) uses the
**judged time** decided once at ingest and stored with the row::

    judged_at = min(received_at, finished_at - skew)

where ``skew`` is the probe's estimated clock offset (probe clock minus monitor clock,
positive when the probe runs ahead). So a result stamped in the future is judged no
later than it arrived, and keeps that time across restarts; a slow probe's live results
are judged when they arrived, not minutes ago; an old result delivered late (an outbox
drained after a broker outage, a result replayed to fill a ``seq`` gap) is judged at its
own old time, corrected for the skew, never as fresh.

The estimate: each accepted result gives a sample ``finished_at - received_at`` =
``skew - transit delay``. Delay is never negative, so every sample is a lower bound on
the skew, and the best one is the largest: the estimate is the **maximum sample over the
results received in the last** ``WINDOW`` (5 minutes of the monitor's clock), counting
the result being judged. A probe whose results arrive live gives samples within
milliseconds of its true skew; a backlog gives lower samples and does not pull the
estimate down while live samples are in the window. When a result arrives after
nothing was received from the probe for a whole window (the broker or the monitor was
down), the last estimate is carried over as if it had just been sampled, so a backlog
drained oldest first is judged against the skew the probe had, not against its own
delays. What that costs, and what is left:

- a clock that steps back (NTP fixing a probe that ran ahead) is learned only when the
  higher samples leave the window: for up to ``WINDOW`` its results are judged older
  than they are (the safe side: never fresher than they can be); a clock that steps
  forward is learned from the next result;
- the first results ever received from a probe (no estimate yet) cannot be told apart
  from a backlog: if they were delayed, they are judged up to their delay too fresh;
- memory is bounded: per probe only the samples that can still become the maximum are
  kept (a decreasing run), at most ``MAX_SAMPLES``.

A restart rebuilds the window from the stored rows (``received_at``, ``finished_at``)
and the last estimate from the newest row's ``clock_skew``, so judging carries on
unchanged. ``ingest.max_clock_skew`` does not change any judgement: a result judged
with a skew beyond it is *marked* (status page, API, evidence report) and
``EcpmProbeClockSkew`` fires on ``ecpm_probe_clock_skew_seconds``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final

WINDOW: Final = timedelta(minutes=5)
MAX_SAMPLES: Final = 1024


def judge(finished_at: datetime, received_at: datetime, skew: float | None) -> datetime:
    """The monitor-judged time of a result: its finish, corrected by the probe's skew,
    never later than it arrived (``skew`` None: not known, taken as 0)."""
    corrected = finished_at - timedelta(seconds=skew or 0.0)
    return min(received_at, corrected)


def skewed(skew: float | None, bound: float) -> bool:
    """Was a result judged with a skew beyond ``ingest.max_clock_skew``?"""
    return skew is not None and abs(skew) > bound


class SkewEstimator:
    """Per probe: the maximum of ``finished_at - received_at`` over the results received
    in the last ``window``; seconds, positive when the probe's clock runs ahead."""

    def __init__(self, *, window: timedelta = WINDOW, max_samples: int = MAX_SAMPLES) -> None:
        self.window = window
        self.max_samples = max_samples
        # per probe, (received_at, sample) with the samples strictly decreasing: the front
        # is the maximum; a sample below a later one can never be the maximum again
        self._samples: dict[str, deque[tuple[datetime, float]]] = {}
        self._last: dict[str, float] = {}  # the latest estimate, kept when the window empties

    def restore(
        self,
        samples: Iterable[tuple[str, datetime, datetime]],
        last: dict[str, float],
    ) -> None:
        """Start from stored state: (probe, finished_at, received_at) of recent rows in the
        order they were received, and each probe's last stored estimate."""
        self._last.update(last)
        for probe, finished_at, received_at in samples:
            self._add(probe, received_at, (finished_at - received_at).total_seconds())
        for probe, queue in self._samples.items():
            self._last[probe] = queue[0][1]

    def observe(self, probe: str, finished_at: datetime, received_at: datetime) -> float:
        """Take one accepted result's sample; the estimate to judge it with (this sample
        counted)."""
        queue = self._samples.setdefault(probe, deque())
        self._expire(queue, received_at)
        if not queue and probe in self._last:
            # nothing heard for a whole window: carry the skew the probe had over
            queue.append((received_at, self._last[probe]))
        self._add(probe, received_at, (finished_at - received_at).total_seconds())
        estimate = queue[0][1]
        self._last[probe] = estimate
        return estimate

    def estimate(self, probe: str, now: datetime) -> float | None:
        """The current estimate (None: nothing ever received from the probe)."""
        queue = self._samples.get(probe)
        if queue:
            self._expire(queue, now)
            if queue:
                return queue[0][1]
        return self._last.get(probe)

    def _add(self, probe: str, received_at: datetime, sample: float) -> None:
        queue = self._samples.setdefault(probe, deque())
        self._expire(queue, received_at)
        while queue and queue[-1][1] <= sample:
            queue.pop()
        queue.append((received_at, round(sample, 3)))  # times are stored to the millisecond
        while len(queue) > self.max_samples:
            queue.popleft()

    def _expire(self, queue: deque[tuple[datetime, float]], now: datetime) -> None:
        while queue and queue[0][0] < now - self.window:
            queue.popleft()
