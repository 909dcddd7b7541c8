"""Fuzzing the monitor's ingest: payload bytes, JSON shapes, field values and
signatures. Whatever arrives, ``MonitorCore.handle`` never raises, returns None or a bounded
reason, stores only results that are valid by an independent check (the published JSON
Schema with its bounds, the times, the probe's key, the seq rules), and the ledger stays
intact with every stored row readable.

About 10,500 cases in all (``FUZZ_SCALE`` multiplies them: ``ECPM_FUZZ_SCALE=10`` for
~10^5); under ``CI=true`` hypothesis runs derandomized (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.ingest import MONITOR_REASONS
from monitor.store import SqliteStore, chain_hash
from probes.outcome import CHECK_KINDS
from probes.result import REJECT_REASONS, format_time, parse_result, parse_time
from probes.result import verify_signature as verify
from tests.support.hostile import sign, signed_payload
from tests.support.monitor import Clock, ProbeSim, key_for, monitor_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schema/result-v1.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
REASONS = frozenset((*REJECT_REASONS, *MONITOR_REASONS))
PROBES, TARGETS = ("p1", "p2"), ("t1", "t2")
SCALE = max(1, int(os.environ.get("ECPM_FUZZ_SCALE", "1")))
MAX_AGE, AHEAD = timedelta(days=30), timedelta(minutes=15)  # the monitor's defaults


def fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Harness:
    """One monitor core over one store, fed every example of a test; after each message,
    the invariants. State accumulates across examples, as it would in a monitor."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ecpm-fuzz-"))
        self.clock = Clock()
        self.config = monitor_config(self.dir, probes=PROBES, targets=TARGETS)
        self.registry = CollectorRegistry()
        self.core = MonitorCore(
            self.config, SqliteStore(self.config.store.path), self.registry, clock=self.clock
        )
        self.sims = {p: ProbeSim(p) for p in PROBES}
        self.db = sqlite3.connect(self.config.store.path)  # a second reader: sees commits only
        self.rows = 0
        self.tip = "0" * 64
        self.seen = 0

    def valid(self, probe: str = "p1", target: str = "t1", **kw: Any) -> dict[str, Any]:
        self.clock.advance(0.5)
        return dict(json.loads(self.sims[probe].result(target, "pass", self.clock(), **kw).to_json()))

    def feed(self, topic: str, payload: bytes) -> str | None:
        outcome = self.core.handle(topic, payload)  # must never raise
        event(f"outcome: {outcome or 'stored'}")
        assert outcome is None or outcome in REASONS, outcome
        self.core.store.commit()
        self.check()
        return outcome

    def check(self) -> None:
        new = self.db.execute(
            "SELECT row, probe, target, seq, received_at, payload, prev_hash, hash FROM results WHERE row > ?"
            " ORDER BY row",
            (self.rows,),
        ).fetchall()
        assert len(new) <= 1, "one message stored more than one row"
        for row, probe, target, seq, received_at, text, prev, digest in new:
            assert prev == self.tip and digest == chain_hash(prev, text)  # the chain grows, intact
            data = json.loads(text)
            VALIDATOR.validate(data)  # the published schema, with every bound
            started, finished = parse_time(data["started_at"]), parse_time(data["finished_at"])
            received = parse_time(received_at)
            assert started <= finished <= started + timedelta(hours=1)
            assert received - MAX_AGE <= finished <= received + AHEAD
            assert probe in PROBES and target in TARGETS and data["check"] in CHECK_KINDS
            assert verify(parse_result(text.encode()), key_for(probe))
            same = self.db.execute("SELECT COUNT(*) FROM results WHERE probe = ? AND seq = ?", (probe, seq))
            assert same.fetchone()[0] == 1, f"seq {seq} of {probe} stored twice"
            self.rows, self.tip = row, digest
        self.seen += 1
        if self.seen % 50 == 0:  # state, incidents and snapshot over what was stored
            self.core.evaluate(self.clock())
        if self.seen % 1000 == 0:
            chain = self.core.store.check_chain(read=True)
            assert chain.ok and chain.quarantined == (), chain


_harnesses: dict[str, Harness] = {}


def harness(name: str) -> Harness:
    if name not in _harnesses:
        _harnesses[name] = Harness()
    return _harnesses[name]


# ------------------------------------------------------------------ strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**53, 2**53 + 1, 2**63, 10**30, 10**400])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e-300, 1e308, 3600.0, 3600.0001, 60000.0, 5.0, 5.0000001])
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
times = st.sampled_from(
    ["1970-01-01T00:00:00.000Z", "2999-12-31T23:59:59.999Z", "2026-02-30T00:00:00.000Z",
     "2026-11-01T12:00:00.000Z", "2026-11-01T11:00:00.000Z", "2026-10-01T00:00:00.000Z",
     "2026-11-01T12:20:00.000Z", "0000-01-01T00:00:00.000Z", "2026-11-01T12:00:00Z", ""]
) | st.builds(
    "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:03d}Z".format,
    st.integers(1960, 3000), st.integers(0, 13), st.integers(0, 32), st.integers(0, 24),
    st.integers(0, 60), st.integers(0, 60), st.integers(0, 999),
)  # fmt: skip
# (character-by-character regex strategies are slow; these alphabets cover the patterns' edges)
names = st.sampled_from([*PROBES, *TARGETS, "p9", "t9", "", "P1", "../x"]) | st.text("ap019_.-/", max_size=9)
codes = st.sampled_from([*CHECK_KINDS, "subscribe", "INVITE", "", "other"]) | st.text("aiz09_ -", max_size=11)
numbers = st.sampled_from(
    [0, -1, 1, 99, 100, 699, 700, 2**53, 10**30, 10**400, 0.5, 1e308, -0.0]
) | st.floats(allow_nan=False, allow_infinity=False)
field_values: dict[str, st.SearchStrategy[Any]] = {
    "id": st.sampled_from(["not-a-uuid", "00000000-0000-7000-8000-000000000000"]) | st.uuids().map(str),
    "probe": names,
    "target": names,
    "seq": numbers | st.integers(-5, 50),
    "check": codes,
    "started_at": times,
    "finished_at": times,
    "outcome": st.sampled_from(["pass", "fail", "inconclusive", "PASS", None, 1]),
    "stage": st.none() | codes,
    "reason": st.none() | codes,
    "sip_status": st.none() | numbers,
    "sip_reason": st.none() | st.text(max_size=300) | st.just("\ud800"),
    "timings": st.dictionaries(codes, numbers | json_values, max_size=4),
    "media": st.none()
    | json_values
    | st.fixed_dictionaries(
        {
            "rx_packets": numbers,
            "tx_packets": numbers,
            "loss": st.none() | numbers,
            "jitter_ms": st.none() | numbers,
            "rtt_ms": st.none() | numbers,
            "mos": st.none() | numbers,
            "tone_heard": st.booleans(),
            "echo_heard": st.none() | st.booleans(),
        }
    ),
    "detail": st.dictionaries(st.text(max_size=70), st.text(max_size=50) | json_values, max_size=3),
    "confirm": st.booleans() | json_values,
    "request_id": st.none() | st.text(max_size=30),
    "version": st.text(max_size=70) | json_values,
    "schema": st.sampled_from(["ecpm.result/1", "ecpm.result/2", None]),
}


DAY = 86400
shifts = st.none() | st.sampled_from(
    [-56 * 365 * DAY, -31 * DAY, -30 * DAY - 1, -30 * DAY + 60, -3600, 899, 901, 3600, 973 * 365 * DAY]
) | st.integers(-40 * DAY, 40 * DAY)  # fmt: skip


def topic_for(data: dict[str, Any]) -> str:
    return f"ecpm/v1/results/{data.get('probe')}/{data.get('target')}"


# ------------------------------------------------------------------ the properties


@fuzz(2500)
@given(
    raw=st.binary(max_size=600), cut=st.integers(0, 2000), flip=st.integers(0, 255), which=st.integers(0, 3)
)
def test_arbitrary_bytes_and_mangled_payloads(raw: bytes, cut: int, flip: int, which: int) -> None:
    h = harness("bytes")
    good = signed_payload(h.valid(), key_for("p1"))
    i = cut % len(good)
    payloads = [
        raw,
        good[:i] + raw + good[i:],
        good[:i] + bytes([good[i] ^ (flip or 1)]) + good[i + 1 :],
        good[:i],
    ]
    outcome = h.feed("ecpm/v1/results/p1/t1", payloads[which])
    if which in (0, 3):  # noise, or a valid payload cut short: never a result
        assert outcome is not None


@fuzz(2000)
@given(
    value=json_values, fields=st.dictionaries(st.sampled_from(sorted(field_values)), json_values, max_size=6)
)
def test_arbitrary_json_shapes(value: Any, fields: dict[str, Any]) -> None:
    h = harness("shapes")
    h.feed("ecpm/v1/results/p1/t1", json.dumps(value).encode())
    shaped = {**h.valid(), **fields}
    h.feed(topic_for(shaped), signed_payload(shaped, key_for("p1")))
    partial = {"schema": "ecpm.result/1", **fields}
    h.feed("ecpm/v1/results/p1/t1", json.dumps(partial).encode())


@fuzz(4000)
@given(data=st.data(), probe=st.sampled_from(PROBES), target=st.sampled_from(TARGETS))
def test_hostile_field_values_correctly_signed(data: st.DataObject, probe: str, target: str) -> None:
    h = harness("fields")
    result = h.valid(probe, target)
    shift = data.draw(shifts, label="both times shifted by (s)")
    if shift is not None:  # a probe clock far off, or a result held back for long
        for name in ("started_at", "finished_at"):
            result[name] = format_time(parse_time(result[name]) + timedelta(seconds=shift))
    chosen = data.draw(st.lists(st.sampled_from(sorted(field_values)), max_size=3, unique=True))
    for name in chosen:
        result[name] = data.draw(field_values[name], label=name)
    key = key_for(result["probe"]) if result.get("probe") in PROBES else key_for(probe)
    matching = data.draw(st.booleans(), label="matching topic")
    topic = topic_for(result) if matching else topic_for({**result, "target": target})
    h.feed(topic, signed_payload(result, key, ascii_only=data.draw(st.booleans(), label="ascii")))


@fuzz(2000)
@given(
    sig=st.binary(min_size=32, max_size=32).map(bytes.hex) | st.text(max_size=70),
    key=st.text(max_size=20),
    how=st.sampled_from(["random", "other_key", "other_probe_key", "stale", "upper"]),
)
def test_bad_signatures_are_never_stored(sig: str, key: str, how: str) -> None:
    h = harness("signatures")
    result = h.valid("p1", "t1")
    if how == "random":
        forged = {**result, "sig": sig}
    elif how == "other_key":
        forged = sign(result, key if key != key_for("p1") else key + "x")
    elif how == "other_probe_key":
        forged = sign(result, key_for("p2"))
    elif how == "stale":  # a valid signature over different content
        forged = {**result, "outcome": "fail"}
    else:
        forged = {**result, "sig": result["sig"].upper()}
    before = h.rows
    outcome = h.feed("ecpm/v1/results/p1/t1", json.dumps(forged).encode())
    assert outcome in ("signature", "fields"), outcome
    assert h.rows == before
