"""What notification duties cost the monitor's evaluation (the tick that runs every second).

    .venv/bin/python bench/duties.py [--targets 200] [--repeats 21]

A ``MonitorCore`` on a SQLite store with ``--targets`` targets, every one down with an open
incident; once with the four duty presets configured (each incident carries four duties,
none acknowledged, none due to escalate: the escalation check finds nothing, as on almost
every tick), once without any (the peer: the same evaluation before this feature). Median
(min–max) of ``--repeats`` evaluations, after one warm-up each.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from monitor.core import MonitorCore  # noqa: E402
from monitor.store import open_store  # noqa: E402
from tests.support.monitor import Clock, ProbeSim, monitor_config  # noqa: E402

PRESETS = [
    {"preset": "us-fcc-psap"},
    {"preset": "us-nors"},
    {"preset": "us-nors-voip"},
    {"preset": "uk-ofcom-s105k", "deadline": "1h"},
]


def run(directory: Path, targets: int, repeats: int, duties: list[dict[str, Any]]) -> list[float]:
    ids = [f"t{i}" for i in range(targets)]
    clock = Clock()
    config = monitor_config(directory, targets=ids, duties=duties)
    core = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=clock)
    sim = ProbeSim("p1")
    for _ in range(2):
        for t in ids:
            core.handle(sim.topic(t), sim.result(t, "fail", clock()).to_json())
        core.store.commit()
        clock.advance(1)
    snap = core.evaluate(clock())
    assert len(snap.open_incidents) == targets
    times = []
    for _ in range(repeats + 1):
        clock.advance(0.1)
        began = time.perf_counter()
        core.evaluate(clock())
        times.append(time.perf_counter() - began)
    core.store.close()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    logging.disable(logging.ERROR)  # an incident per target is what is measured, not news
    for label, duties in (("four duties per incident", PRESETS), ("no duties (peer)", [])):
        with tempfile.TemporaryDirectory() as tmp:
            t = run(Path(tmp), args.targets, args.repeats, duties)
        print(
            f"{label}: evaluate() with {args.targets} open incidents "
            f"{statistics.median(t) * 1000:.1f} ms ({min(t) * 1000:.1f}–{max(t) * 1000:.1f})"
        )


if __name__ == "__main__":
    main()
