"""A scrape of the monitor's /metrics at 1,000 targets × 3 probes, vs plain client_python.

    .venv/bin/python bench/metrics_scrape.py [--targets 1000] [--probes 3] [--repeats 7]

ecpm: a ``MonitorCore`` configured with N targets and M probes is filled through
``handle`` with signed results (tests.support.monitor.ProbeSim): three calls from every
probe to every target, one in 20 targets failing (at ringing, then answer), an OPTIONS
check on one in 10; then ``evaluate``. The clock runs around one GET /metrics of the real
app (``monitor.web.create_app``, through httpx's ASGI transport, in this process):
uncompressed, and again with ``Accept-Encoding: gzip`` as Prometheus sends it. While a
scrape runs, a ticker on the same event loop records the loop's longest stall (ingest and
paging would wait that long). Peer: prometheus_client's ``generate_latest`` rendering the
same series (the scrape's samples, pre-built: its rendering alone, no collect cost), on
the event loop as the monitor did before. Median (min–max) of the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.core import Metric  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from bench.emit import emit  # noqa: E402
from monitor.core import MonitorCore  # noqa: E402
from monitor.store import SqliteStore  # noqa: E402
from monitor.web import create_app  # noqa: E402
from tests.support.monitor import Clock, ProbeSim, monitor_config  # noqa: E402


def fill(tmp: Path, targets: int, probes: int) -> tuple[MonitorCore, CollectorRegistry]:
    names = [f"psap-{i:04d}" for i in range(targets)]
    probe_ids = [f"probe-{chr(97 + i)}" for i in range(probes)]
    config = monitor_config(tmp, probes=probe_ids, targets=names, interval="30s")
    clock = Clock()
    registry = CollectorRegistry()
    core = MonitorCore(config, SqliteStore(config.store.path), registry, pager=lambda *_: None, clock=clock)
    sims = [ProbeSim(p) for p in probe_ids]
    for round_ in range(3):
        for i, target in enumerate(names):
            clock.advance(0.01)
            for sim in sims:
                failing = i % 20 == 0 and round_ > 0
                stage = "ringing" if round_ == 1 else "answer"
                result = sim.result(
                    target, "fail" if failing else "pass", clock(), stage=stage, pdd=0.05 + i % 7 / 10
                )
                assert core.handle(sim.topic(target), result.to_json()) is None
                if i % 10 == 0:
                    option = sim.result(target, "pass", clock(), check="options")
                    assert core.handle(sim.topic(target), option.to_json()) is None
        core.store.commit()
    core.evaluate(clock() + timedelta(seconds=1))
    return core, registry


class Parsed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def timed(work: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds, the event loop's longest stall meanwhile, what ``work`` returned)."""
    stall, done = 0.0, False

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    got = work()
    if asyncio.iscoroutine(got):
        got = await got
    elapsed = time.perf_counter() - start
    done = True
    await tick
    return elapsed, stall, got


def fmt(values: list[float], scale: float = 1000) -> str:
    return f"{statistics.median(values) * scale:.0f} ({min(values) * scale:.0f}–{max(values) * scale:.0f})"


async def main(targets: int, probes: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        start = time.perf_counter()
        core, registry = fill(Path(tmp), targets, probes)
        filled = time.perf_counter() - start
        app = create_app(snapshot=core.snapshot, registry=registry, incidents=lambda n: [], token=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor", timeout=60) as client:
            rows: dict[str, list[tuple[float, float, int]]] = {"plain": [], "gzip": [], "peer": []}
            text = (await client.get("/metrics", headers={"Accept-Encoding": "identity"})).text
            families = list(text_string_to_metric_families(text))
            peer = Parsed(families)
            for _ in range(repeats):
                for name, encoding in (("plain", "identity"), ("gzip", "gzip")):
                    seconds, stall, got = await timed(
                        lambda e=encoding: client.get("/metrics", headers={"Accept-Encoding": e})
                    )
                    assert isinstance(got, httpx.Response) and got.status_code == 200
                    rows[name].append((seconds, stall, got.num_bytes_downloaded))
                seconds, stall, body = await timed(lambda: generate_latest(peer))
                assert isinstance(body, bytes)
                rows["peer"].append((seconds, stall, len(body)))
    series = sum(len(f.samples) for f in families)
    pairs = targets * probes
    print(
        f"/metrics: {targets} targets × {probes} probes, {series:,} series ({series / pairs:.1f} per target"
        f" and probe pair), filled in {filled:.0f} s; {repeats} repeats, median (min–max)"
    )
    print(f"{'':34} {'ms per scrape':>16} {'loop stall ms':>16} {'bytes':>12}")
    for label, name in (
        ("ecpm GET /metrics", "plain"),
        ("ecpm GET /metrics, gzip", "gzip"),
        ("peer: generate_latest, same series", "peer"),
    ):
        got = rows[name]
        times, stalls, size = [r[0] for r in got], [r[1] for r in got], got[0][2]
        print(f"{label:34} {fmt(times):>16} {fmt(stalls):>16} {size:>12,}")
    ratio = statistics.median(r[0] for r in rows["plain"]) / statistics.median(r[0] for r in rows["peer"])
    print(f"ratio ecpm / peer (time, uncompressed): {ratio:.2f}x")
    median = {name: statistics.median(r[0] for r in got) * 1000 for name, got in rows.items()}
    emit(
        "metrics_scrape",
        series_per_pair=series / pairs,
        ms_scrape=median["plain"],
        peer_ms_scrape=median["peer"],
        ms_scrape_gzip=median["gzip"],
        ms_loop_stall=statistics.median(r[1] for r in rows["plain"]) * 1000,
        mb_scrape=rows["plain"][0][2] / 1e6,
        mb_scrape_gzip=rows["gzip"][0][2] / 1e6,
        peer_mb_scrape=rows["peer"][0][2] / 1e6,
    )


def arguments(doc: str | None) -> argparse.Namespace:
    """``--targets``, ``--probes``, ``--repeats``: what the benches of a filled monitor take."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args()


if __name__ == "__main__":
    args = arguments(__doc__)
    asyncio.run(main(args.targets, args.probes, args.repeats))
