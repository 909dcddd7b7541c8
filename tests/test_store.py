"""The store's hash chain and ``ecpm ledger verify``: tampering is found and named."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from monitor.store import GENESIS, SqliteStore, chain_hash
from tests.support.monitor import T0, ProbeSim


def filled(tmp_path: Path, n: int = 5) -> tuple[SqliteStore, str]:
    path = str(tmp_path / "m.db")
    store = SqliteStore(path)
    sim = ProbeSim("p1")
    for i in range(n):
        at = T0 + timedelta(seconds=10 * i)
        assert store.add_result(sim.result("t1", "pass", at), at)
    store.commit()
    return store, path


def ledger(db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_chain_verifies_and_links_every_row(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    report = store.verify_chain()
    assert (report.ok, report.rows) == (True, 5)
    rows = list(store.iter_chain())
    assert rows[0][3] == GENESIS
    assert all(rows[i][3] == rows[i - 1][4] for i in range(1, 5))
    assert report.last_hash == rows[-1][4] == chain_hash(rows[-1][3], rows[-1][2])
    done = ledger(path)
    assert done.returncode == 0
    assert done.stdout == f"ok: 5 results, chain intact; last hash {report.last_hash}\n"


def test_duplicate_id_is_not_stored_twice(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    once = ProbeSim("p1").result("t1", "pass", T0)
    assert store.add_result(once, T0) is True
    assert store.add_result(once, T0) is False
    store.commit()
    assert store.verify_chain().rows == 1


def test_altered_row_is_named(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE results SET payload = replace(payload, '\"pass\"', '\"fail\"') WHERE row = 3")
    db.commit()
    db.close()
    report = SqliteStore(path).verify_chain()
    assert (report.ok, report.first_broken_row) == (False, 3)
    assert "altered" in (report.problem or "")
    done = ledger(path)
    assert done.returncode == 1
    assert done.stdout.startswith("BROKEN at row 3 (result ")
    assert "2 rows before it verified" in done.stdout


def test_removed_row_is_named(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM results WHERE row = 2")
    db.commit()
    db.close()
    report = SqliteStore(path).verify_chain()
    assert (report.ok, report.first_broken_row) == (False, 3)
    assert "removed or reordered" in (report.problem or "")


def test_prune_reanchors_the_chain(tmp_path: Path) -> None:
    store, _ = filled(tmp_path)
    assert store.prune(T0 + timedelta(seconds=25)) == 3
    report = store.verify_chain()
    assert (report.ok, report.rows) == (True, 2)
    sim = ProbeSim("p1")
    sim.seq = 10
    store.add_result(sim.result("t1", "pass", T0 + timedelta(seconds=100)), T0)
    store.commit()
    assert store.verify_chain().ok


def test_a_past_dated_result_does_not_take_the_ledger_with_it(tmp_path: Path) -> None:
    store, _ = filled(tmp_path)
    sim = ProbeSim("p1")
    sim.seq = 100
    # a probe that booted with its clock in 1970 sends one result, received now
    store.add_result(sim.result("t1", "pass", T0.replace(year=1970)), T0 + timedelta(seconds=60))
    store.commit()
    assert store.prune(T0 + timedelta(seconds=15)) == 2  # only the two oldest by receive time
    assert store.verify_chain().rows == 4


def test_an_altered_column_is_found_even_when_the_payload_is_intact(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE results SET finished_at = '2001-01-01T00:00:00.000Z' WHERE row = 4")
    db.commit()
    db.close()
    report = SqliteStore(path).verify_chain()
    assert (report.ok, report.first_broken_row) == (False, 4)
    assert "columns differ" in (report.problem or "")


def test_ledger_with_config_checks_every_signature(tmp_path: Path) -> None:
    store, path = filled(tmp_path, 3)
    forged = ProbeSim("p1", key="not-the-probes-key")
    forged.seq = 3
    store.add_result(forged.result("t1", "fail", T0 + timedelta(seconds=40)), T0 + timedelta(seconds=40))
    store.commit()
    store.close()
    config = tmp_path / "m.yaml"
    config.write_text(
        f"kind: monitor\nstore: {{path: {path}}}\n"
        "probes: [{id: p1, key: key-of-p1}]\ntargets: [{id: t1}]\n"
    )
    assert ledger(path).returncode == 0  # the chain alone is intact: the row was chained when stored
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.startswith("BROKEN at row 4 ") and "signature does not verify" in done.stdout


def test_ledger_without_store_is_a_usage_error(tmp_path: Path) -> None:
    done = ledger(str(tmp_path / "nothing.db"))
    assert done.returncode == 2
    assert "no store at" in done.stderr
    assert "Traceback" not in done.stderr
