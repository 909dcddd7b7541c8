"""Where one SIP worker's CPU goes: per-thread CPU of one worker process, idle and
during ``--calls`` verified echo calls at once (a SIPp UAS with ``-rtp_echo``).

    .venv/bin/python bench/sip_worker_profile.py [--calls 4] [--media-time 9] [--idle 5]

Threads are named by what they are: ``asyncio`` (the worker's main thread), ``pjsua2``
(the engine's thread, the first one started), ``media`` and ``clock`` (pjmedia's),
``to_thread`` (the offline tone analysis). CPU is utime+stime from /proc/PID/task.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sip_calls import Uas, echo_config  # noqa: E402
from probes.guard import Guard  # noqa: E402
from probes.workers import WorkerPool  # noqa: E402
from tests.support.net import HOST  # noqa: E402


def threads(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (comm, CPU seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def label(pid: int, tid: int, name: str, order: list[int]) -> str:
    if tid == pid:
        return "asyncio"
    if name != "python":
        return name
    return "pjsua2" if tid == order[0] else "to_thread"


def report(
    pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    order = sorted(t for t, (n, _) in after.items() if n == "python" and t != pid)
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        key = label(pid, tid, name, order)
        out[key] = out.get(key, 0.0) + used
    return out


async def main(calls: int, media_time: float, idle: float) -> None:
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        uas = Uas(Path(tmp), echo=True)
        config = echo_config(f"sip:ecpm-test@{HOST}:{uas.port}", calls, 1, media_time)
        try:
            async with WorkerPool(config, Guard(home_region="GB")) as pool:
                pid = pool.pids()[0]
                assert pid is not None
                await asyncio.sleep(1.0)
                before = threads(pid)
                await asyncio.sleep(idle)
                idle_cpu = report(pid, before, threads(pid))
                before, start = threads(pid), time.monotonic()
                results = await asyncio.gather(*(pool.run(t, "invite") for t in config.targets))
                wall = time.monotonic() - start
                busy = report(pid, before, threads(pid))
        finally:
            uas.stop()
    passed = sum(r.outcome == "pass" for r in results)
    print(
        f"one SIP worker: idle {idle:g} s,"
        f" then {calls} verified echo calls of {media_time:g} s ({wall:.1f} s)"
    )
    print(f"{'thread':12} {'idle ms/s':>10} {'calls: ms per call':>19}")
    for key in sorted(set(idle_cpu) | set(busy)):
        print(f"{key:12} {idle_cpu.get(key, 0) / idle * 1000:10.1f} {busy.get(key, 0) / calls * 1000:19.1f}")
    total = sum(busy.values()) / calls * 1000
    print(
        f"{'total':12} {sum(idle_cpu.values()) / idle * 1000:10.1f} {total:19.1f}   passed {passed}/{calls}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=4, help="calls at once (at most 4: one worker)")
    parser.add_argument("--media-time", type=float, default=9.0, help="seconds of media per call")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle sampling")
    args = parser.parse_args()
    if not 1 <= args.calls <= 4:
        parser.error("--calls must be 1 to 4 (one worker's call slots)")
    asyncio.run(main(args.calls, args.media_time, args.idle))
