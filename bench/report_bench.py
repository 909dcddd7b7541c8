"""How long ``ecpm report`` takes over a year of results (figures in BENCHMARKS.md).

    .venv/bin/python bench/report_bench.py                 # 365 days, one target, one probe
    .venv/bin/python bench/report_bench.py --days 30 --targets 10 --probes 3   # issue 14's figure

Builds (once; reused when the file exists) a store of signed results as the monitor
keeps them: an ``invite`` test call every 30 s per target and probe, all day, every day
(365 x 2880 = 1,051,200 rows for one target and one probe), with a scripted 15-minute outage each week
(recorded as state changes and an incident, as the monitor would) and a 10-minute
monitoring gap each month. Then runs the real command, ``ecpm report`` over the whole
year in every format, and prints the wall time and peak memory of the report alone.

Peer (``--peer``): the same aggregates as plain SQL in ``sqlite3`` on the same file: calls
and pings per target, quarter hour and outcome; each bucket's post-dial delay median and
maximum; coverage, versions and clock skew per probe and version; the gaps between
results per target (freshness and the longest silence). Twice: from the payloads (one
``json_extract`` pass into a temporary table first, as on a store from before the
report's columns) and on the report's columns. No chain check, no report written: what
the database engine itself takes to compute the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402
from monitor.store import SqliteStore  # noqa: E402
from probes.outcome import CheckOutcome, MediaStats  # noqa: E402
from probes.result import Result, format_time, new_id  # noqa: E402

START = datetime(2025, 1, 1, tzinfo=UTC)
INTERVAL = timedelta(seconds=30)
KEY = "bench-key"


def template(outcome: str) -> Result:
    passed = outcome == "pass"
    return Result.from_outcome(
        CheckOutcome(
            check="invite",
            outcome=outcome,  # type: ignore[arg-type]
            started_at=START,
            finished_at=START + timedelta(seconds=2),
            stage=None if passed else "answer",
            reason=None if passed else "service_unavailable",
            sip_status=200 if passed else 503,
            sip_reason="OK" if passed else "Service Unavailable",
            timings={"transport": 0.002, "trying": 0.02, "ringing": 0.9, "answer": 1.3, "media": 1.0},
            media=MediaStats(100, 100, 0.0, 0.4, 1.0, 4.3, True, True) if passed else None,
        ),
        probe="p1",
        seq=1,
        target="t0",
        key=KEY,
    )


def build(path: Path, days: int, targets: int, probes: int) -> None:
    store = SqliteStore(path)
    good, bad = template("pass"), template("fail")
    seq = 0
    end = START + timedelta(days=days)
    for n in range(targets):
        store.add_state_change(f"t{n}", "up", START, "bench")
    t = START
    t0 = time.monotonic()
    while t < end:
        day = (t - START).days
        week_outage = day % 7 == 3 and t.hour == 10 and 0 <= t.minute < 15
        month_gap = t.day == 15 and t.hour == 4 and t.minute < 10
        if t.hour == 10 and t.minute == 0 and t.second == 0 and day % 7 == 3:
            for n in range(targets):
                store.add_state_change(f"t{n}", "down", t + timedelta(seconds=3), "bench outage")
                store.open_incident(
                    target=f"t{n}", kind="down", at=t + timedelta(seconds=3), last_good=None,
                    first_failed=None, summary="bench outage",
                )  # fmt: skip
        if t.hour == 10 and t.minute == 15 and t.second == 0 and day % 7 == 3:
            for n in range(targets):
                store.add_state_change(f"t{n}", "up", t, "bench recovery")
                for incident in store.open_incidents():
                    store.resolve_incident(incident.id, t)
        if month_gap and t.minute == 1 and t.second == 30:
            for n in range(targets):
                store.add_state_change(f"t{n}", "unknown", t, "bench gap")
        if t.day == 15 and t.hour == 4 and t.minute == 10 and t.second == 0:
            for n in range(targets):
                store.add_state_change(f"t{n}", "up", t, "bench gap over")
        if not month_gap:
            base = bad if week_outage else good
            ms = int((t - START).total_seconds() * 1000)
            for n in range(targets):
                for p in range(probes):
                    seq += 1
                    done = t + timedelta(milliseconds=p)  # the probes call the same targets
                    result = replace(
                        base,
                        id=new_id(int(START.timestamp() * 1000) + ms),
                        probe=f"p{p + 1}",
                        seq=seq,
                        target=f"t{n}",
                        started_at=done - timedelta(seconds=2),
                        finished_at=done,
                    ).signed(KEY)
                    store.add_result(result, done)
        if t.hour == 0 and t.minute == 0 and t.second == 0:
            store.commit()
            if day % 30 == 0:
                print(f"  day {day}/{days}: {seq} rows, {time.monotonic() - t0:.0f} s", file=sys.stderr)
        t += INTERVAL
    store.commit()
    store.close()


# the peer: the figures' aggregates as one would write them by hand, over a table ``{t}``
# with the report's columns (results itself, or a copy extracted from the payloads)
PEER = (
    "SELECT target, judged_ms / 900000, check_kind, outcome, confirm, request_id IS NOT NULL,"
    " reason IS 'guard_refused', count(*) FROM {t} WHERE judged_at >= :a AND judged_at < :b"
    " GROUP BY 1, 2, 3, 4, 5, 6, 7",
    "SELECT target, k, max(pdd), avg(pdd) FILTER (WHERE i IN ((n + 1) / 2, (n + 2) / 2)) FROM ("
    " SELECT target, k, pdd, row_number() OVER w AS i, count(*) OVER w AS n FROM ("
    "  SELECT target, judged_ms / 900000 AS k, post_dial_delay AS pdd FROM {t}"
    "  WHERE judged_at >= :a AND judged_at < :b AND check_kind = 'invite' AND outcome = 'pass'"
    "  AND post_dial_delay IS NOT NULL) WINDOW w AS (PARTITION BY target, k ORDER BY pdd)) GROUP BY 1, 2",
    "SELECT target, probe, version, count(*), min(judged_at), max(judged_at), count(clock_skew),"
    " min(clock_skew), max(clock_skew), sum(abs(clock_skew) > 30) FROM {t}"
    " WHERE judged_at >= :a AND judged_at < :b GROUP BY 1, 2, 3",
    "SELECT target, max(gap), sum(gap > 90000) FROM (SELECT target, judged_ms - lag(judged_ms) OVER"
    " (PARTITION BY target ORDER BY judged_at) AS gap FROM {t} WHERE judged_at >= :a AND judged_at < :b)"
    " GROUP BY 1",
)
# a store without the report's columns has only the payloads: one pass extracts them
EXTRACT = (
    "CREATE TEMP TABLE extracted AS SELECT target, probe, judged_at,"
    " CAST(round((julianday(judged_at) - 2440587.5) * 86400000) AS INTEGER) AS judged_ms, check_kind,"
    " outcome, confirm, request_id, clock_skew, json_extract(payload, '$.reason') AS reason,"
    " json_extract(payload, '$.timings.ringing') AS post_dial_delay,"
    " json_extract(payload, '$.version') AS version FROM results WHERE judged_at >= :a AND judged_at < :b"
)


def peer(db: Path, start: str, end: str, *, payloads: bool) -> float:
    """Seconds the peer's queries take on ``db`` (read-only); ``payloads``: extract the
    fields from the payloads first, as on a store from before the report's columns."""
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    span = {"a": start, "b": end}
    started = time.monotonic()
    if payloads:
        conn.execute(EXTRACT, span)
    for sql in PEER:
        conn.execute(sql.format(t="extracted" if payloads else "results"), span).fetchall()
    took = time.monotonic() - started
    conn.close()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--targets", type=int, default=1)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--db", type=Path, default=None, help="store to build or reuse")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ecpm-report-bench"))
    parser.add_argument("--peer", action="store_true", help="also time the plain-SQL peer, after")
    args = parser.parse_args()
    db = args.db or Path(f"/tmp/ecpm-bench-{args.days}d-{args.targets}t-{args.probes}p.db")
    if not db.exists():
        print(f"building {db} ...", file=sys.stderr)
        started = time.monotonic()
        build(db, args.days, args.targets, args.probes)
        print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    rows = SqliteStore(db).check_chain().rows  # a read-write open: brings the schema up to date
    end = (START + timedelta(days=args.days)).date().isoformat()
    code = (
        "import argparse, sys, monitor.report_command as m\n"
        "p = argparse.ArgumentParser(); m.add_arguments(p)\n"
        "raise SystemExit(m.run(p.parse_args(sys.argv[1:])))\n"
    )
    command = [sys.executable, "-c", code, "--from", START.date().isoformat(), "--to", end]
    command += ["--format", "html,json,csv", "--out", str(args.out), "--db", str(db)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=os.environ)
    took = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    sizes = {p.name: p.stat().st_size for p in args.out.iterdir()}
    print(
        f"ecpm report: {args.days} days, {args.targets} target(s), {rows} results: {took:.1f} s,"
        f" peak RSS {peak:.0f} MiB; report.html {sizes['report.html'] / 1e6:.1f} MB,"
        f" report.json {sizes['report.json'] / 1e6:.1f} MB, buckets.csv {sizes['buckets.csv'] / 1e6:.1f} MB"
    )
    figures = {"report_s": took, "peak_mib": peak, "results": rows}
    if args.peer:
        span = format_time(START), format_time(START + timedelta(days=args.days))
        for payloads, name in ((True, "from the payloads"), (False, "on the report's columns")):
            took_peer = peer(db, *span, payloads=payloads)
            figures["peer_payloads_s" if payloads else "peer_columns_s"] = took_peer
            print(
                f"peer, plain SQL in sqlite3 {name}: {took_peer:.1f} s; ecpm / peer {took / took_peer:.2f}x"
            )
    emit("report_bench", **figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
