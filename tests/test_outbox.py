"""The durable outbox: seq never reused (restart, kill -9), nothing dropped silently."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from probes.outbox import Outbox, OutboxError
from probes.outcome import CheckOutcome
from probes.result import Result, parse_result
from probes.result import verify_signature as verify

ROOT = Path(__file__).resolve().parent.parent
KEY = b"k"
T0 = datetime(2024, 5, 1, tzinfo=UTC)
OUTCOME = CheckOutcome(check="options", outcome="pass", started_at=T0, finished_at=T0)


def maker(target: str = "t1", **kw: object) -> Callable[[int], Result]:
    def make(seq: int) -> Result:
        return Result.from_outcome(OUTCOME, probe="p1", seq=seq, target=target, key=KEY, **kw)  # type: ignore[arg-type]

    return make


def test_seq_pending_ack_depth(tmp_path: Path) -> None:
    clock = [1000.0]
    box = Outbox(tmp_path / "o.db", max_results=100, clock=lambda: clock[0])
    seen: list[int] = []
    box.add_listener(lambda: seen.append(1))

    async def main() -> None:
        added = []
        for i in range(5):
            clock[0] += 1
            added.append(await box.add(maker(f"t{i}")))
        assert [r.seq for r in added] == [1, 2, 3, 4, 5]
        assert box.depth() == 5 and len(seen) == 5
        assert box.oldest_age(now=1011.0) == 10.0
        rows = await box.pending(3)
        assert [p.seq for p in rows] == [1, 2, 3]
        assert [p.target for p in rows] == ["t0", "t1", "t2"]
        back = parse_result(rows[0].payload)
        assert back == added[0] and verify(back, KEY)
        assert [p.seq for p in await box.pending(10, after_seq=3)] == [4, 5]
        assert await box.mark_published([rows[0].id, rows[2].id, "no-such-id"]) == 2
        assert [p.seq for p in await box.pending(10)] == [2, 4, 5]
        assert box.oldest_age(now=1011.0) == 9.0  # seq 2 is now the oldest unpublished
        assert await box.mark_published([]) == 0
        assert await box.mark_published(p.id for p in await box.pending(10)) == 3
        assert box.depth() == 0 and box.oldest_age() is None
        assert box.stats().unconfirmed == 5  # published, kept until the monitor confirms
        nxt = await box.add(maker())
        assert nxt.seq == 6

    asyncio.run(main())
    stats = box.stats()
    assert (stats.added_total, stats.acked_total, stats.last_seq) == (6, 5, 6)
    assert (stats.depth, stats.unconfirmed, stats.confirmed_seq) == (1, 5, 0)
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        asyncio.run(box.pending())


def test_reopen_keeps_pending_and_continues_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_results=100)
    first = asyncio.run(_add_n(box, 3))
    asyncio.run(box.mark_published([first[0].id]))
    box.close()

    box = Outbox(path, max_results=100)
    assert box.depth() == 2 and box.stats().last_seq == 3 and box.stats().unconfirmed == 1
    assert [p.id for p in asyncio.run(box.pending())] == [r.id for r in first[1:]]
    more = asyncio.run(_add_n(box, 2))
    assert [r.seq for r in more] == [4, 5]
    box.close()


async def _add_n(box: Outbox, n: int) -> list[Result]:
    return [await box.add(maker()) for _ in range(n)]


def test_results_leave_only_when_the_monitor_confirms(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_results=100)

    async def main() -> None:
        added = await _add_n(box, 6)
        await box.mark_published(r.id for r in added)
        assert await box.confirm(3) == 3  # the monitor stored 1..3
        assert box.stats().unconfirmed == 3 and box.stats().confirmed_seq == 3
        assert await box.confirm(2) == 0  # an older ack confirms nothing more
        assert await box.confirm(10**6) == 3  # beyond what was handed out: up to last_seq only
        assert box.stats().confirmed_seq == 6
        more = await _add_n(box, 1)
        assert more[0].seq == 7 and box.depth() == 1  # a new result is never confirmed early

    asyncio.run(main())
    box.close()
    box = Outbox(path, max_results=100)
    assert box.stats().confirmed_seq == 6 and box.depth() == 1  # kept across a restart
    box.close()


def test_reopen_sends_kept_results_again_unchanged_and_names_what_is_gone(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)
    notified: list[int] = []

    async def main() -> None:
        added = await _add_n(box, 10)
        await box.mark_published(r.id for r in added)
        await box.confirm(2)  # 1..2 deleted: confirmed
        box.add_listener(lambda: notified.append(1))
        assert await box.pending(100) == []
        again = await box.reopen(1, 8)
        assert again.again == 6 and again.gone == ((1, 2),)
        rows = await box.pending(100)
        assert [p.seq for p in rows] == [3, 4, 5, 6, 7, 8]
        assert [p.payload for p in rows] == [r.to_json() for r in added[2:8]]  # same id, same signature
        assert notified  # the publisher is woken
        # numbers not handed out yet are not gone; a range entirely beyond: nothing
        assert (await box.reopen(9, 50)).gone == () and (await box.reopen(60, 70)).gone == ()

    asyncio.run(main())
    box.close()


def test_a_lost_result_is_gone_in_a_replay(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        await _add_n(box, 2)

        def broken(seq: int) -> Result:
            raise OSError(28, "No space left on device")

        with pytest.raises(OutboxError):
            await box.add(broken)
        assert box.stats().error == "disk_full" and box.stats().lost_total == 1
        nxt = await box.add(maker())
        assert nxt.seq == 4 and box.stats().error is None  # 3 skipped: the monitor sees a gap
        assert (await box.reopen(3, 3)).gone == ((3, 3),)

    asyncio.run(main())
    box.close()


def test_unconfirmed_results_are_kept_within_their_bounds_and_evictions_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    box = Outbox(
        tmp_path / "o.db", max_results=100, keep_unconfirmed=5, keep_for=60.0, clock=lambda: clock[0]
    )

    async def main() -> None:
        added = await _add_n(box, 8)
        with caplog.at_level(logging.ERROR, logger="probes.outbox"):
            await box.mark_published(r.id for r in added)
        stats = box.stats()
        assert (stats.unconfirmed, stats.evicted_total) == (5, 3)  # the oldest three went
        assert "never confirmed" in caplog.text
        assert (await box.reopen(1, 8)).gone == ((1, 3),)
        await box.mark_published(p.id for p in await box.pending(100))
        clock[0] += 61  # older than keep_for
        more = await _add_n(box, 1)
        await box.mark_published([more[0].id])
        assert box.stats().unconfirmed == 1 and box.stats().evicted_total == 8

    asyncio.run(main())
    box.close()


def test_an_outbox_from_before_keeps_its_rows_as_unpublished(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, probe TEXT NOT NULL,"
        " target TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL);"
        "INSERT INTO meta VALUES ('seq', 1);"
    )
    old = maker()(1)
    db.execute("INSERT INTO outbox VALUES (1, ?, 'p1', 't1', 1.0, ?)", (old.id, old.to_json()))
    db.commit()
    db.close()
    box = Outbox(path, max_results=100)
    assert box.depth() == 1 and box.stats().confirmed_seq == 0
    assert [p.id for p in asyncio.run(box.pending())] == [old.id]
    box.close()


def test_one_process_per_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_results=100)
    code = f"from probes.outbox import Outbox; Outbox({str(path)!r}, max_results=100)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode != 0
    assert "in use by another process" in out.stderr
    box.close()


def test_not_an_outbox(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="not a usable SQLite file"):
        Outbox(bad, max_results=100)
    with pytest.raises(OutboxError, match="cannot open"):
        Outbox(tmp_path / "missing-dir" / "o.db", max_results=100)


def test_kill_9_never_reuses_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    child = textwrap.dedent(
        f"""
        import asyncio, sys
        from datetime import UTC, datetime
        from probes.outbox import Outbox
        from probes.outcome import CheckOutcome
        from probes.result import Result
        t = datetime(2024, 5, 1, tzinfo=UTC)
        o = CheckOutcome(check="options", outcome="pass", started_at=t, finished_at=t)
        box = Outbox({str(path)!r}, max_results=100)
        async def main():
            while True:
                r = await box.add(lambda s: Result.from_outcome(
                    o, probe="p1", seq=s, target="t1", key=b"k"))
                print(r.seq, flush=True)
        asyncio.run(main())
        """
    )
    for _round in range(2):
        proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        reported = [int(proc.stdout.readline()) for _ in range(30)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        box = Outbox(path, max_results=100)
        rows = asyncio.run(box.pending(100_000))
        seqs = [p.seq for p in rows]
        # every number reported as stored is there; numbers are contiguous and unique
        assert set(reported) <= set(seqs)
        assert seqs == list(range(1, len(seqs) + 1))
        assert box.stats().last_seq == seqs[-1]
        assert len({p.id for p in rows}) == len(rows)
        box.close()


def test_over_the_bound_keeps_everything_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "o.db", max_results=3)
    with caplog.at_level(logging.ERROR, logger="probes.outbox"):
        asyncio.run(_add_n(box, 6))
    assert box.depth() == 6
    assert box.stats().overflow_total == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited
    assert "over its bound of 3" in errors[0].getMessage()
    assert "nothing dropped" in errors[0].getMessage()
    box.close()


def test_a_result_that_cannot_be_stored_leaves_a_visible_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        first = await box.add(maker())
        # same id again: the INSERT fails inside SQLite, as a full disk would
        with pytest.raises(OutboxError, match="cannot store"):
            await box.add(lambda seq: replace(maker()(seq), id=first.id))
        assert box.stats().lost_total == 1
        nxt = await box.add(maker())
        assert nxt.seq == 3  # 2 is the lost one: a gap the monitor counts
        after = await box.add(maker())
        assert after.seq == 4

    with caplog.at_level(logging.ERROR, logger="probes.outbox"):
        asyncio.run(main())
    assert any("LOST" in r.getMessage() for r in caplog.records)
    box.close()


def test_a_result_that_cannot_be_built_is_counted_lost_and_leaves_a_gap(tmp_path: Path) -> None:
    # a check ran but its result could not be stored: the monitor must see a seq gap,
    # not silence (a bug in make() is still a lost result)
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        with pytest.raises(OutboxError, match="numbered 9"):
            await box.add(lambda seq: maker()(9))
        assert (await box.add(maker())).seq == 2
        assert box.stats().lost_total == 1

    asyncio.run(main())
    box.close()
