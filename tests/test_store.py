"""The store's hash chain and ``ecpm ledger verify``: tampering is found and named.

Tests taking ``store_where`` run on both backends (a SQLite file, a PostgreSQL database:
``tests/support/postgres.py``); those that alter the SQLite file with ``sqlite3`` itself,
or read its bytes, are SQLite-only (``tmp_path``), and PostgreSQL's own are at the end.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor.store import GENESIS, SqliteStore, Store, StoreError, chain_hash, is_url, open_store
from tests.support.monitor import T0, ProbeSim, key_for


def filled(where: Path | str, n: int = 5) -> tuple[Store, str]:
    """A store with ``n`` results: at ``where`` (``store_where``), or a SQLite file in a
    ``tmp_path``."""
    path = str(where) if isinstance(where, str) else str(where / "m.db")
    store = open_store(path)
    sim = ProbeSim("p1")
    for i in range(n):
        at = T0 + timedelta(seconds=10 * i)
        assert store.add_result(sim.result("t1", "pass", at), at)
    store.commit()
    return store, path


def ledger(db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", "--url" if is_url(db) else "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def raw(where: str) -> Any:
    """Another connection to the store, as another process has it (autocommit)."""
    if is_url(where):
        import psycopg  # noqa: PLC0415 - the postgres runs only

        return psycopg.connect(where, autocommit=True)
    return sqlite3.connect(where)


def store_yaml(where: str) -> str:
    return f"{{backend: postgres, url: '{where}'}}" if is_url(where) else f"{{path: {where}}}"


def test_chain_verifies_and_links_every_row(store_where: str) -> None:
    store, path = filled(store_where)
    report = store.check_chain()
    assert (report.ok, report.rows) == (True, 5)
    rows = list(store.iter_chain())
    assert rows[0][3] == GENESIS
    assert all(rows[i][3] == rows[i - 1][4] for i in range(1, 5))
    assert report.last_hash == rows[-1][4] == chain_hash(rows[-1][3], rows[-1][2])
    done = ledger(path)
    assert done.returncode == 0
    assert done.stdout == f"ok: 5 results, chain intact; last hash {report.last_hash}\n"


def test_duplicate_id_is_not_stored_twice(store_where: str) -> None:
    store = open_store(store_where)
    once = ProbeSim("p1").result("t1", "pass", T0)
    assert store.add_result(once, T0) is True
    assert store.add_result(once, T0) is False
    store.commit()
    assert store.check_chain().rows == 1


# SQLite-only: alters the file with sqlite3
def test_altered_row_is_named(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE results SET payload = replace(payload, '\"pass\"', '\"fail\"') WHERE row = 3")
    db.commit()
    db.close()
    report = SqliteStore(path).check_chain()
    assert (report.ok, report.first_broken_row) == (False, 3)
    assert "altered" in (report.problem or "")
    done = ledger(path)
    assert done.returncode == 1
    assert done.stdout.startswith("BROKEN at row 3 (result ")
    assert "2 rows before it verified" in done.stdout


# SQLite-only: alters the file with sqlite3
def test_removed_row_is_named(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM results WHERE row = 2")
    db.commit()
    db.close()
    report = SqliteStore(path).check_chain()
    assert (report.ok, report.first_broken_row) == (False, 3)
    assert "removed or reordered" in (report.problem or "")


def test_prune_reanchors_the_chain(store_where: str) -> None:
    store, _ = filled(store_where)
    assert store.prune(T0 + timedelta(seconds=25)) == 3
    report = store.check_chain()
    assert (report.ok, report.rows) == (True, 2)
    sim = ProbeSim("p1")
    sim.seq = 10
    store.add_result(sim.result("t1", "pass", T0 + timedelta(seconds=100)), T0)
    store.commit()
    assert store.check_chain().ok


def test_a_past_dated_result_does_not_take_the_ledger_with_it(store_where: str) -> None:
    store, _ = filled(store_where)
    sim = ProbeSim("p1")
    sim.seq = 100
    # a probe that booted with its clock in 1970 sends one result, received now
    store.add_result(sim.result("t1", "pass", T0.replace(year=1970)), T0 + timedelta(seconds=60))
    store.commit()
    assert store.prune(T0 + timedelta(seconds=15)) == 2  # only the two oldest by receive time
    assert store.check_chain().rows == 4


def test_a_version_holding_a_nul_is_stored_and_verifies(store_where: str) -> None:
    store = open_store(store_where)
    result = replace(ProbeSim("p1").result("t1", "pass", T0), version="0.1\x00x").signed(key_for("p1"))
    assert store.add_result(result, T0)  # PostgreSQL's text cannot hold it, SQLite's json_extract stops at it
    store.commit()
    report = store.check_chain(read=True)
    assert (report.ok, report.quarantined) == (True, ())
    assert [r.version for r in store.results_between(T0 - timedelta(days=1), T0 + timedelta(days=1))] == [
        "0.1\x00x"
    ]


# SQLite-only: alters the file with sqlite3
def test_an_altered_column_is_found_even_when_the_payload_is_intact(tmp_path: Path) -> None:
    store, path = filled(tmp_path)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE results SET finished_at = '2001-01-01T00:00:00.000Z' WHERE row = 4")
    db.commit()
    db.close()
    report = SqliteStore(path).check_chain()
    assert (report.ok, report.first_broken_row) == (False, 4)
    assert "columns differ" in (report.problem or "")


def test_ledger_with_config_checks_every_signature(store_where: str, tmp_path: Path) -> None:
    store, path = filled(store_where, 3)
    forged = ProbeSim("p1", key="not-the-probes-key")
    forged.seq = 3
    store.add_result(forged.result("t1", "fail", T0 + timedelta(seconds=40)), T0 + timedelta(seconds=40))
    store.commit()
    store.close()
    config = tmp_path / "m.yaml"
    config.write_text(
        f"kind: monitor\nstore: {store_yaml(path)}\n"
        "probes: [{id: p1, key: key-of-p1}]\ntargets: [{id: t1}]\n"
    )
    assert ledger(path).returncode == 0  # the chain alone is intact: the row was chained when stored
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.startswith("BROKEN at row 4 ") and "signature does not verify" in done.stdout


# SQLite-only: a missing file
def test_ledger_without_store_is_a_usage_error(tmp_path: Path) -> None:
    done = ledger(str(tmp_path / "nothing.db"))
    assert done.returncode == 2
    assert "no store at" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ the unit of work


def test_no_write_is_durable_before_its_unit_of_work_ends(store_where: str) -> None:
    """Queueing a page or a verification, marking a page and pruning commit nothing by
    themselves; ``transaction()`` commits its block, ``commit()`` the open batch."""
    store, path = filled(store_where, 2)
    incident = store.open_incident(
        target="t1", kind="down", at=T0, last_good=None, first_failed=None, summary="down"
    )
    assert incident is not None
    store.enqueue_notification(incident.id, "hook", "trigger", {"k": 1}, T0)
    store.mark_notification(1, state="sent", attempts=1, at=T0)
    store.prune(T0 + timedelta(days=1))
    reader = raw(path)
    assert reader.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 0
    assert reader.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
    with store.transaction():
        pass
    assert reader.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 1
    assert reader.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    reader.close()


def test_a_failed_unit_of_work_undoes_only_its_own_writes(store_where: str) -> None:
    store, _ = filled(store_where, 2)
    sim = ProbeSim("p2")
    batch = sim.result("t1", "pass", T0 + timedelta(seconds=60))
    assert store.add_result(batch, T0 + timedelta(seconds=60))  # the open batch, not committed
    tip = list(store.iter_chain())[-1].hash
    try:
        with store.transaction():
            assert store.add_result(sim.result("t1", "pass", T0 + timedelta(seconds=70)), T0)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [r.id for r in store.iter_chain()][-1] == batch.id  # the batch's row stays
    assert store.add_result(sim.result("t1", "fail", T0 + timedelta(seconds=80)), T0)
    store.commit()
    chain = list(store.iter_chain())
    assert chain[-2].hash == tip and chain[-1].prev_hash == tip  # linked past the undone row
    assert store.check_chain().ok and store.check_chain().rows == 4


# ------------------------------------------------------------------ read-only readers
# SQLite-only (mode=ro, the file's bytes); PostgreSQL's read-only session is tested below


def _snapshot(path: str) -> bytes:
    db = sqlite3.connect(path)
    try:
        return "\n".join(db.iterdump()).encode()
    finally:
        db.close()


def test_ledger_verify_and_report_write_nothing_into_the_store(tmp_path: Path) -> None:
    store, path = filled(tmp_path, 3)
    store.add_state_change("t1", "up", T0, "2 of 2 calls passed")
    store.commit()
    store.close()
    before = _snapshot(path)
    assert ledger(path).returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "report", "--db", path, "--from", "2020-01-01",
         "--to", "2030-01-01", "--target", "t1", "--out", str(tmp_path / "out"), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _snapshot(path) == before
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        SqliteStore(path, read_only=True)._db.execute("DELETE FROM results")


def test_a_file_that_is_not_a_store_is_named_and_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE mine (x)")
    db.commit()
    db.close()
    before = _snapshot(str(other))
    done = ledger(str(other))
    assert (done.returncode, done.stdout) == (2, "")
    assert f"{other}: not an ecpm store" in done.stderr and "Traceback" not in done.stderr
    assert _snapshot(str(other)) == before  # no schema written into someone else's file
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not an ecpm store"):
        SqliteStore(garbage, read_only=True)


def test_a_store_too_old_to_read_says_how_to_upgrade_it(tmp_path: Path) -> None:
    store, path = filled(tmp_path, 1)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX results_report")  # as a store from before it: an index holds the column
    db.execute("ALTER TABLE results DROP COLUMN clock_skew")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"older ecpm \(no results.clock_skew\).*ecpm monitor"):
        SqliteStore(path, read_only=True)
    SqliteStore(path).close()  # the monitor's read-write open upgrades it
    assert SqliteStore(path, read_only=True).check_chain().ok


# ------------------------------------------------------------------ ecpm db upgrade


def db_upgrade(where: str, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "db", "upgrade", "--url" if is_url(where) else "--db", where, *more],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_db_upgrade_applies_what_is_pending_and_check_says_so_without_changing_it(store_where: str) -> None:
    pending = db_upgrade(store_where, "--check")
    assert pending.returncode == 1, pending.stderr
    assert pending.stdout.startswith("pending: ") and "1 (the schema)" in pending.stdout
    assert db_upgrade(store_where, "--check").returncode == 1  # --check changed nothing
    done = db_upgrade(store_where)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("upgraded: ") and "1 (the schema)" in done.stdout
    current = db_upgrade(store_where, "--check")
    assert (current.returncode, current.stdout) == (0, f"ok: {store_where} is current\n")
    open_store(store_where, read_only=True).close()


def test_db_upgrade_brings_a_store_from_before_the_numbering_up_to_date(tmp_path: Path) -> None:
    store, path = filled(tmp_path, 1)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX results_report")  # as a store from before it: an index holds the column
    db.execute("ALTER TABLE results DROP COLUMN clock_skew")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"ecpm db upgrade --db "):
        SqliteStore(path, read_only=True)
    pending = db_upgrade(path, "--check")
    assert (pending.returncode, pending.stdout) == (
        1, f"pending: {path} needs migrations 2 (judged time and gap repair columns)\n",
    )  # fmt: skip
    assert db_upgrade(path).returncode == 0
    assert SqliteStore(path, read_only=True).check_chain().ok


# SQLite-only: alters the file with sqlite3
def test_a_store_from_before_the_report_columns_gets_them_filled_from_its_payloads(tmp_path: Path) -> None:
    store, path = filled(tmp_path, 3)
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX results_unread")
    db.execute("DROP INDEX results_report")
    for column in ("reason", "post_dial_delay", "version", "judged_ms"):
        db.execute(f"ALTER TABLE results DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"older ecpm \(no results.judged_ms, results.post_dial_delay"):
        SqliteStore(path, read_only=True)
    pending = db_upgrade(path, "--check")
    assert (pending.returncode, pending.stdout) == (
        1,
        f"pending: {path} needs migrations 3 (report columns)\n",
    )
    assert db_upgrade(path).returncode == 0
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM results WHERE judged_ms IS NULL").fetchone() == (0,)
    assert {r[0] for r in db.execute("SELECT version FROM results")} == {"0.1.0"}
    db.execute("UPDATE results SET version = '9.9.9' WHERE row = 2")  # a filled column is checked too
    db.commit()
    db.close()
    report = SqliteStore(path, read_only=True).check_chain()
    assert (report.ok, report.first_broken_row) == (False, 2) and "columns differ" in (report.problem or "")


# ------------------------------------------------------------------ PostgreSQL's own


def test_a_read_only_postgres_store_cannot_write(postgres_url: str) -> None:
    import psycopg  # noqa: PLC0415 - the postgres runs only

    filled(postgres_url, 2)[0].close()
    reader = open_store(postgres_url, read_only=True)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader._db.execute("DELETE FROM results")  # type: ignore[attr-defined]
    reader.close()
    assert open_store(postgres_url, read_only=True).check_chain().rows == 2


def test_an_empty_postgres_database_is_not_a_store_and_is_left_alone(postgres_url: str) -> None:
    with pytest.raises(StoreError, match="not an ecpm store"):
        open_store(postgres_url, read_only=True)
    done = ledger(postgres_url)
    assert done.returncode == 2 and "not an ecpm store" in done.stderr
    assert db_upgrade(postgres_url, "--check").returncode == 1  # still nothing there


def test_writers_sharing_a_postgres_chain_append_one_exact_sequence(postgres_url: str) -> None:
    """The second writer's append waits for the first one's commit, then links to it."""
    first, second = open_store(postgres_url), open_store(postgres_url)
    one, two = ProbeSim("p1"), ProbeSim("p2")
    assert first.add_result(one.result("t1", "pass", T0), T0)  # holds the chain until commit
    appended = threading.Event()

    def append() -> None:
        assert second.add_result(two.result("t1", "pass", T0), T0)
        second.commit()
        appended.set()

    writer = threading.Thread(target=append)
    writer.start()
    assert not appended.wait(0.5)  # waiting for the first writer's lock
    first.commit()
    writer.join(10)
    assert appended.is_set()
    assert first.add_result(one.result("t1", "fail", T0 + timedelta(seconds=10)), T0)
    first.commit()
    chain = list(first.iter_chain())
    assert [r.prev_hash for r in chain[1:]] == [r.hash for r in chain[:-1]]
    report = first.check_chain()
    assert (report.ok, report.rows) == (True, 3)
    assert done_by_ledger(postgres_url, report.last_hash)
    first.close()
    second.close()


def done_by_ledger(where: str, last_hash: str) -> bool:
    done = ledger(where)
    return done.returncode == 0 and done.stdout == f"ok: 3 results, chain intact; last hash {last_hash}\n"
