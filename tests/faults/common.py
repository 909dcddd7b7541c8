"""What every fault case asserts at its end, and the small waits they share.

The ledger: each probe's outbox numbered its results seq 1..N (``meta.seq``), and
holds the ones not yet published or not yet acknowledged by the monitor. A result is
**lost** when its seq is neither in the monitor's store nor still held by its probe's
outbox (held ones are published again, unchanged, when the probe comes back). A
**duplicate** is a second store row for one (probe, seq). Both must be zero.

``settle`` runs while the probes still run (a gap can be repaired only by a probe that
is up to republish it), then stops them and reads their outboxes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from tests.support.system import System

REQUIRE_PEERS = os.environ.get("ECPM_REQUIRE_PEERS") == "1"

# metric sample names, as exposed on the monitor's /metrics
MISSING = "ecpm_results_missing_total"  # detected missing (older than gap repair)
REPAIRED = "ecpm_results_repaired_total"
UNRECOVERABLE = "ecpm_results_unrecoverable_total"
OUTSTANDING = "ecpm_results_outstanding"  # gauge: missing now
MQTT_CONNECTED = "ecpm_monitor_mqtt_connected"
PROBE_LOST = "ecpm_probe_results_lost_total"  # as the probe reports it in its status
OUTBOX_ERROR = "ecpm_probe_outbox_error"
CLOCK_SKEW = "ecpm_probe_clock_skew_seconds"


@dataclass(frozen=True, slots=True)
class Ledger:
    numbered: dict[str, int]  # probe → N (seq 1..N handed out)
    held: dict[str, set[int]]  # probe → seqs still in its outbox
    stored: dict[str, list[int]]  # probe → seqs in the monitor's store (with repeats)

    def lost(self, probe: str) -> list[int]:
        have = set(self.stored.get(probe, ())) | self.held[probe]
        return [seq for seq in range(1, self.numbered[probe] + 1) if seq not in have]

    def duplicates(self) -> dict[tuple[str, int], int]:
        rows = Counter((p, seq) for p, seqs in self.stored.items() for seq in seqs)
        return {key: n for key, n in rows.items() if n > 1}


def stored_by_probe(system: System) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for probe, seq, _ in system.stored():
        out.setdefault(probe, []).append(seq)
    return out


def holes(seqs: Iterable[int]) -> list[int]:
    """Seqs missing below the highest one stored."""
    have = set(seqs)
    return [seq for seq in range(1, max(have, default=0) + 1) if seq not in have]


def metric_of(system: System, name: str, probe: str) -> float:
    value = system.metric(name, probe=probe)
    if value is None:
        raise AssertionError(f"the monitor exports no {name}{{probe={probe!r}}}")
    return value


def settle(
    system: System, *, repair: bool = False, lost: dict[str, int] | None = None, timeout: float | None = None
) -> Ledger:
    """Let delivery finish, stop the probes, and assert the ledger: nothing lost (beyond
    ``lost``: probe → how many results its disk could not keep, each a seq that must be
    missing), no duplicate rows.

    ``repair``: the case made gaps on purpose; wait (probes running) until the monitor
    says none is outstanding (``ecpm_results_outstanding`` 0) and the store has no hole,
    and at the end assert that every missing result was repaired, none unrecoverable."""
    expected_lost = lost or {}
    probes = list(system.probes)

    def caught_up() -> bool:
        stored = stored_by_probe(system)
        for probe in probes:
            # the metric first: a monitor without replay fails here at once, by name
            if repair and metric_of(system, OUTSTANDING, probe) != 0:
                return False
            if len(holes(stored.get(probe, ()))) != expected_lost.get(probe, 0):
                return False
        return True

    what = "every gap repaired (outstanding 0, no hole in the store)" if repair else "no hole in the store"
    try:
        system.wait_for(caught_up, timeout or (90 if repair else 30), what)
    except AssertionError as error:
        stored = stored_by_probe(system)
        report = {p: holes(stored.get(p, ()))[:20] for p in probes}
        raise AssertionError(f"{error}; holes per probe (first 20): {report}") from None
    for probe in probes:
        system.probes[probe].stop()
    numbered, held = {}, {}
    for probe in probes:
        numbered[probe], held[probe] = system.outbox_numbers(probe)

    def tail_stored() -> bool:
        stored = stored_by_probe(system)
        ledger = Ledger(numbered, held, stored)
        return all(len(ledger.lost(p)) == expected_lost.get(p, 0) for p in probes)

    with contextlib.suppress(AssertionError):  # the asserts below say exactly what is missing
        system.wait_for(tail_stored, 30, "the store to hold every result the outboxes released")
    ledger = Ledger(numbered, held, stored_by_probe(system))
    for probe in probes:
        missing = ledger.lost(probe)
        assert len(missing) == expected_lost.get(probe, 0), (
            f"{probe}: {len(missing)} of {numbered[probe]} results lost (expected "
            f"{expected_lost.get(probe, 0)}): {missing[:30]}"
        )
    assert ledger.duplicates() == {}, f"duplicate rows: {ledger.duplicates()}"
    if repair:  # every gap closed by replay: nothing outstanding, nothing given up
        for probe in probes:
            assert metric_of(system, OUTSTANDING, probe) == 0
            assert metric_of(system, UNRECOVERABLE, probe) == 0
            assert metric_of(system, REPAIRED, probe) == metric_of(system, MISSING, probe)
    return ledger


def incidents(system: System) -> list[tuple[int, str, str, bool]]:
    """(id, target, kind, resolved) of every incident in the monitor's store."""
    db = sqlite3.connect(system.workdir / "monitor.db", timeout=10)
    try:
        rows = db.execute("SELECT id, target, kind, resolved_at IS NOT NULL FROM incidents ORDER BY id")
        return [(int(i), str(t), str(k), bool(r)) for i, t, k, r in rows]
    finally:
        db.close()


def need_root(why: str) -> None:
    """Skip (fail under ECPM_REQUIRE_PEERS=1) a case that needs root."""
    if os.geteuid() == 0:
        return
    message = f"needs root: {why}"
    if REQUIRE_PEERS:
        pytest.fail(f"{message} (ECPM_REQUIRE_PEERS=1)", pytrace=False)
    pytest.skip(message)
