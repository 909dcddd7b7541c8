"""SIP call setup: ecpm's engine vs SIPp's UAC, against the same SIPp UAS.

    .venv/bin/python bench/sip_calls.py [--n 200] [--idle 3] [--rate 40] [--poll 0.01]

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
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.config import SipSettings  # noqa: E402
from probes.guard import Guard  # noqa: E402
from probes.sip import CallOptions, Dial, SipEngine  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402
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
    """SIPp's built-in UAS on a free loopback port, its output in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        cmd = [
            peer_path("sipp"), "-sn", "uas", "-i", HOST, "-p", str(self.port), "-mi", HOST,
            "-mp", str(free_port()), "-nostdin", "-timeout", "120s",
        ]  # fmt: skip
        super().__init__("sipp-uas", cmd, tmp)
        self.start()
        time.sleep(0.3)
        if not self.running:
            raise RuntimeError(f"SIPp UAS did not start: {self.tail()}")


async def main(n: int, idle: float, rate: float, poll: float) -> None:
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
    args = parser.parse_args()
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be within (0, {MAX_RATE:g}]: the wheel's limit")
    asyncio.run(main(args.n, args.idle, args.rate, args.poll))
