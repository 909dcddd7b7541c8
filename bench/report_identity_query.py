"""What the evidence report's identity figures cost: ``SqlStore.report_window`` over every
target-day of the store ``bench/report_bench.py`` builds, with the identity stage's
reasons asked for (the added ``GROUP BY`` of failures by reason) and without; read-only,
the real store code (figures in BENCHMARKS.md, "``ecpm report``").

    .venv/bin/python bench/report_identity_query.py --db /tmp/ecpm-bench-30d-10t-3p.db
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.report import GUARD_REFUSED  # noqa: E402
from monitor.store import WindowAsk, open_store  # noqa: E402
from probes.outcome import CALL_KINDS, IDENTITY_REASONS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", type=Path, default=Path("/tmp/ecpm-bench-30d-10t-3p.db"))
    parser.add_argument("--start", default="2025-01-01", help="first UTC day of the store")
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store = open_store(args.db, read_only=True)
    try:
        targets = [f"t{i}" for i in range(args.targets)]  # report_bench's target ids
        start = datetime.fromisoformat(args.start + "T00:00:00+00:00")
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, reasons in (("without", ()), ("with", IDENTITY_REASONS)):
                began = time.perf_counter()
                for target in targets:
                    for day in range(args.days):
                        a = start + timedelta(days=day)
                        origin = int(a.timestamp() * 1000)
                        ask = WindowAsk(1 << 62, origin, 900_000, 90_000, tuple(sorted(CALL_KINDS)), 30.0,
                                        GUARD_REFUSED, reasons)  # fmt: skip
                        store.report_window(target, a, a + timedelta(days=1), ask)
                took = time.perf_counter() - began
                best[name] = min(best.get(name, took), took)
        windows = len(targets) * args.days
        print(
            f"report_window over {windows} target-days: without the identity reasons"
            f" {best['without']:.2f} s, with them {best['with']:.2f} s"
            f" (+{best['with'] - best['without']:.2f} s, best of {args.rounds})"
        )
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
