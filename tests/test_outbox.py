"""The durable outbox: seq never reused (restart, kill -9), nothing dropped silently."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
from probes.result import Result, parse_result, verify

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
        assert await box.ack([rows[0].id, rows[2].id, "no-such-id"]) == 2
        assert [p.seq for p in await box.pending(10)] == [2, 4, 5]
        assert box.oldest_age(now=1011.0) == 9.0  # seq 2 is now the oldest
        assert await box.ack([]) == 0
        assert await box.ack(p.id for p in await box.pending(10)) == 3
        assert box.depth() == 0 and box.oldest_age() is None
        nxt = await box.add(maker())
        assert nxt.seq == 6

    asyncio.run(main())
    stats = box.stats()
    assert (stats.added_total, stats.acked_total, stats.last_seq) == (6, 5, 6)
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        asyncio.run(box.pending())


def test_reopen_keeps_pending_and_continues_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_results=100)
    first = asyncio.run(_add_n(box, 3))
    asyncio.run(box.ack([first[0].id]))
    box.close()

    box = Outbox(path, max_results=100)
    assert box.depth() == 2 and box.stats().last_seq == 3
    assert [p.id for p in asyncio.run(box.pending())] == [r.id for r in first[1:]]
    more = asyncio.run(_add_n(box, 2))
    assert [r.seq for r in more] == [4, 5]
    box.close()


async def _add_n(box: Outbox, n: int) -> list[Result]:
    return [await box.add(maker()) for _ in range(n)]


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
