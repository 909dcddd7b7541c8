"""``make bench``: every benchmark against its peer, repeated, appended to BENCHMARKS.md.

    .venv/bin/python -m bench.run [--repeats 3] [--only NAME,...] [--smoke] [--no-write]
                                  [--no-profile]

Runs each script of ``BENCHES`` (bench/*.py, and the Alertmanager page of
tests/test_alert_e2e.py) ``--repeats`` times at issue 14's sizes, reads each run's figures
(the JSON line of bench/emit.py, or the script's text output where it prints none), and
for every figure takes the ratio to its peer **in the same run**, then the median and
min–max over the runs, and checks the median against the issue's goal. The section it
appends to BENCHMARKS.md names the date, the machine (cores, RAM, kernel, Python), the
command and, for a goal missed, the reason kept next to the figure here and the path of a
profile: the bench run once more under py-spy (``--subprocesses``, speedscope format, in
bench/profiles/) when py-spy is installed.

``--smoke``: each bench once at tiny sizes against its real peer (seconds each), nothing
written; tests/test_bench_smoke.py runs it in ``make test``. It shows that every script
still runs and yields its figures, not how fast: smoke figures are not compared to goals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
PROFILES = ROOT / "bench" / "profiles"

Figures = dict[str, float]
TIMEOUT = 3600  # s, one full run of a bench (the report's first builds its 3.1 GB store)
SMOKE_TIMEOUT = 300


class BenchError(Exception):
    """A bench failed or printed no figure it should have (its name and the reason)."""


@dataclass(frozen=True, slots=True)
class Goal:
    """``figure <= limit`` or ``figure >= limit``; ``on_ratio``: of the ratio to the peer."""

    op: str  # "<=" or ">="
    limit: float
    text: str
    on_ratio: bool = False
    profiled: bool = True  # a miss is worth a profile (not for a size: that is in the series)

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass(frozen=True, slots=True)
class Figure:
    key: str  # in the run's figures
    label: str
    unit: str = ""
    peer: str | None = None  # the peer's key in the same run
    peer_label: str = ""
    quoted_peer: float | None = None  # a peer figure quoted, not run here
    goal: Goal | None = None


@dataclass(frozen=True, slots=True)
class Bench:
    name: str
    command: list[str]  # after the interpreter: a script and its arguments, or ["-m", ...]
    smoke: list[str]
    figures: list[Figure]
    read: Callable[[str], Figures] = field(default=lambda out: last_json(out))  # noqa: PLW0108
    repeats: int | None = None  # None: --repeats; a bench that repeats within itself says 1
    smoke_keys: tuple[str, ...] = ()  # the figures a smoke run yields, when not all of them
    note: str = ""


# ------------------------------------------------------------------ reading a run's output


def last_json(out: str) -> Figures:
    """The figures of the last ``{"bench": ..., "figures": {...}}`` line (bench/emit.py)."""
    for line in reversed(out.splitlines()):
        if line.strip().startswith("{"):
            try:
                got = json.loads(line)
            except ValueError:
                continue
            if isinstance(got, dict) and isinstance(got.get("figures"), dict):
                return {str(k): float(v) for k, v in got["figures"].items()}
    raise BenchError("no result line (bench/emit.py) in its output")


def number(pattern: str, out: str, *names: str) -> Figures:
    """The groups of ``pattern`` in ``out`` as numbers named ``names`` (commas dropped)."""
    found = re.search(pattern, out, re.MULTILINE)
    if found is None:
        raise BenchError(f"no line matching {pattern!r} in its output")
    return {name: float(found.group(i + 1).replace(",", "")) for i, name in enumerate(names)}


def reader(*patterns: tuple[str, tuple[str, ...]]) -> Callable[[str], Figures]:
    """A JSON line if the script prints one, else the text output read by ``patterns``
    (the scripts other engineers own print tables; this reads them as they are)."""

    def read(out: str) -> Figures:
        try:
            return last_json(out)
        except BenchError:
            pass
        figures: Figures = {}
        for pattern, names in patterns:
            figures.update(number(pattern, out, *names))
        return figures

    return read


NUM = r"([\d.,]+)"
ROW = r"\s+" + NUM  # one column of a script's table


def filled_monitor(script: str) -> tuple[list[str], list[str]]:
    """Full and smoke arguments of a bench of a filled monitor (bench/metrics_scrape.py
    ``arguments``): 1,000 targets × 3 probes, 3 requests a run; 10 × 2, one."""
    return (
        [script, "--targets", "1000", "--probes", "3", "--repeats", "3"],
        [script, "--targets", "10", "--probes", "2", "--repeats", "1"],
    )


def fault_page_figures() -> list[Figure]:
    kinds = ("answer_503", "never_answer", "black_hole", "no_media", "one_way_media")
    return [
        Figure(
            f"p95_{kind}",
            f"fault → page (webhook), p95, `{kind}`",
            "s",
            peer_label="TestCall ≈180 s (quoted, not run)",
            quoted_peer=180.0,
            goal=Goal("<=", 15.0, "p95 ≤ 15 s"),
        )
        for kind in kinds
    ]


# fmt: off
BENCHES: list[Bench] = [
    Bench(
        "fault_page", ["bench/fault_page.py", "--faults", "5", "--interval", "10s"],
        ["bench/fault_page.py", "--faults", "1", "--interval", "2s", "--kinds", "answer_503"],
        fault_page_figures(), repeats=1, smoke_keys=("p95_answer_503",),
        note="one run of 5 faults of each kind (p95 over the faults: their maximum)",
    ),
    Bench(
        "alert_page",
        ["-m", "pytest", "tests/test_alert_e2e.py", "-s", "-q", "-p", "no:cacheprovider"],
        [],  # the test itself runs in make test
        [Figure("page_s", "fault → Alertmanager page (2 s interval, 1 s scrape)", "s",
                goal=Goal("<=", 4.0, "≤ interval + 2 scrapes = 4 s"))],
        read=reader((r"fault → page delivered to the webhook \(receiver pagerduty\): " + NUM,
                     ("page_s",))),
    ),
    Bench(
        "metrics_scrape", *filled_monitor("bench/metrics_scrape.py"),
        [
            Figure("series_per_pair", "/metrics series per target and probe pair",
                   goal=Goal("<=", 60, "≤ 60")),
            Figure("ms_scrape", "/metrics scrape, 1,000 targets × 3 probes", "ms",
                   peer="peer_ms_scrape", peer_label="client_python generate_latest",
                   goal=Goal("<=", 250, "≤ 250 ms")),
            Figure("mb_scrape", "/metrics size, uncompressed", "MB",
                   peer="peer_mb_scrape", peer_label="client_python, same series",
                   goal=Goal("<=", 3.0, "≤ 3 MB", profiled=False)),
            Figure("mb_scrape_gzip", "/metrics size, gzip (as Prometheus asks)", "MB",
                   goal=Goal("<=", 3.0, "≤ 3 MB")),
            Figure("ms_loop_stall", "/metrics: event-loop stall during a scrape", "ms"),
        ],
        note="3 scrapes a run, median",
    ),
    Bench(
        "status_page", *filled_monitor("bench/status_page.py"),
        [
            Figure("ms_page", "status page `GET /`, 1,000 targets", "ms",
                   peer="peer_ms_page", peer_label="Starlette FileResponse, same bytes",
                   goal=Goal("<=", 100, "≤ 100 ms")),
            Figure("kb_page", "status page size", "KB", goal=Goal("<=", 500, "≤ 500 KB")),
            Figure("kb_page_gzip", "status page size, gzip", "KB"),
        ],
        note="3 requests a run, median",
    ),
    Bench(
        "monitor_memory", ["bench/monitor_memory.py", "--backlog", "100000", "--pad", "600",
                           "--flood", "0"],
        ["bench/monitor_memory.py", "--backlog", "3000", "--pad", "2000", "--flood", "0"],
        [
            Figure("rate", "monitor ingest, 100,000-result backlog", "results/s",
                   peer="peer_rate", peer_label="mosquitto_sub -c",
                   goal=Goal(">=", 20_000, "≥ 20,000 results/s")),
            Figure("peak_mb", "monitor peak RSS draining it", "MB",
                   peer="peer_peak_mb", peer_label="mosquitto_sub -c",
                   goal=Goal("<=", 150, "≤ 150 MB")),
        ],
        read=reader(
            (r"backlog  monitor: .* peak " + NUM + r" MB .* " + NUM + r" results stored/s",
             ("peak_mb", "rate")),
            (r"backlog  mosquitto_sub:  peak RSS " + NUM + r" MB, " + NUM + r" msg/s",
             ("peer_peak_mb", "peer_rate")),
        ),
        note="results of about 1.2 KB (`--pad 600`), no flood",
    ),
    Bench(
        "ingest", ["bench/ingest.py", "--n", "10000", "--rounds", "1"],
        ["bench/ingest.py", "--n", "200", "--rounds", "1"],
        [Figure("rate", "monitor ingest, live (10,000 results published)", "results/s",
                peer="peer_rate", peer_label="plain aiomqtt subscriber")],
        read=reader((r"^msg/s received \(monitor: stored\)" + ROW + ROW, ("rate", "peer_rate"))),
    ),
    Bench(
        "report", ["bench/report_bench.py", "--days", "30", "--targets", "10", "--probes", "3",
                   "--peer"],
        ["bench/report_bench.py", "--days", "1", "--targets", "1", "--probes", "1", "--peer",
         "--db", "{tmp}/report.db", "--out", "{tmp}/report"],
        [
            Figure("report_s", "`ecpm report`, 30 days × 10 targets × 3 probes", "s",
                   peer="peer_payloads_s",
                   peer_label="same aggregates, plain SQL in sqlite3 from the payloads",
                   goal=Goal("<=", 2.0, "≤ 2× the peer", on_ratio=True)),
            Figure("peak_mib", "`ecpm report` peak RSS", "MiB"),
        ],
        note="the store (/tmp/ecpm-bench-30d-10t-3p.db, 3.1 GB) is built once (about 10 min) "
             "and reused",
    ),
    Bench(
        "sip_calls",
        ["bench/sip_calls.py", "--n", "200", "--idle", "3", "--concurrent", "100", "--media-time", "9"],
        ["bench/sip_calls.py", "--n", "5", "--idle", "0.5", "--concurrent", "8", "--workers", "2",
         "--media-time", "2"],
        [
            Figure("concurrent_cpu_ms_per_call", "probe CPU per verified echo call, 100 at once", "ms",
                   peer="concurrent_sipp_cpu_ms_per_call", peer_label="SIPp -sn uac_pcap, as many at once",
                   goal=Goal("<=", 1.2, "≤ 1.2× gross", on_ratio=True)),
            Figure("concurrent_passed", "simultaneous verified calls from one agent, passed", "calls",
                   quoted_peer=64, peer_label="SIPp: 64 concurrent echo calls (issue 14)",
                   goal=Goal(">=", 100, "≥ 100, 0 failed", profiled=False)),
            Figure("concurrent_failed", "simultaneous verified calls, failed", "calls",
                   goal=Goal("<=", 0, "0 failed", profiled=False)),
            Figure("concurrent_rss_peak_mb", "RSS per 4-call SIP worker, peak", "MB",
                   goal=Goal("<=", 64, "≤ 64 MB per 4-call worker", profiled=False)),
            Figure("concurrent_rss_per_call_mb", "RSS added per call", "MB"),
            Figure("setup_calls_per_s", "sequential calls/s (40/s cap)", "calls/s",
                   peer="setup_sipp_calls_per_s", peer_label="SIPp -sn uac -r 40"),
            Figure("setup_cpu_ms_per_call", "probe CPU per call setup (engine, no media)", "ms",
                   peer="setup_sipp_cpu_ms_per_call", peer_label="SIPp -sn uac"),
        ],
        smoke_keys=("concurrent_cpu_ms_per_call", "concurrent_failed", "concurrent_rss_peak_mb",
                    "setup_calls_per_s", "setup_cpu_ms_per_call"),
    ),
    Bench(
        "guard", ["bench/guard.py", "--n", "2000"], ["bench/guard.py", "--n", "20"],
        [Figure("us_per_target", "live-number guard per dial target", "µs",
                peer="peer_us_per_target", peer_label="phonenumbers connects_to_emergency_number")],
    ),
    Bench(
        "outbox_drain", ["bench/outbox_drain.py", "--n", "10000", "--rounds", "1", "--pairs", "2000"],
        ["bench/outbox_drain.py", "--n", "200", "--rounds", "1", "--pairs", "50"],
        [
            Figure("msg_s", "outbox drain through mosquitto", "msg/s",
                   peer="peer_msg_s", peer_label="aiomqtt publisher, QoS 1, 10 in flight"),
            Figure("life_s", "outbox result life (add, published, confirmed)", "/s",
                   peer="peer_life_s", peer_label="same SQL, plain sqlite3"),
        ],
    ),
    Bench(
        "replay", ["bench/replay.py", "--n", "20000", "--rounds", "1", "--queued", "1000"],
        ["bench/replay.py", "--n", "300", "--rounds", "1", "--queued", "100"],
        [Figure("replay_s", "replay of 20,000 dropped results to a complete store", "s",
                peer="backlog_s", peer_label="draining the same as a kept backlog")],
    ),
    Bench(
        "replicas", ["bench/replicas.py", "--n", "5000"], ["bench/replicas.py", "--n", "1000"],
        [
            Figure("sqlite", "backlog drain, one monitor on SQLite", "results/s",
                   peer="peer", peer_label="plain aiomqtt subscriber"),
            Figure("postgres", "backlog drain, one monitor on PostgreSQL", "results/s",
                   peer="peer", peer_label="plain aiomqtt subscriber"),
            Figure("replicas", "backlog drain, two replicas on PostgreSQL", "results/s",
                   peer="peer", peer_label="plain aiomqtt subscriber"),
        ],
        read=reader(
            (r"^peer \(plain subscriber\)" + ROW, ("peer",)),
            (r"^sqlite" + ROW, ("sqlite",)),
            (r"^postgres  " + ROW, ("postgres",)),
            (r"^postgres x2 replicas" + ROW, ("replicas",)),
        ),
    ),
]
# fmt: on

# why a goal is missed, when it is ("bench.figure"; fault_page's for each fault kind)
REASONS = {
    "fault_page.p95": "the later of two probes' next calls (≈0.975 × interval) plus the failing "
    "call (docs/checks.md 'From fault to page'); only a shorter interval shortens it",
    "alert_page.page_s": "the probe's interval, a scrape and a rule evaluation (BENCHMARKS.md "
    "'Alerting latency')",
    "metrics_scrape.ms_scrape": "about 4 µs of CPython a sample line (92,000 of them at 30.9 series a "
    "pair since the identity and dtmf stages), rendered in a thread so the event loop stalls only "
    "~15 ms; it tracks the host: the same series through client_python take 4-5x as long in the same "
    "run (1.5 s on the 16:02 run's host, 0.53 s on the 10:31 run's, where ecpm took 103 ms)",
    "metrics_scrape.mb_scrape": "92,000 series of about 90 bytes, mostly label names and values; a "
    "third are the failure counters per stage, created at zero so that increase() sees a target's "
    "first failure (a counter born at 1 shows none), the rest what the dashboard, alerts or tests read "
    "(docs/monitor.md 'Metrics'); with gzip, as Prometheus asks, it is the next row",
    "monitor_memory.rate": "20,000/s leaves 50 µs a result on one core; batched, the monitor spends "
    "about 130 µs a result with MQTT included, and a plain aiomqtt subscriber that does nothing with "
    "a message 80-125 µs by itself (BENCHMARKS.md 'Monitor ingest, batched': parsing and validating "
    "16 %, the wire-form encoding 7.5 %, the store 10 %, paho 20 %, asyncio the rest); only a C "
    "client and parser, or several monitor processes on one shared subscription, reach it",
    "report.report_s": "the chain check (json_extract of 13 fields and a SHA-256 per row) is three "
    "quarters of the time",
    "sip_calls.concurrent_cpu_ms_per_call": "a verified call runs the conference bridge, a recorder and "
    "an offline tone analysis in a worker whose pjsua2 thread polls every 10 ms (about 23 of its "
    "≈100 ms a call); SIPp verifies nothing and spreads its fixed cost over every call in one process "
    "(bench/sip_worker_profile.py)",
}


def reason(bench: str, key: str) -> str:
    """The reason kept for a missed goal (fault_page's p95_KIND share one)."""
    return (
        REASONS.get(f"{bench}.{key}")
        or REASONS.get(f"{bench}.{key.split('_', maxsplit=1)[0]}")
        or ("no reason recorded yet: see the profile")
    )


# goals of issue 14 that no bench measures yet: named in the table, never silently dropped
NOT_MEASURED: list[tuple[str, str, str]] = []


# ------------------------------------------------------------------ running


def python() -> str:
    return sys.executable  # make bench: .venv/bin/python


def argv(bench: Bench, smoke: bool, tmp: Path) -> list[str]:
    args = bench.smoke if smoke else bench.command
    return [python(), *(a.replace("{tmp}", str(tmp)) for a in args)]  # a scratch dir per run


def measured(bench: Bench, *, smoke: bool) -> list[Figure]:
    """The figures a run of ``bench`` yields (a smoke run may yield fewer)."""
    if smoke and bench.smoke_keys:
        return [f for f in bench.figures if f.key in bench.smoke_keys]
    return bench.figures


def run_once(bench: Bench, *, smoke: bool, tmp: Path, log: Path | None = None) -> Figures:
    """Run the bench once; its figures, checked to hold every key its table names."""
    cmd = argv(bench, smoke, tmp)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    limit = SMOKE_TIMEOUT if smoke else TIMEOUT
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env, timeout=limit
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{bench.name}: {' '.join(cmd[1:])} still running after {limit} s") from None
    if log is not None:
        log.write_text(done.stdout + "\n--- stderr\n" + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise BenchError(f"{bench.name}: {' '.join(cmd[1:])} exited {done.returncode}:\n{tail}")
    try:
        figures = bench.read(done.stdout)
    except BenchError as exc:
        raise BenchError(f"{bench.name}: {exc}") from None
    shown = measured(bench, smoke=smoke)
    wanted = {f.key for f in shown} | {f.peer for f in shown if f.peer}
    missing = sorted(wanted - figures.keys())
    if missing:
        raise BenchError(f"{bench.name}: its result lacks {', '.join(missing)}")
    return figures


def profile(bench: Bench, tmp: Path) -> Path | None:
    """The bench once more under py-spy (every subprocess too): the speedscope file, or None
    when py-spy is not installed or could not sample."""
    spy = shutil.which("py-spy", path=f"{Path(python()).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        return None
    PROFILES.mkdir(exist_ok=True)
    out = PROFILES / f"{datetime.now(UTC):%Y%m%d-%H%M}-{bench.name}.speedscope.json"
    cmd = [spy, "record", "--subprocesses", "--rate", "50", "--format", "speedscope", "-o", str(out)]
    cmd += ["--", *argv(bench, False, tmp)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return None
    return out if done.returncode == 0 and out.exists() else None


@dataclass(slots=True)
class Row:
    figure: Figure
    values: list[float]
    peers: list[float]
    ratios: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool | None:
        goal = self.figure.goal
        if goal is None:
            return None
        if goal.on_ratio:
            return goal.met(statistics.median(self.ratios)) if self.ratios else None
        return goal.met(self.median)


def rows_of(bench: Bench, runs: list[Figures], *, smoke: bool = False) -> list[Row]:
    """Each figure over the runs: its values, its peer's and their ratio in each run."""
    rows = []
    for fig in measured(bench, smoke=smoke):
        values = [run[fig.key] for run in runs]
        if fig.peer:
            peers = [run[fig.peer] for run in runs]
        else:
            peers = [fig.quoted_peer] * len(runs) if fig.quoted_peer is not None else []
        ratios = [v / p for v, p in zip(values, peers, strict=False) if p]
        rows.append(Row(fig, values, peers, ratios))
    return rows


# ------------------------------------------------------------------ writing


def summary(error: str) -> str:
    """A failed run in one line: what exited, and the last line it printed."""
    first, *rest = error.splitlines()
    last = next((line.strip() for line in reversed(rest) if line.strip()), "")
    return first.split(": ", 1)[-1] + (f" … {last}" if last else "")


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if min(values) == max(values):
        return num(med)
    return f"{num(med)} ({num(min(values))}–{num(max(values))})"


def num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: dict[str, list[Row]]) -> list[str]:
    lines = [
        "| figure | ecpm median (min–max) | peer | ratio | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for rows in results.values():
        for row in rows:
            fig = row.figure
            unit = f" {fig.unit}" if fig.unit else ""
            peer = f"{spread(row.peers)}{unit}, {fig.peer_label}" if row.peers else "—"
            if fig.quoted_peer is not None:
                peer = fig.peer_label
            ratio = f"{spread(row.ratios)}x" if row.ratios else "—"
            goal = fig.goal.text if fig.goal else "—"
            met = {None: "—", True: "met", False: "**missed**"}[row.met]
            lines.append(f"| {fig.label} | {spread(row.values)}{unit} | {peer} | {ratio} | {goal} | {met} |")
    for label, goal, why in NOT_MEASURED:
        lines.append(f"| {label} | not measured | — | — | {goal} | not measured: {why} |")
    return lines


def machine() -> str:
    mem = next(
        (int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
         if line.startswith("MemTotal:")),
        0,
    )  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.machine()} Linux {platform.release()}, {os.cpu_count()} cores, "
        f"{mem / 1024 / 1024:.0f} GB RAM, Python {platform.python_version()}; load average {load} at the end"
    )


def section(
    results: dict[str, list[Row]],
    *,
    failed: dict[str, str],
    profiles: dict[str, Path | None],
    command: str,
    repeats: int,
    minutes: float,
) -> str:
    head = (
        ROOT.joinpath(".git").exists()
        and subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    out = [
        "",
        f"## make bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{machine()}; tree {head or '?'}; {repeats} run(s) of each bench unless its note says "
        f"otherwise, {minutes:.0f} min in all. The ratio is ecpm / peer within each run, then "
        "the median (min–max) over the runs; the goal is checked on the median. Command:",
        "",
        f"    {command}",
        "",
        *table(results),
    ]
    notes = [f"- {name}: {bench.note}" for name, bench in BY_NAME.items() if name in results and bench.note]
    if notes:
        out += ["", "Runs:", "", *notes]
    missed = [(name, row) for name, rows in results.items() for row in rows if row.met is False]
    if missed:
        out += ["", "Goals missed:", ""]
        for name, row in missed:
            where = profiles.get(name)
            prof = f" Profile: `{where.relative_to(ROOT)}` (speedscope)." if where else " No profile."
            if row.figure.goal and not row.figure.goal.profiled:
                prof = ""
            goal = row.figure.goal.text if row.figure.goal else ""
            why = reason(name, row.figure.key)
            out.append(
                f"- {row.figure.label}: {spread(row.values)} {row.figure.unit} against {goal}. "
                f"{why[:1].upper()}{why[1:]}.{prof}"
            )
    if failed:
        out += ["", "Runs that did not finish (the figures above are of the others):", ""]
        out += [f"- {name}: {summary(error)}" for name, error in failed.items()]
    return "\n".join(out) + "\n"


BY_NAME = {b.name: b for b in BENCHES}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", "3")))
    parser.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, once each, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not append it")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy run for a missed goal")
    args = parser.parse_args()
    args.names = [n for n in args.only.split(",") if n] or list(BY_NAME)
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only: unknown bench {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def run_repeats(
    bench: Bench, repeats: int, *, smoke: bool, logs: Path, failed: dict[str, str]
) -> list[Figures]:
    """The figures of each run that finished; a failed run is named in ``failed``."""
    runs: list[Figures] = []
    for i in range(repeats):
        print(f"[bench] {bench.name} run {i + 1}/{repeats} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="ecpm-bench-run-") as tmp:
            try:
                runs.append(run_once(bench, smoke=smoke, tmp=Path(tmp), log=logs / f"{bench.name}-{i}.log"))
            except BenchError as exc:
                failed[f"{bench.name} (run {i + 1} of {repeats})"] = str(exc)
                print(f"[bench] {exc}", file=sys.stderr, flush=True)
    return runs


def main() -> int:
    args = arguments()
    started = time.monotonic()
    results: dict[str, list[Row]] = {}
    failed: dict[str, str] = {}
    profiles: dict[str, Path | None] = {}
    logs = Path(tempfile.mkdtemp(prefix="ecpm-bench-logs-"))
    for bench in (BY_NAME[name] for name in args.names):
        if args.smoke and not bench.smoke:
            continue
        repeats = 1 if args.smoke else bench.repeats or args.repeats
        runs = run_repeats(bench, repeats, smoke=args.smoke, logs=logs, failed=failed)
        if not runs:
            continue
        rows = results[bench.name] = rows_of(bench, runs, smoke=args.smoke)
        missed = any(r.met is False and r.figure.goal and r.figure.goal.profiled for r in rows)
        if missed and not (args.smoke or args.no_profile):
            print(f"[bench] {bench.name}: a goal missed, profiling one more run", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="ecpm-bench-run-") as tmp:
                profiles[bench.name] = profile(bench, Path(tmp))
    print(f"[bench] each run's output: {logs}", file=sys.stderr)
    if args.smoke:  # figures at tiny sizes: shown, never held against the goals
        for name, rows in results.items():
            print(f"{name}: " + ", ".join(f"{r.figure.key} {num(r.median)} (ratio {spread(r.ratios)})"
                                          for r in rows))  # fmt: skip
        for name, error in failed.items():
            print(f"{name}: FAILED {error}")
        return 1 if failed else 0
    only = f" --only {args.only}" if args.only else ""
    command = f".venv/bin/python -m bench.run --repeats {args.repeats}{only}   # what make bench runs"
    minutes = (time.monotonic() - started) / 60
    text = section(
        results, failed=failed, profiles=profiles, command=command, repeats=args.repeats, minutes=minutes
    )
    print(text)
    if not args.no_write:
        with BENCHMARKS.open("a", encoding="utf-8") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
