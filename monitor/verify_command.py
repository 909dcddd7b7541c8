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
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ecpm.configfile import load_config, parse_duration, secret_text
from ecpm.errors import UsageError
from monitor.config import MonitorConfig

POLL = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target id to verify")
    parser.add_argument("--probe", action="append", default=[], help="ask only this probe (repeatable)")
    parser.add_argument("--required", type=int, help="passes needed (default: every probe asked)")
    parser.add_argument("--change-ref", help="change reference stored with the verification, e.g. CHG-1234")
    parser.add_argument("--timeout", type=parse_duration, default=60.0, metavar="DURATION",
                        help="give up after this long (default 60s)")  # fmt: skip
    where = parser.add_argument_group("monitor (config, or URL and token)")
    where.add_argument("-c", "--config", help="monitor config: its http.listen and http.token")
    where.add_argument("--monitor", help="monitor base URL, e.g. http://127.0.0.1:9470")
    where.add_argument(
        "--token-file", help="file holding the monitor's API token (or set ECPM_MONITOR_TOKEN)"
    )


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    url, token = args.monitor, os.environ.get("ECPM_MONITOR_TOKEN")
    if args.config:
        config = load_config(args.config, MonitorConfig)
        url = url or f"http://{config.http.listen}"
        token = token or secret_text(config.http, "token")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read token file {args.token_file}: {exc.strerror}") from None
    if not url:
        raise UsageError("say which monitor: -c monitor.yaml or --monitor URL")
    if not token:
        raise UsageError("the monitor's API token is needed: --token-file, ECPM_MONITOR_TOKEN or http.token")
    return url.rstrip("/"), token


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the monitor at {url}: {exc}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code != 200:
        raise UsageError(
            f"monitor refused ({response.status_code}): {data.get('error', response.text[:200])}"
        )
    return dict(data)


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
    base, token = _endpoint(args)
    body: dict[str, Any] = {"target": args.target, "timeout": args.timeout}
    if args.probe:
        body["probes"] = args.probe
    if args.required is not None:
        body["required"] = args.required
    if args.change_ref:
        body["change_ref"] = args.change_ref
    started = time.monotonic()
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        view = _post(client, f"{base}/api/v1/verify", body)
        tty, shown = sys.stderr.isatty(), ""
        while view["state"] == "pending":
            line = _progress(view, started)
            if tty:  # one line, updated in place
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif line.split("]")[0] != shown:  # logs: a new line only when an answer arrives
                shown = line.split("]")[0]
                print(line, file=sys.stderr, flush=True)
            time.sleep(POLL)
            view = _post(client, f"{base}/api/v1/verify_status", {"request_id": view["request_id"]})
        if tty:
            print(file=sys.stderr)
    ref = f" for {view['change_ref']}" if view["change_ref"] else ""
    passed = sum(1 for a in view["probes"].values() if a is not None and a["outcome"] == "pass")
    print(f"verify {view['target']}{ref} ({view['request_id']}): {view['state'].upper()}"
          f" — {passed} of {view['required']} required passes")  # fmt: skip
    print(_table(view))
    return 0 if view["state"] == "pass" else 1
