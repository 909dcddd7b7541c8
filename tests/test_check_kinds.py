"""The registry of check kinds is the one list: everything else that names kinds agrees with it.

A new kind's registry entry is checked here against what the rest of ecpm accepts: the
wire vocabulary (``probes.outcome``), the ``checks:`` config model, the JSON Schema, MQTT
commands, the monitor's metric labels and docs/checks.md.
"""

from __future__ import annotations

import json
import re
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitor.metrics import CHECKS as METRIC_CHECKS
from monitor.metrics import OTHER_STAGE, MonitorMetrics
from monitor.model import Snapshot
from probes import nena
from probes.check_kinds import REASONS, REGISTRY
from probes.checks import CALL_REASONS, NENA_REASONS, SETUP_REASONS, STATUS_REASONS, reason_for_status
from probes.config import Checks, EmergencyShape, Target
from probes.mqtt import COMMAND_KINDS
from probes.outcome import CALL_KINDS, CHECK_KINDS, IDENTITY_REASONS, STAGES, CheckOutcome
from probes.result import CODE_RE, Result, parse_result
from probes.scheduler import SCHEDULER_REASONS, check_interval, check_limit, enabled_kinds

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "checks.md").read_text(encoding="utf-8")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_registry_names_the_wire_kinds_in_order() -> None:
    assert tuple(REGISTRY) == CHECK_KINDS
    assert all(name == kind.name for name, kind in REGISTRY.items())
    assert {k.name for k in REGISTRY.values() if k.call} == CALL_KINDS
    schema = json.loads((ROOT / "docs/schema/result-v1.json").read_text(encoding="utf-8"))
    assert schema["properties"]["check"]["enum"] == list(REGISTRY)
    assert set(COMMAND_KINDS) == set(REGISTRY)
    assert tuple(METRIC_CHECKS) == tuple(REGISTRY)


def test_config_has_one_checks_field_per_kind_typed_by_its_settings() -> None:
    hints = typing.get_type_hints(Checks)
    assert list(Checks.model_fields) == list(REGISTRY)
    for name, kind in REGISTRY.items():
        assert set(typing.get_args(hints[name])) == {kind.settings, type(None)}
        settings = kind.settings()
        assert settings.interval > 0 and settings.time_limit > 0


def test_the_scheduler_schedules_what_the_registry_defines() -> None:
    checks = {name: {} for name in REGISTRY}
    target = Target(id="t1", uri="sip:t1@127.0.0.1:5090", test_endpoint=True, checks=checks)
    assert enabled_kinds(target) == list(REGISTRY)
    for name, kind in REGISTRY.items():
        defaults = kind.settings()
        assert kind.settings_of(target) == defaults
        assert check_interval(target, name) == defaults.interval
        assert check_limit(target, name) == defaults.time_limit


def test_stages_and_reasons_are_what_metrics_and_the_schema_accept() -> None:
    code = re.compile(CODE_RE)
    registry = CollectorRegistry()
    metrics = MonitorMetrics(
        registry,
        targets=["t1"],
        probes=["p1"],
        notifiers=[],
        snapshot=lambda: Snapshot(at=T0, targets={}, probes={}, open_incidents=(), timeline=()),
    )
    seq = 0
    for kind in REGISTRY.values():
        assert kind.stages and set(kind.stages) <= set(STAGES) and OTHER_STAGE not in kind.stages
        assert list(kind.stages) == sorted(kind.stages, key=STAGES.index)  # in call order
        assert len(set(kind.reasons)) == len(kind.reasons) and set(kind.reasons) <= set(REASONS)
        for stage in kind.stages:
            for reason in kind.reasons:
                assert code.match(reason), reason
                seq += 1
                outcome = CheckOutcome(
                    check=kind.name, outcome="fail", started_at=T0, finished_at=T0 + timedelta(seconds=1),
                    stage=stage, reason=reason, timings={stage: 0.5},
                )  # fmt: skip
                result = Result.from_outcome(outcome, probe="p1", seq=seq, target="t1", key=b"k")
                assert parse_result(result.to_json()) == result
                metrics.observe(result)
            labels = {"target": "t1", "probe": "p1", "check": kind.name, "stage": stage}
            assert registry.get_sample_value("ecpm_check_failures_total", labels) == len(kind.reasons)
            timing = {"target": "t1", "check": kind.name, "stage": stage}
            assert registry.get_sample_value("ecpm_check_stage_seconds_count", timing) == len(kind.reasons)
    other = {"target": "t1", "probe": "p1", "check": "invite", "stage": OTHER_STAGE}
    assert registry.get_sample_value("ecpm_check_failures_total", other) == 0


def test_every_reason_is_documented_and_produced_where_it_says() -> None:
    assert [r for r in REASONS if f"`{r}`" not in DOCS] == []
    assert set(REASONS) >= set(SCHEDULER_REASONS)
    assert {reason_for_status(status) for status in range(300, 700)} == set(STATUS_REASONS)
    assert all(set(STATUS_REASONS) <= set(kind.reasons) for kind in REGISTRY.values())
    shape = EmergencyShape()
    scored = {nena.score_answer(status, None, shape).reason for status in (486, 404)}
    assert scored <= set(NENA_REASONS) <= set(REGISTRY["invite"].reasons)


def test_the_identity_reasons_are_the_identity_stage_s_own() -> None:
    """The evidence report counts lost numbers and locations from the reason column alone."""
    others = (*SETUP_REASONS, *STATUS_REASONS, *NENA_REASONS, *CALL_REASONS, *SCHEDULER_REASONS)
    assert set(IDENTITY_REASONS).isdisjoint(others)
    assert set(IDENTITY_REASONS) <= set(REGISTRY["invite"].reasons)
    assert "identity" in REGISTRY["invite"].stages


def test_docs_say_how_to_add_a_kind() -> None:
    section = DOCS.split("## Adding a check kind", 1)[1].split("\n## ", 1)[0]
    for name in ("probes/check_kinds.py", "probes/config.py", "probes/outcome.py", "result-v1.json"):
        assert name in section, name
    assert [k for k in REGISTRY if f"`{k}`" not in DOCS] == []
