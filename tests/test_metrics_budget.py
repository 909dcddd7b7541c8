"""The monitor's /metrics sized for a Prometheus: series per target and probe pair, no
``_created`` series (docs/monitor.md "Metrics"; speed and size: bench/metrics_scrape.py)."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.web import create_app
from tests.support.monitor import Clock, ProbeSim, make_core

PROBES = ("p1", "p2", "p3")
TARGETS = ("t1", "t2", "t3", "t4")
BUDGET = 60  # series per target and probe pair (issue 14)


def scrape(tmp_path: Path) -> str:
    clock = Clock()
    core, registry, _ = make_core(tmp_path, clock, probes=PROBES, targets=TARGETS)
    sims = [ProbeSim(p) for p in PROBES]
    for _ in range(3):  # every kind of series: passes, failures at each stage, another check kind
        for sim in sims:
            for target in TARGETS:
                clock.advance(1)
                for result in (
                    sim.result(target, "pass", clock()),
                    sim.result(target, "fail", clock(), stage="ringing"),
                    sim.result(target, "fail", clock(), stage="bogus"),
                    sim.result(target, "pass", clock(), check="options"),
                    sim.result(target, "fail", clock(), check="options", stage="transport"),
                ):
                    assert core.handle(sim.topic(target), result.to_json()) is None
    core.store.commit()
    core.evaluate(clock())
    app = create_app(snapshot=core.snapshot, registry=registry, incidents=lambda n: [], token=None)

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as client:
            return await client.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200
    return response.text


def test_series_per_target_and_probe_pair_stay_within_budget(tmp_path: Path) -> None:
    samples = [s for f in text_string_to_metric_families(scrape(tmp_path)) for s in f.samples]
    per_target = Counter(s.labels["target"] for s in samples if "target" in s.labels)
    per_pair = Counter(
        (s.labels["target"], s.labels["probe"]) for s in samples if {"target", "probe"} <= set(s.labels)
    )
    assert set(per_target) == set(TARGETS) and len(per_pair) == len(TARGETS) * len(PROBES)
    for target, n in per_target.items():  # a target's own series shared among its probes
        assert n / len(PROBES) <= BUDGET, (target, n)
    assert max(per_pair.values()) <= BUDGET, per_pair


def test_no_created_series(tmp_path: Path) -> None:
    text = scrape(tmp_path)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert names and not [n for n in names if n.endswith("_created")]


@pytest.mark.peers("promtool")
def test_the_exposition_passes_promtool(tmp_path: Path) -> None:
    """The per-target series are rendered by ecpm itself, not prometheus_client: Prometheus's
    own checker must accept the text (format and metric-name lint)."""
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
