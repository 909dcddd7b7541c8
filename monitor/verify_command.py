"""``ecpm verify``: the post-change gate a deploy pipeline runs right after a change.

    ecpm verify --target uk-999 --change-ref CHG-1234 -c /etc/ecpm/monitor.yaml
    ecpm verify --target uk-999 --monitor http://127.0.0.1:9470 --token-file /run/ecpm/token

It asks the monitor (token-protected API) to have every probe covering the target —
or the ``--probe``s named — place a test call now, shows which probes have
answered, prints a table and exits 0 only if the path passed from the required
number of probes, 1 if it did not (or not in time), 2 on usage errors or when the
monitor cannot be asked at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ecpm.configfile import parse_duration
from monitor.api_client import add_monitor_arguments, client, endpoint, post

POLL = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target id to verify")
    parser.add_argument("--probe", action="append", default=[], help="ask only this probe (repeatable)")
    parser.add_argument("--required", type=int, help="passes needed (default: every probe asked)")
    parser.add_argument("--change-ref", help="change reference stored with the verification, e.g. CHG-1234")
    parser.add_argument("--timeout", type=parse_duration, default=60.0, metavar="DURATION",
                        help="give up after this long (default 60s)")  # fmt: skip
    add_monitor_arguments(parser)


def _progress(view: dict[str, Any], started: float) -> str:
    marks = []
    for probe, answer in view["probes"].items():
        marks.append(
            f"{probe} …" if answer is None else f"{probe} {'✓' if answer['outcome'] == 'pass' else '✗'}"
        )
    answered = sum(1 for a in view["probes"].values() if a is not None)
    return f"{answered}/{len(view['probes'])} answered [{', '.join(marks)}] {time.monotonic() - started:.1f}s"


def _table(view: dict[str, Any]) -> str:
    rows = [("PROBE", "OUTCOME", "STAGE", "SIP", "POST-DIAL DELAY", "MOS")]
    for probe, a in view["probes"].items():
        if a is None:
            rows.append((probe, "no result", "-", "-", "-", "-"))
            continue
        sip = f"{a['sip_status']} {a['sip_reason'] or ''}".strip() if a["sip_status"] else "-"
        pdd = "-" if a["post_dial_delay_seconds"] is None else f"{a['post_dial_delay_seconds']:.3f}s"
        mos = "-" if a["mos"] is None else f"{a['mos']:.2f}"
        rows.append((probe, a["outcome"], a["stage"] or "-", sip, pdd, mos))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    base, token = endpoint(args)
    body: dict[str, Any] = {"target": args.target, "timeout": args.timeout}
    if args.probe:
        body["probes"] = args.probe
    if args.required is not None:
        body["required"] = args.required
    if args.change_ref:
        body["change_ref"] = args.change_ref
    started = time.monotonic()
    with client(token) as http:
        view = post(http, f"{base}/api/v1/verify", body)
        tty, shown = sys.stderr.isatty(), ""
        while view["state"] == "pending":
            line = _progress(view, started)
            if tty:  # one line, updated in place
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif line.split("]")[0] != shown:  # logs: a new line only when an answer arrives
                shown = line.split("]")[0]
                print(line, file=sys.stderr, flush=True)
            time.sleep(POLL)
            view = post(http, f"{base}/api/v1/verify_status", {"request_id": view["request_id"]})
        if tty:
            print(file=sys.stderr)
    ref = f" for {view['change_ref']}" if view["change_ref"] else ""
    passed = sum(1 for a in view["probes"].values() if a is not None and a["outcome"] == "pass")
    print(f"verify {view['target']}{ref} ({view['request_id']}): {view['state'].upper()}"
          f" — {passed} of {view['required']} required passes")  # fmt: skip
    print(_table(view))
    return 0 if view["state"] == "pass" else 1
