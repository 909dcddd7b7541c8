"""The monitor's half of end-to-end delivery (``probes.delivery``): acks and replay requests.

After each committed batch the service asks ``outgoing(now)`` for what to publish:

- an ``ecpm.ack/1`` per probe whose highest contiguous stored seq
  (``SeqBook.contiguous_seq``) moved since it was last sent (all of them again after a
  reconnect, ``resend_acks``): the probe then deletes what the store holds;
- an ``ecpm.replay/1`` per range still missing (``SeqBook.missing_ranges``) for a probe
  with a new gap, and again every ``REPLAY_EVERY`` while anything is outstanding and
  nothing replayed has arrived for that long (asking again while the probe is still
  sending would restart it from the first range).

What arrives in return is handled by the core: a result filling a gap (``filled``)
counts as repaired; a status naming seq ranges the probe no longer has (``status``)
makes them unrecoverable; a status announcing a higher ``last_seq`` than the store has,
with nothing left unpublished, records the tail as a gap (the probe lost or the broker
dropped its newest results and nothing newer has come to show it), and a probe whose
lowest stored seq is above the ``confirmed_seq`` it reports has a head gap (results it
published before this monitor first subscribed, which no store has confirmed).

All of it is bookkeeping in the store (``seq_gaps``, ``seq_gone``), so a restart loses
nothing: acks are sent again on connect, open gaps are asked for again.

Replicas (docs/scaling.md): every monitor on a shared store acks after its own commits
(an ack says what the store holds, whoever stored it; the probe keeps the highest), but
only the evaluating one asks for replays (``outgoing(replays=True)``): two askers would
restart each other's replay. It learns of every replica's gaps, and of the repairs other
replicas stored (progress), from the store each evaluation (``follow``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from monitor.config import MonitorConfig
from monitor.metrics import MonitorMetrics
from monitor.store import SeqBook
from probes.delivery import MAX_REPLAY, OutboxHealth, make_ack, make_replay

logger = logging.getLogger(__name__)

REPLAY_EVERY = timedelta(seconds=10)  # asking again while results are outstanding
MAX_RANGES = 16  # replay requests per probe per round
JOIN = 64  # missing ranges at most this far apart are asked for as one


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool


class Delivery:
    def __init__(self, config: MonitorConfig, store: SeqBook, metrics: MonitorMetrics) -> None:
        prefix = config.mqtt.topic_prefix
        self._acks = f"{prefix}/acks/"
        self._commands = f"{prefix}/commands/"
        self._keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
        self._store = store
        self._metrics = metrics
        self._sent_ack: dict[str, int] = {}  # last ack published per probe (this connection)
        self._replay_due: dict[str, datetime] = {}  # probe -> when to ask (again)
        self._progress: dict[str, datetime] = {}  # probe -> when a replayed result last filled a gap
        self._outstanding: dict[str, int] | None = None  # recomputed when asked after a change
        for probe in store.outstanding():
            self._replay_due[probe] = datetime.min.replace(tzinfo=UTC)

    # ------------------------------------------------------------ from ingest

    def gap(self, probe: str, after: int, nxt: int, now: datetime) -> None:
        """Record a gap in the store and ask for it at the next round."""
        self._store.record_gap(probe, after, nxt, now)
        self._metrics.missing.labels(probe).inc(nxt - after - 1)
        logger.warning("%d result(s) missing from %s: seq %d..%d", nxt - after - 1, probe, after + 1, nxt - 1)
        self._replay_due[probe] = now
        self._refresh()

    def filled(self, probe: str, seq: int, now: datetime) -> None:
        if self._store.fill_gap(probe, seq, now):
            self._metrics.repaired.labels(probe).inc()
            self._progress[probe] = now
            self._refresh()

    def status(self, probe: str, health: OutboxHealth, now: datetime) -> None:
        """A verified status: what the probe says is gone, and a tail it published unseen."""
        if health.gone:
            lost = self._store.mark_gone(probe, health.gone, now)
            if lost:
                self._metrics.unrecoverable.labels(probe).inc(lost)
                logger.error(
                    "%d missing result(s) from %s are unrecoverable (the probe no longer has them)",
                    lost,
                    probe,
                )
            self._refresh()
        last = self._store.last_seq(probe)
        confirmed = health.confirmed_seq
        first = self._store.first_seq(probe)
        if first is not None and first > confirmed + 1 and not self._store.in_gap(probe, first - 1):
            # a head nobody saw: published before this monitor first heard of the probe (no
            # subscriber yet) and never confirmed, by this store or any other
            self.gap(probe, confirmed, first, now)
        if health.unpublished == 0 and health.last_seq > (confirmed if last is None else last):
            after = confirmed if last is None else last
            self._store.set_last_seq(probe, health.last_seq)
            self.gap(probe, after, health.last_seq + 1, now)

    def _refresh(self) -> None:
        self._outstanding = None

    def follow(self, now: datetime) -> None:
        """What other monitors on the store recorded: gaps to ask for, gaps they repaired."""
        before = self._outstanding or {}
        self._outstanding = self._store.outstanding()
        for probe, missing in self._outstanding.items():
            self._replay_due.setdefault(probe, now)
            if missing < before.get(probe, missing):
                self._progress[probe] = now

    @property
    def outstanding(self) -> dict[str, int]:
        """Missing results per probe, neither repaired nor gone (read once per change: a
        replay of thousands fills as many gaps, and the snapshot asks once per batch)."""
        if self._outstanding is None:
            self._outstanding = self._store.outstanding()
        return self._outstanding

    # ------------------------------------------------------------ to the probes

    def resend_acks(self) -> None:
        """After a reconnect: the broker may have lost the retained acks."""
        self._sent_ack.clear()

    def outgoing(self, now: datetime, *, replays: bool = True) -> list[Outgoing]:
        """Acks and replay requests (unless ``replays`` is False) due now; call after the
        store committed."""
        out: list[Outgoing] = []
        for probe, key in self._keys.items():
            seq = self._store.contiguous_seq(probe)
            if seq is not None and self._sent_ack.get(probe) != seq:
                out.append(Outgoing(f"{self._acks}{probe}", make_ack(probe, seq, now, key), retain=True))
                self._sent_ack[probe] = seq
            due = self._replay_due.get(probe)
            if not replays or due is None or due > now:
                continue
            progress = self._progress.get(probe)
            if progress is not None and now - progress < REPLAY_EVERY:
                continue  # the probe is still sending what it was asked for: do not restart it
            ranges = self._store.missing_ranges(probe, MAX_RANGES, join=JOIN, span=MAX_REPLAY)
            if not ranges:
                del self._replay_due[probe]
                continue
            for first, last in ranges:  # one request names at most MAX_REPLAY seq numbers
                for start in range(first, last + 1, MAX_REPLAY):
                    end = min(last, start + MAX_REPLAY - 1)
                    payload = make_replay(probe, start, end, now, key)
                    out.append(Outgoing(f"{self._commands}{probe}", payload, False))
            logger.info("asking %s to replay %d range(s) from seq %d", probe, len(ranges), ranges[0][0])
            self._replay_due[probe] = now + REPLAY_EVERY
        return out
