"""``ecpm incident ack``: acknowledge a notification duty of an incident, or the incident.

    ecpm incident ack 42 --duty us-fcc-psap --ref "PSAP log 4711" -c /etc/ecpm/monitor.yaml
    ecpm incident ack 42 --ref INC-9 --monitor http://127.0.0.1:9470 --token-file /run/ecpm/token

It asks the monitor (the token-protected ``incident_ack`` action, as ``ecpm verify`` asks
for ``verify``) to record who acknowledged what, when, and the reference given: with
``--duty`` that duty (met if acknowledged by its due time, ``monitor.duties``), without it
the incident itself, which stops its escalation pages but leaves it open and shown. It
prints the incident's duties and exits 0, or 2 when the monitor refuses (no such incident
or duty, a bad reference, no token) or cannot be asked.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from monitor.api_client import add_monitor_arguments, client, endpoint, post


def _incident_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not an incident id: {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["ack"], help="ack: acknowledge a duty or the incident")
    parser.add_argument("incident", type=_incident_id, metavar="ID", help="incident id (the status page's #)")
    parser.add_argument("--duty", help="the duty done, e.g. us-fcc-psap (default: the incident itself)")
    parser.add_argument(
        "--ref", required=True, help="the reference recorded with it, e.g. a NORS filing number"
    )
    parser.add_argument("--by", help="who acknowledges (default: this login name)")
    add_monitor_arguments(parser)


def _table(incident: dict[str, Any]) -> str:
    rows = [("DUTY", "DUE", "STATUS", "ACKNOWLEDGED", "BY", "REFERENCE")]
    for d in incident["duties"]:
        a = d["ack"] or {}
        rows.append(
            (d["name"], d["due_at"], d["status"], a.get("at") or "-", a.get("by") or "-", a.get("ref") or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    base, token = endpoint(args)
    body: dict[str, Any] = {"incident": args.incident, "ref": args.ref, "by": args.by or getpass.getuser()}
    if args.duty:
        body["duty"] = args.duty
    with client(token) as http:
        incident = post(http, f"{base}/api/v1/incident_ack", body)["incident"]
    what = f"duty {args.duty}" if args.duty else "the incident (no more escalation pages)"
    print(
        f"incident {incident['id']} ({incident['target']} {incident['kind']}, {incident['state']}):"
        f" acknowledged {what}"
    )
    if incident["duties"]:
        print(_table(incident))
    return 0
