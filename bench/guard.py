"""µs per URI of the live-number guard vs libphonenumber's own emergency test.

    .venv/bin/python bench/guard.py [--n 2000]

ecpm: ``probes.guard.check_dial_target`` (home region GB) on a mix of dial targets,
half test-endpoint numbers that pass and half emergency forms that are refused.
Peer: ``phonenumbers.shortnumberinfo.connects_to_emergency_number`` on the same dial
strings (the user part of each URI, percent-decoded, separators dropped). ``--n``
passes over the mix, warm (after one untimed pass), best of 5 blocks. The one-off cost of the first
call, and of the first pass over the whole mix, is measured in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402

# (URI ecpm judges, the dial string the peer judges, should ecpm refuse it)
MIX: list[tuple[str, str, bool]] = [
    ("sip:+442079460000@test.example.net", "+442079460000", False),
    ("sip:02079460123@192.0.2.10", "02079460123", False),
    ("tel:+1-202-555-0143", "+12025550143", False),
    ("sip:01632960001@test.example.net;user=phone", "01632960001", False),
    ("tel:+44-20-7946-0999", "+442079460999", False),
    ("sip:5550100@pbx.example.net", "5550100", False),
    ("sip:08081570000@test.example.net", "08081570000", False),
    ("sip:+33140000000@test.example.net", "+33140000000", False),
    ("sip:999@ims.example.net", "999", True),
    ("tel:112", "112", True),
    ("sip:9999@pbx.example.net", "9999", True),
    ("sip:141999@ims.example.net", "141999", True),
    ("sip:+44999@ims.example.net", "+44999", True),
    ("sip:%39%39%39@ims.example.net", "999", True),
    ("tel:0044-999", "0044999", True),
    ("sip:*67911@gw.example.net", "*67911", True),
]
WORDS = ["sip:ecpm-test@127.0.0.1:5090", "urn:service:test.sos", "urn:service:sos"]  # no digits: ecpm only


def ecpm_judge() -> Callable[[str], bool]:
    from probes.guard import GuardRefusal, check_dial_target  # noqa: PLC0415 - timed in --first

    def refused(uri: str) -> bool:
        try:
            check_dial_target(uri, declared_test_endpoint=True, home_region="GB")
        except GuardRefusal:
            return True
        return False

    return refused


def peer_judge() -> Callable[[str], bool]:
    from phonenumbers import shortnumberinfo  # noqa: PLC0415 - timed in --first

    def flagged(digits: str) -> bool:
        return bool(shortnumberinfo.connects_to_emergency_number(digits, "GB"))

    return flagged


def per_item_us(judge: Callable[[str], bool], items: list[str], passes: int, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of ``passes // repeats`` passes (other load only adds)."""
    for item in items:
        judge(item)
    each = max(1, passes // repeats)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(each):
            for item in items:
                judge(item)
        best = min(best, time.perf_counter() - start)
    return best / (each * len(items)) * 1e6


def first_call(side: str) -> None:
    """In a fresh interpreter: import, first call, first pass over the mix (ms, JSON)."""
    t0 = time.perf_counter()
    judge = ecpm_judge() if side == "ecpm" else peer_judge()
    items = [uri if side == "ecpm" else digits for uri, digits, _ in MIX]
    t1 = time.perf_counter()
    judge(items[0])
    t2 = time.perf_counter()
    for item in items[1:]:
        judge(item)
    t3 = time.perf_counter()
    ms = {"import": t1 - t0, "first": t2 - t1, "mix": t3 - t1}
    print(json.dumps({k: round(v * 1000, 3) for k, v in ms.items()}))


def fresh(side: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--first", side], capture_output=True, text=True, check=True, timeout=60
    )
    return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="timed passes over the mix")
    parser.add_argument("--first", choices=["ecpm", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first:
        first_call(args.first)
        return
    ecpm, peer = ecpm_judge(), peer_judge()
    wrong = [uri for uri, _, refuse in MIX if ecpm(uri) != refuse]
    if wrong:
        sys.exit(f"the mix is stale, ecpm judged these otherwise: {wrong}")
    flagged = sum(peer(digits) for _, digits, refuse in MIX if refuse)
    uris = [uri for uri, _, _ in MIX]
    digits = [d for _, d, _ in MIX]
    e_all = per_item_us(ecpm, uris, args.n)
    p_all = per_item_us(peer, digits, args.n)
    e_pass = per_item_us(ecpm, uris[:8], args.n)
    p_pass = per_item_us(peer, digits[:8], args.n)
    e_ref = per_item_us(ecpm, uris[8:], args.n)
    p_ref = per_item_us(peer, digits[8:], args.n)
    e_words = per_item_us(ecpm, WORDS, args.n)
    fe, fp = fresh("ecpm"), fresh("peer")
    print(f"guard: {len(MIX)} dial targets (8 pass, 8 refused), {args.n} warm passes, home region GB")
    print(f"{'':34} {'ecpm guard':>11} {'phonenumbers':>13} {'ratio':>7}")
    rows = [
        ("µs per URI, whole mix", e_all, p_all),
        ("µs per URI, passing half", e_pass, p_pass),
        ("µs per URI, emergency half", e_ref, p_ref),
        ("ms import (fresh process)", fe["import"], fp["import"]),
        ("ms first call (fresh process)", fe["first"], fp["first"]),
        ("ms first pass over the mix", fe["mix"], fp["mix"]),
    ]
    for name, e, p in rows:
        print(f"{name:34} {e:11.2f} {p:13.2f} {e / p:6.1f}x")
    print(f"{'µs per URI, non-numeric forms':34} {e_words:11.2f} {'-':>13} {'-':>7}")
    print(f"emergency forms refused: ecpm {len(MIX) - 8}/8, phonenumbers flags {flagged}/8")
    emit("guard", us_per_target=e_all, peer_us_per_target=p_all, ms_first_pass=fe["mix"],
         peer_ms_first_pass=fp["mix"], refused=len(MIX) - 8, peer_flagged=flagged)  # fmt: skip


if __name__ == "__main__":
    main()
