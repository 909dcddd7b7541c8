"""SIP call setup: ecpm's engine vs SIPp's UAC, against the same SIPp UAS; and
simultaneous verified calls from one agent's SIP workers vs SIPp ``uac_pcap``.

    .venv/bin/python bench/sip_calls.py [--n 200] [--idle 3] [--rate 40] [--poll 0.01]
        [--concurrent 16] [--workers auto] [--media-time 9] [--no-setup]

One SIPp UAS (built-in ``-sn uas``: 180, 200 with SDP, then BYE → 200) on a free
loopback port answers both callers. ecpm: ``SipEngine.call`` (the engine's own call
API, no check logic, no tone, no recording) placing N sequential calls: INVITE →
200 → ACK, then hang up (BYE) and wait for the call to end; 4 call slots and
``max_call_rate`` 40/s (``--rate``, at most 40), the wheel's limits. Peer:
``sipp -sn uac -m N -l 1 -r 40`` (sequential, the same rate cap), and the same
without the cap (``-r 1000``) to show what the cap costs. ``--poll`` sets the
engine's poll interval for the calls. INVITE→200 is taken from the engine's events
(pjsua2 thread) and from SIPp's message trace (``-trace_msg``). CPU is the whole
calling process (for SIPp from its rusage). Idle CPU: the ``pjsua2`` thread's and
the process's, with no call up, at the engine's poll interval (10 ms) and at the
5 ms the notes measured (~3 %), each a fresh engine.

Simultaneous calls (``--concurrent N``, 0 to skip): the agent's ``WorkerPool``
(probes.workers; ``--workers``, default ceil(N / 4)) runs N ``invite`` checks at once,
each a verified echo call (media checked: our 1000 Hz tone must come back) of
``--media-time`` seconds, against a SIPp UAS with ``-rtp_echo`` (tests/sipp/uas_echo.xml).
Figures: passed / failed, RSS per worker idle and at the peak, RSS per call added
((peak - idle) / calls on that worker), CPU per verified call (the workers' utime+stime
from /proc plus the agent's own). Peer in the same run: ``sipp -sn uac_pcap -l N -m N``
(each call plays an 8 s G.711 pcap, pauses 1 s: a 9 s call) to the same UAS, its CPU per
call from its rusage. The last line printed is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402
from probes.config import ProbeConfig, SipSettings  # noqa: E402
from probes.guard import Guard  # noqa: E402
from probes.outcome import CheckOutcome  # noqa: E402
from probes.sip import CallOptions, Dial, SipEngine  # noqa: E402
from probes.workers import WorkerPool  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402
from tests.support.paths import SIPP_DIR  # noqa: E402
from tests.support.peers import peer_path  # noqa: E402
from tests.support.processes import Proc  # noqa: E402

MAX_RATE = 40.0  # calls per second: the wheel's limit (probes.config.SipSettings)
_STAMP = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


class Figures:
    def __init__(self, n: int, seconds: float, setup_ms: list[float], cpu: float, failed: int) -> None:
        self.rate = n / seconds
        self.median = statistics.median(setup_ms)
        self.p95 = statistics.quantiles(setup_ms, n=20)[-1]
        self.cpu_ms = cpu / n * 1000
        self.failed = failed


def thread_cpu(tid: int) -> float:
    """CPU seconds of one thread of this process (schedstat: nanoseconds on a CPU)."""
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9


async def idle_cpu(poll: float, seconds: float) -> tuple[float, float]:
    """(% of one core: the pjsua2 thread, the whole process) with the engine idle."""
    async with SipEngine(SipSettings(), Guard(home_region="GB"), poll_interval=poll):
        tid = next(t.native_id for t in threading.enumerate() if t.name == "pjsua2")
        assert tid is not None
        await asyncio.sleep(0.5)
        t0, p0, w0 = thread_cpu(tid), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        wall = time.monotonic() - w0
        return (thread_cpu(tid) - t0) / wall * 100, (time.process_time() - p0) / wall * 100


async def engine_calls(uri: str, n: int, rate: float, poll: float) -> Figures:
    settings = SipSettings(max_call_rate=rate)
    dial = Dial(uri=uri, target="bench", declared_test_endpoint=True)
    options = CallOptions(first_response_timeout=2.0, max_duration=10.0)
    async with SipEngine(settings, Guard(home_region="GB"), poll_interval=poll) as engine:

        async def one() -> float | None:
            """INVITE→200 in ms, None if the call failed."""
            async with await engine.call(dial, options) as call:
                sent = answered = None
                while (event := await call.next_event(5.0)) is not None and event.kind != "confirmed":
                    if event.kind == "sent":
                        sent = event.at
                    elif event.kind == "response" and event.status == 200:
                        answered = event.at
                    elif event.kind == "disconnected":
                        return None
                await call.hangup()
                ended = await call.wait_ended(5.0)
            ok = ended is not None and ended.cause == "local" and sent is not None and answered is not None
            return (answered - sent) * 1000 if ok and sent is not None and answered is not None else None

        await one()  # warm-up: the first call creates the account
        setup: list[float] = []
        cpu, start = time.process_time(), time.monotonic()
        for _ in range(n):
            if (ms := await one()) is not None:
                setup.append(ms)
        seconds, cpu = time.monotonic() - start, time.process_time() - cpu
    return Figures(n, seconds, setup, cpu, n - len(setup))


def sipp_setup_ms(trace: Path) -> list[float]:
    """INVITE sent → 200 (to the INVITE) received, per call, from SIPp's message trace."""
    out: list[float] = []
    stamp, invite = 0.0, None
    lines = trace.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if found := _STAMP.match(line):
            stamp = datetime.fromisoformat(found.group(1)).timestamp()
            continue
        if line.startswith("INVITE ") and "sent" in lines[i - 2]:
            invite = stamp
        elif line.startswith("SIP/2.0 200") and invite is not None:
            block = lines[i : i + 15]
            if any(x.startswith("CSeq:") and "INVITE" in x for x in block):
                out.append((stamp - invite) * 1000)
                invite = None
    return out


def sipp_calls(tmp: Path, port: int, n: int, rate: float) -> Figures:
    trace = tmp / f"uac-{rate:.0f}.log"
    cmd = [
        peer_path("sipp"), f"{HOST}:{port}", "-sn", "uac", "-i", HOST, "-p", str(free_port()),
        "-mi", HOST, "-mp", str(free_port()), "-m", str(n), "-l", "1", "-r", str(rate),
        "-nostdin", "-timeout", "60s", "-timeout_error", "-trace_msg", "-message_file", str(trace),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    code = subprocess.run(
        cmd, check=False, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90
    ).returncode
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    setup = sipp_setup_ms(trace)
    return Figures(n, seconds, setup, cpu, n - len(setup) if code == 0 else n)


class Uas(Proc):
    """SIPp's built-in UAS on a free loopback port, its output in ``tmp``; ``echo``: the
    echo scenario (tests/sipp/uas_echo.xml) with ``-rtp_echo``, for verified calls."""

    def __init__(self, tmp: Path, *, echo: bool = False) -> None:
        self.port = free_port()
        scenario = ["-sf", str(SIPP_DIR / "uas_echo.xml"), "-rtp_echo"] if echo else ["-sn", "uas"]
        cmd = [
            peer_path("sipp"), *scenario, "-i", HOST, "-p", str(self.port), "-mi", HOST,
            "-mp", str(free_port()), "-nostdin", "-timeout", "600s", "-max_socket", "2048",
        ]  # fmt: skip
        super().__init__("sipp-uas", cmd, tmp)
        self.start()
        time.sleep(0.3)
        if not self.running:
            raise RuntimeError(f"SIPp UAS did not start: {self.tail()}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Concurrent:
    calls: int
    workers: int
    media_time: float
    passed: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    start_seconds: float = 0.0  # the pool's start: every worker's engine up
    rss_idle_mb: float = 0.0  # per worker, mean
    rss_peak_mb: float = 0.0  # per worker, mean of each worker's peak
    rss_per_call_mb: float = 0.0
    cpu_ms_per_call: float = 0.0
    sipp_cpu_ms_per_call: float = 0.0
    sipp_failed: int = 0


def echo_config(uri: str, calls: int, workers: int, media_time: float) -> ProbeConfig:
    """A probe with ``calls`` targets at ``uri``, each one verified echo call (no tone expected)."""
    invite = {
        "first_response_timeout": "5s", "answer_timeout": "10s", "media_time": f"{media_time}s",
        "max_duration": f"{media_time + 30}s", "expect_tone": False,
    }  # fmt: skip
    return ProbeConfig.model_validate(
        {
            "kind": "probe",
            "probe": {"id": "bench", "region": "GB", "key": "k"},
            "sip": {"transports": ["udp"], "workers": workers},
            "schedule": {"max_concurrent_checks": min(256, calls)},
            "targets": [
                {"id": f"t{i}", "uri": uri, "test_endpoint": True, "checks": {"invite": invite}}
                for i in range(calls)
            ],
        }
    )


async def concurrent_calls(uri: str, calls: int, workers: int, media_time: float) -> Concurrent:
    """N verified echo calls at once from one WorkerPool (the agent's SIP workers)."""
    config = echo_config(uri, calls, workers, media_time)
    out = Concurrent(calls, workers, media_time)
    began = time.monotonic()
    async with WorkerPool(config, Guard(home_region="GB")) as pool:
        out.start_seconds = time.monotonic() - began
        pids = [p for p in pool.pids() if p is not None]
        await asyncio.sleep(1.0)
        idle = {p: proc_rss_mb(p) for p in pids}
        peak = dict(idle)
        cpu0 = sum(proc_cpu(p) for p in pids) + time.process_time()
        start = time.monotonic()
        runs = [asyncio.create_task(pool.run(t, "invite")) for t in config.targets]
        while not all(r.done() for r in runs):
            for p in pids:
                peak[p] = max(peak[p], proc_rss_mb(p))
            await asyncio.wait(runs, timeout=0.5)
        out.seconds = time.monotonic() - start
        cpu = sum(proc_cpu(p) for p in pids) + time.process_time() - cpu0
        results: list[CheckOutcome] = [r.result() for r in runs]
    out.passed = sum(r.outcome == "pass" for r in results)
    out.failed = calls - out.passed
    for r in results:
        if r.outcome != "pass":
            key = f"{r.stage}/{r.reason}"
            out.reasons[key] = out.reasons.get(key, 0) + 1
    out.rss_idle_mb = statistics.mean(idle.values())
    out.rss_peak_mb = statistics.mean(peak.values())
    per_worker = calls / len(pids)
    out.rss_per_call_mb = (out.rss_peak_mb - out.rss_idle_mb) / per_worker
    out.cpu_ms_per_call = cpu / max(out.passed, 1) * 1000
    return out


def sipp_pcap_calls(tmp: Path, port: int, calls: int) -> tuple[float, int]:
    """SIPp ``uac_pcap`` (9 s calls with G.711 audio), all at once: (CPU ms per call, failed)."""
    pcap = tmp / "pcap"
    pcap.mkdir(exist_ok=True)
    for name in ("g711a.pcap", "dtmf_2833_1.pcap"):
        if not (pcap / name).exists():
            (pcap / name).symlink_to(Path("/usr/share/sip-tester") / name)
    stats = tmp / "uac_pcap.csv"
    cmd = [
        peer_path("sipp"), f"{HOST}:{port}", "-sn", "uac_pcap", "-i", HOST, "-p", str(free_port()),
        "-mi", HOST, "-mp", str(free_port()), "-m", str(calls), "-l", str(calls), "-r", str(calls),
        "-nostdin", "-timeout", "120s", "-timeout_error", "-max_socket", "2048",
        "-trace_stat", "-stf", str(stats),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = subprocess.run(
        cmd, check=False, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180
    ).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    failed = 0
    if stats.exists():
        rows = stats.read_text().splitlines()
        if len(rows) >= 2:
            head, last = rows[0].split(";"), rows[-1].split(";")
            failed = int(last[head.index("FailedCall(C)")])
    return cpu / calls * 1000, failed if code == 0 else max(failed, 1)


async def run_concurrent(calls: int, workers: int, media_time: float) -> Concurrent:
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        uas = Uas(Path(tmp), echo=True)
        try:
            out = await concurrent_calls(f"sip:ecpm-test@{HOST}:{uas.port}", calls, workers, media_time)
            out.sipp_cpu_ms_per_call, out.sipp_failed = sipp_pcap_calls(Path(tmp), uas.port, calls)
        finally:
            uas.stop()
    print(
        f"simultaneous verified echo calls: {calls} at once, {workers} SIP worker(s),"
        f" {media_time:g} s of media each, SIPp UAS -rtp_echo on {HOST}"
    )
    print(
        f"  passed {out.passed}, failed {out.failed} {out.reasons or ''} in {out.seconds:.1f} s"
        f" (the workers started in {out.start_seconds:.1f} s)"
    )
    print(
        f"  RSS per worker: idle {out.rss_idle_mb:.1f} MB, peak {out.rss_peak_mb:.1f} MB;"
        f" per call added {out.rss_per_call_mb:.2f} MB"
    )
    ratio = out.cpu_ms_per_call / max(out.sipp_cpu_ms_per_call, 1e-9)
    print(
        f"  CPU per verified call: ecpm {out.cpu_ms_per_call:.1f} ms, SIPp uac_pcap"
        f" {out.sipp_cpu_ms_per_call:.1f} ms ({out.sipp_failed} failed): {ratio:.2f}x"
    )
    return out


async def main(n: int, idle: float, rate: float, poll: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        uas = Uas(Path(tmp))
        try:
            ours = await engine_calls(f"sip:ecpm-test@{HOST}:{uas.port}", n, rate, poll)
            peer = sipp_calls(Path(tmp), uas.port, n, rate)
            free = sipp_calls(Path(tmp), uas.port, n, 1000.0)
        finally:
            uas.stop()
    idle10 = await idle_cpu(0.01, idle)
    idle5 = await idle_cpu(0.005, idle)
    print(
        f"sip calls: {n} sequential calls each, SIPp UAS (-sn uas) on {HOST}, UDP,"
        f" rate cap {rate:g}/s, engine poll {poll * 1000:g} ms"
    )
    print(f"{'':30} {'ecpm engine':>12} {'SIPp UAC':>9} {'ratio':>7} {'SIPp -r 1000':>13}")
    for name, attr in (
        ("calls/s", "rate"),
        ("INVITE→200 median ms", "median"),
        ("INVITE→200 p95 ms", "p95"),
        ("CPU ms per call (caller)", "cpu_ms"),
    ):
        e, p, f = getattr(ours, attr), getattr(peer, attr), getattr(free, attr)
        print(f"{name:30} {e:12.2f} {p:9.2f} {e / p:6.2f}x {f:13.2f}")
    print(f"{'failed calls':30} {ours.failed:12d} {peer.failed:9d} {'':7} {free.failed:13d}")
    print(f"idle CPU %, pjsua2 thread / process ({idle:.0f} s, no call up):")
    print(f"  poll 10 ms (engine default) {idle10[0]:5.2f} / {idle10[1]:5.2f}")
    print(f"  poll  5 ms (the notes)      {idle5[0]:5.2f} / {idle5[1]:5.2f}  ratio 10/5 ms", end="")
    print(f" {idle10[0] / max(idle5[0], 1e-9):.2f}x")
    return {
        "setup_calls_per_s": ours.rate, "setup_sipp_calls_per_s": peer.rate,
        "setup_median_ms": ours.median, "setup_sipp_median_ms": peer.median,
        "setup_cpu_ms_per_call": ours.cpu_ms, "setup_sipp_cpu_ms_per_call": peer.cpu_ms,
        "setup_failed": ours.failed, "idle_cpu_pct_poll_10ms": idle10[1],
    }  # fmt: skip


async def everything(args: argparse.Namespace) -> None:
    figures: dict[str, float] = {}
    if not args.no_setup:
        figures.update(await main(args.n, args.idle, args.rate, args.poll))
    if args.concurrent > 0:
        workers = args.workers if args.workers != "auto" else math.ceil(args.concurrent / 4)
        found = await run_concurrent(args.concurrent, int(workers), args.media_time)
        figures.update({f"concurrent_{k}": v for k, v in asdict(found).items() if k != "reasons"})
        print("failure reasons:", json.dumps(found.reasons, sort_keys=True))
    emit("sip_calls", **figures)  # the result line bench/run.py reads


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="calls per caller")
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds of idle CPU sampling per poll interval"
    )
    parser.add_argument("--rate", type=float, default=MAX_RATE, help="calls/s cap for the engine and SIPp")
    parser.add_argument(
        "--poll", type=float, default=0.01, help="the engine's poll interval (s) for the calls"
    )
    parser.add_argument(
        "--concurrent", type=int, default=16, help="simultaneous verified calls from one pool (0: skip)"
    )
    parser.add_argument(
        "--workers", default="auto", help="SIP worker processes for --concurrent (auto: ceil(N / 4))"
    )
    parser.add_argument("--media-time", type=float, default=9.0, help="seconds of media per call")
    parser.add_argument("--no-setup", action="store_true", help="skip the sequential call-setup part")
    args = parser.parse_args()
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be within (0, {MAX_RATE:g}]: the wheel's limit")
    if args.workers != "auto" and not (args.workers.isdigit() and 1 <= int(args.workers) <= 64):
        parser.error("--workers must be auto or a number from 1 to 64")
    asyncio.run(everything(args))
