"""Every bench of ``make bench`` in its smoke mode: tiny sizes, against its real peer.

Each runs once as bench/run.py runs it (a subprocess of the script with its smoke
arguments) and must yield every figure its table names, the peer's figure from the same
run and a ratio between them. No timing is asserted: speed goals live in bench/ and
BENCHMARKS.md. The Alertmanager page (bench/run.py ``alert_page``) is tests/test_alert_e2e.py
itself, so it has no smoke run here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.run import BENCHES, Bench, BenchError, Figure, last_json, reader, rows_of, run_once

PEERS = {  # the peer programs each bench starts (PostgreSQL: tests/support/postgres.py finds it)
    "fault_page": ("mosquitto",),
    "metrics_scrape": (),
    "status_page": (),
    "monitor_memory": ("mosquitto", "mosquitto_sub"),
    "ingest": ("mosquitto",),
    "report": (),
    "sip_calls": ("sipp",),
    "guard": (),
    "outbox_drain": ("mosquitto",),
    "replay": ("mosquitto",),
    "replicas": ("mosquitto",),
}
SMOKED = [b for b in BENCHES if b.smoke]


def test_every_bench_is_smoked_and_names_its_peers() -> None:
    assert {b.name for b in SMOKED} == set(PEERS)
    assert [b.name for b in BENCHES if not b.smoke] == ["alert_page"]


@pytest.mark.parametrize(
    "bench", [pytest.param(b, marks=pytest.mark.peers(*PEERS[b.name]), id=b.name) for b in SMOKED]
)
def test_smoke_run_yields_each_figure_its_peer_and_a_ratio(bench: Bench, tmp_path: Path) -> None:
    figures = run_once(bench, smoke=True, tmp=tmp_path)
    rows = rows_of(bench, [figures], smoke=True)
    assert rows, bench.name
    for row in rows:
        assert len(row.values) == 1 and math.isfinite(row.values[0]), (row.figure.key, row.values)
        if row.figure.peer or row.figure.quoted_peer is not None:
            assert len(row.peers) == 1 and row.peers[0] > 0, (row.figure.key, row.peers)
            assert len(row.ratios) == 1 and math.isfinite(row.ratios[0]), (row.figure.key, row.ratios)


def test_a_result_line_is_read_and_its_absence_named() -> None:
    out = 'table\n{"bench": "x", "figures": {"a": 1.5, "peer_a": 3}}\n'
    assert last_json(out) == {"a": 1.5, "peer_a": 3.0}
    with pytest.raises(BenchError, match="no result line"):
        last_json("table only\n{not json}\n")


def test_a_text_table_is_read_when_no_result_line_and_a_missing_line_named() -> None:
    read = reader((r"^calls/s\s+([\d.,]+)\s+([\d.,]+)", ("calls", "peer")))
    assert read("calls/s        1,234.5     40.00  0.75x\n") == {"calls": 1234.5, "peer": 40.0}
    with pytest.raises(BenchError, match="no line matching"):
        read("something else\n")


def test_ratio_is_taken_within_each_run_and_the_goal_on_the_median() -> None:
    from bench.run import Goal  # noqa: PLC0415

    fig = Figure("t", "t", peer="p", goal=Goal("<=", 2.0, "≤ 2×", on_ratio=True))
    bench = Bench("b", ["x.py"], ["x.py"], [fig])
    runs = [{"t": 10.0, "p": 4.0}, {"t": 30.0, "p": 10.0}, {"t": 2.0, "p": 2.0}]
    (row,) = rows_of(bench, runs)
    assert row.ratios == [2.5, 3.0, 1.0]
    assert row.median == 10.0
    assert row.met is False  # median ratio 2.5 > 2


def test_a_failed_hung_or_incomplete_bench_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.run  # noqa: PLC0415

    def script(code: str) -> Bench:
        return Bench("fake", ["-c", code], ["-c", code], [Figure("t", "t", peer="p")])

    with pytest.raises(BenchError, match=r"fake: .* exited 3:\n.*went wrong"):
        run_once(script("import sys; print('went wrong'); sys.exit(3)"), smoke=True, tmp=tmp_path)
    with pytest.raises(BenchError, match="fake: its result lacks p"):
        run_once(script('print(\'{"bench": "fake", "figures": {"t": 1}}\')'), smoke=True, tmp=tmp_path)
    monkeypatch.setattr(bench.run, "SMOKE_TIMEOUT", 1)
    with pytest.raises(BenchError, match="still running after 1 s"):
        run_once(script("import time; time.sleep(30)"), smoke=True, tmp=tmp_path)
