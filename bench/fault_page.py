"""Fault → page: from a fault on the path to the monitor's page, per fault kind.

    .venv/bin/python bench/fault_page.py [--faults 5] [--interval 10s] [--kinds answer_503,...]

Real processes on loopback: mosquitto, one ``ecpm responder`` (its shipped defaults)
behind a UDP relay in this script, two ``ecpm probe``s calling it with the **shipped
defaults** except ``interval`` (10 s, as the issue's figure), and ``ecpm monitor`` with
its shipped ``reachability`` (K = 2 results, M = 2 probes) except ``resolve_after: 1s``,
which only shortens the recovery between faults. The monitor's webhook pager posts to a
receiver here. Faults, round robin so that load falls on every kind alike: the
responder's ``answer_503``, ``never_answer``, ``no_media``, ``one_way_media`` (its
control API) and ``black_hole`` (the relay drops every datagram both ways: no response
at all). Each fault starts at a random phase of the probes' schedule (a random 0 to
``interval`` after the path is up again) and is timed from the moment it is set to the
page's arrival at the receiver; then it is cleared and the script waits for the
resolve and for the path to be up. p95 is the nearest rank of the faults of that kind
(with fewer than 20 of a kind, their maximum). The p95 budget is docs/checks.md's: the
later of two probes' next calls (0.975 × interval), the call, 0.3 s to the page.

There is no peer process to run against (the issue's peers are a commercial service's
180 s and an outage found after 11 days); each figure is put against the goal (15 s)
and against its budget (docs/checks.md, "From fault to page").
"""

from __future__ import annotations

import argparse
import math
import random
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402
from ecpm.configfile import parse_duration  # noqa: E402
from tests.support.net import HOST  # noqa: E402
from tests.support.processes import Process  # noqa: E402
from tests.support.sip import ResponderProcess  # noqa: E402
from tests.support.system import System  # noqa: E402

TARGET = "path"
PROBES = ("probe-a", "probe-b")
KINDS = ("answer_503", "never_answer", "black_hole", "no_media", "one_way_media")
GOAL = 15.0
# what a failing call costs with the shipped defaults (docs/checks.md, "From fault to page")
CALL_BUDGET = {
    "answer_503": 0.1,
    "never_answer": 4.0,  # answer_timeout
    "black_hole": 3.0,  # first_response_timeout
    "no_media": 2.1,  # answer + media_time, reported before the announcement
    "one_way_media": 2.1,  # answer + media_time
}


class Relay:
    """UDP in front of the responder's SIP port: forwards datagrams both ways, one upstream
    socket per client (so the responder answers each through the relay), or drops them all
    while ``black_hole`` is set. SIP only: the media goes straight to the SDP's addresses."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.black_hole = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self._clients: dict[tuple[str, int], socket.socket] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            by_sock = {s: addr for addr, s in self._clients.items()}
            readable, _, _ = select.select([self.sock, *by_sock], [], [], 0.2)
            for s in readable:
                data, addr = s.recvfrom(65535)
                if s is self.sock:
                    out = self._clients.get(addr)
                    if out is None:
                        out = self._clients[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        out.bind((HOST, 0))
                        out.connect(self.upstream)
                    if not self.black_hole:
                        out.send(data)
                elif not self.black_hole:
                    self.sock.sendto(data, by_sock[s])

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for s in [self.sock, *self._clients.values()]:
            s.close()


def probe_config(system: System, probe: str, uri: str, interval: str) -> dict[str, Any]:
    return {
        "kind": "probe",
        "probe": {"id": probe, "region": "GB", "key": system.probe_key(probe)},
        "sip": {"bind": HOST, "transports": ["udp"]},
        "mqtt": {"host": system.broker.host, "port": system.broker.port},
        "outbox": {"path": str(system.workdir / f"{probe}-outbox.db")},
        "targets": [
            {"id": TARGET, "uri": uri, "test_endpoint": True, "checks": {"invite": {"interval": interval}}}
        ],
    }


def pages(system: System, event: str) -> list[tuple[float, dict[str, Any]]]:
    """(receipt time, incident) of each page of that event ("trigger", "resolve") so far."""
    return [
        (d.at, d.body["incident"])
        for d in system.receiver.deliveries()
        if d.body.get("event") == event and d.body["incident"].get("target") == TARGET
    ]


def wait_page(system: System, event: str, seen: int, what: str) -> tuple[float, dict[str, Any]]:
    """The first page of ``event`` after the ``seen`` ones already received."""

    def new() -> tuple[float, dict[str, Any]] | None:
        found = pages(system, event)
        return found[seen] if len(found) > seen else None

    page = system.wait_for(new, 120, what, list(system.probes.values()))
    assert page is not None  # wait_for returns only what is truthy
    return page


def one_fault(system: System, responder: ResponderProcess, relay: Relay, kind: str) -> tuple[float, str]:
    """Set the fault, wait for its page, clear it, wait until the path is up again:
    (seconds from the fault to the page, the incident's summary)."""
    seen = len(pages(system, "trigger"))
    resolved = len(pages(system, "resolve"))
    fault_at = time.monotonic()
    set_fault(responder, relay, kind)
    at, incident = wait_page(system, "trigger", seen, f"the page for {kind}")
    set_fault(responder, relay, "none")
    wait_page(system, "resolve", resolved, f"the resolve after {kind}")
    system.wait_state(TARGET, "up", timeout=120)
    return at - fault_at, str(incident.get("summary", ""))


def set_fault(responder: ResponderProcess, relay: Relay, kind: str) -> None:
    relay.black_hole = kind == "black_hole"
    fault = "none" if kind in ("black_hole", "none") else kind
    status, body = responder.http("PUT", "/fault", fault)
    assert status == 200, (status, body)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=5, help="faults of each kind")
    ap.add_argument("--interval", default="10s", help="the probes' invite interval")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    interval = parse_duration(args.interval)
    rng = random.Random(args.seed)
    took: dict[str, list[float]] = {k: [] for k in kinds}
    why: dict[str, set[str]] = {k: set() for k in kinds}
    with (
        tempfile.TemporaryDirectory(prefix="ecpm-bench-fault-") as tmp,
        System(
            Path(tmp),
            interval=args.interval,
            reachability={"resolve_after": "1s"},
            monitor={"store": {"path": str(Path(tmp) / "monitor.db")}},  # the shipped commit_interval
        ) as system,
    ):
        responder = ResponderProcess("--ring-time", "50ms")  # the responder's default ring
        relay = Relay((HOST, responder.port))
        try:
            system.targets.add(TARGET)
            uri = f"sip:ecpm-test@{HOST}:{relay.port}"
            for probe in PROBES:
                system.probes[probe] = Process("probe", probe_config(system, probe, uri, args.interval),
                                               system.workdir, probe)  # fmt: skip
            system.start_monitor()
            system.wait_state(TARGET, "up", timeout=60)
            for n in range(args.faults):
                for kind in kinds:
                    time.sleep(rng.uniform(0.0, interval))  # a random phase of the schedule
                    seconds, summary = one_fault(system, responder, relay, kind)
                    took[kind].append(seconds)
                    why[kind].add(summary)
                    print(
                        f"{n + 1}/{args.faults} {kind}: paged after {seconds:.1f} s ({summary})", flush=True
                    )
        finally:
            relay.close()
            responder.stop()
    print(f"\nfault → page (monitor webhook), {args.interval} interval, {len(PROBES)} probes, "
          f"{args.faults} faults of each kind, shipped defaults\n")  # fmt: skip
    print("| fault | p95 s | median s | min–max s | goal | p95 budget s | paged as |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        values = took[kind]
        budget = 0.975 * interval + CALL_BUDGET[kind] + 0.3
        verdict = "met" if p95(values) <= GOAL else "**missed**"
        print(f"| `{kind}` | **{p95(values):.1f}** | {statistics.median(values):.1f} | "
              f"{min(values):.1f}–{max(values):.1f} | {verdict} | {budget:.1f} | "
              f"{'; '.join(sorted(why[kind]))} |")  # fmt: skip
    figures = {f"p95_{kind}": p95(took[kind]) for kind in kinds}
    figures.update({f"max_{kind}": max(took[kind]) for kind in kinds})
    emit("fault_page", faults_per_kind=args.faults, **figures)


if __name__ == "__main__":
    main()
