"""The monitor's ingest path without MQTT: CPU per result from payload to commit.

    .venv/bin/python bench/ingest_core.py [--n 10000] [--batch 200] [--url postgresql://...] [--profile]

A ``MonitorCore`` on a fresh SQLite file (or the PostgreSQL database ``--url`` names)
takes N signed results (tests.support.monitor.ProbeSim) in batches of ``--batch``:
``handle_batch`` (every check of ``monitor.ingest``, signature, store, metrics), one
``commit()`` and one ``evaluate()`` per batch, as ``monitor.service`` does. Printed: the
process CPU µs per result and results/s of wall time. ``--profile`` adds cProfile's top
functions. It measures what the monitor's own code costs; ``bench/ingest.py`` and
``bench/replicas.py`` measure it with the broker in the loop.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.core import MonitorCore  # noqa: E402
from monitor.store import open_store  # noqa: E402
from tests.support.monitor import ProbeSim, monitor_config  # noqa: E402


def main(n: int, batch: int, url: str | None, profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        config = monitor_config(url or Path(tmp))
        store = open_store(config.store.where)
        core = MonitorCore(config, store, CollectorRegistry())
        sim = ProbeSim("p1")
        now = datetime.now(UTC)
        messages = [(sim.topic("t1"), sim.result("t1", "pass", now).to_json()) for _ in range(n)]

        # a tree from before batched ingest (to compare) handles them one by one
        each = getattr(core, "handle_batch", None) or (lambda ms: [core.handle(t, p) for t, p in ms])

        def run() -> None:
            for i in range(0, n, batch):
                each(messages[i : i + batch])
                store.commit()
                core.evaluate()

        profiler = cProfile.Profile() if profile else None
        cpu, wall = time.process_time(), time.monotonic()
        if profiler is not None:
            profiler.runcall(run)
        else:
            run()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        stored = store.last_row()
        store.close()
    where = "PostgreSQL" if url else "SQLite"
    print(f"ingest core: {n} results ({len(messages[0][1])} B), batches of {batch}, {where}; {stored} stored")
    print(f"CPU µs per result: {cpu / n * 1e6:.1f}   results/s (wall): {n / wall:.0f}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="results")
    parser.add_argument("--batch", type=int, default=200, help="results per batch (one commit each)")
    parser.add_argument("--url", default=None, help="an empty PostgreSQL database to store in")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()
    main(args.n, args.batch, args.url, args.profile)
