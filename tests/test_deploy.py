"""deploy/: Prometheus rules and config, Alertmanager, Grafana, mosquitto ACL, compose, systemd.

Each file in deploy/ is checked by the tool that will read it in production wherever
that tool is on this machine: promtool (rule unit tests, check rules/config), amtool
(check-config, routing), a real Alertmanager (inhibition), a real mosquitto (the ACL
with a password file from mosquitto_passwd), systemd-analyze (units), and a running
``ecpm monitor`` whose /metrics must export every metric the rules and the dashboard
use. The compose file is checked structurally (no Docker engine here).

The processes (``Proc``, ``start_monitor``, ``wait_for``) are in tests/support/.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.brokers import Broker
from tests.support.monitor import ProbeSim
from tests.support.paths import AM_CONFIG, DEPLOY, PROM_CONFIG, RULES
from tests.support.paths import REPO as ROOT
from tests.support.peers import peer_path
from tests.support.processes import Proc, wait_for
from tests.support.system import start_monitor

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ecpm.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

ALERTS = {
    # name: (severity, concerns one target)
    "EmergencyPathDown": ("page", True),
    "EmergencyPathDegraded": ("ticket", True),
    "EmergencyRedundancyLost": ("ticket", False),  # per service
    "EmergencyMonitoringGap": ("page", True),
    "EmergencyProbeDown": ("ticket", False),
    "EmergencyMonitorDown": ("page", False),
    "EcpmProbeOutboxTrouble": ("ticket", False),
    "EcpmResultsUnrepaired": ("ticket", False),
    "EcpmProbeClockSkew": ("ticket", False),
    "EcpmMonitorBrokerDisconnected": ("page", False),
}


def run(argv: Sequence[str | Path], *, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def alert_rules() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["alert"]: r for g in data["groups"] for r in g["rules"] if "alert" in r}


# ------------------------------------------------------------------ Prometheus rules and config


@pytest.mark.peers("promtool")
def test_promtool_checks_rules_and_config() -> None:
    for argv in (
        ["promtool", "check", "rules", RULES],
        ["promtool", "check", "config", PROM_CONFIG],  # also loads rules/*.yml next to it
    ):
        done = run([peer_path(str(argv[0])), *argv[1:]])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"])
    assert f"{rules} rules found" in run([peer_path("promtool"), "check", "rules", RULES]).stdout


@pytest.mark.peers("promtool")
def test_promtool_rule_unit_tests_fire_and_stay_quiet() -> None:
    """deploy/prometheus/tests/*.yml: each alert fires when it should, and a single
    failed call, a one-scrape blip and short gaps never page."""
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
    assert tests
    text = "".join(t.read_text(encoding="utf-8") for t in tests)
    for name in ALERTS:  # every alert has a firing case and a quiet case
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", text), name
        assert re.search(rf"alertname: {name}, exp_alerts: \[\]", text), name
    assert "a single failed call never pages" in text
    done = run([peer_path("promtool"), "test", "rules", *tests])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_alert_rules_follow_the_contract() -> None:
    rules = alert_rules()
    assert set(rules) == set(ALERTS)
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", RUNBOOK.read_text(), re.MULTILINE)
    }
    for name, (severity, per_target) in ALERTS.items():
        rule = rules[name]
        labels, notes = rule["labels"], rule["annotations"]
        assert labels["severity"] == severity, name
        assert set(notes) >= {"summary", "description", "runbook_url"}, name
        assert notes["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"
        if per_target:
            assert labels["target"] == "{{ $labels.target }}", name
            assert "{{ $labels.target }}" in notes["summary"], name
            assert "{{ $labels.target }}" in notes["description"], name
    # the page is the monitor's confirmed verdict, never a raw failure count
    assert rules["EmergencyPathDown"]["expr"] == 'ecpm_target_state{state="down"} == 1'
    assert rules["EmergencyMonitoringGap"]["expr"] == 'ecpm_target_state{state="unknown"} == 1'
    assert rules["EmergencyProbeDown"]["expr"] == "ecpm_probe_up == 0"
    monitor_down = rules["EmergencyMonitorDown"]["expr"]
    assert 'up{job="ecpm-monitor"} == 0' in monitor_down
    assert 'absent(up{job="ecpm-monitor"})' in monitor_down
    assert rules["EcpmMonitorBrokerDisconnected"]["expr"] == "ecpm_monitor_mqtt_connected == 0"
    redundancy = rules["EmergencyRedundancyLost"]
    assert redundancy["expr"] == "ecpm_service_redundancy_lost == 1"
    assert redundancy["labels"]["service"] == "{{ $labels.service }}"
    jobs = [j["job_name"] for j in yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]]
    assert "ecpm-monitor" in jobs


# ------------------------------------------------------------------ Alertmanager


@pytest.mark.peers("amtool")
def test_amtool_checks_config_and_routes_pages_and_tickets() -> None:
    amtool = peer_path("amtool")
    done = run([amtool, "check-config", AM_CONFIG])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    routes = {
        ("severity=page", "alertname=EmergencyPathDown", "target=t1"): "pagerduty,slack,ops-webhook",
        ("severity=page", "alertname=EmergencyMonitorDown"): "pagerduty,slack,ops-webhook",
        ("severity=page", "alertname=EcpmMonitorBrokerDisconnected"): "pagerduty,slack,ops-webhook",
        ("severity=ticket", "alertname=EmergencyPathDegraded", "target=t1"): "slack,ops-webhook",
        ("severity=ticket", "alertname=EmergencyProbeDown", "probe=p1"): "slack,ops-webhook",
        ("alertname=SomethingElse",): "ops-webhook",
    }
    for labels, receivers in routes.items():
        done = run([amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels])
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == receivers, labels


@pytest.mark.peers("prometheus-alertmanager")
def test_alertmanager_inhibits_as_documented(tmp_path: Path) -> None:
    """The shipped config in a real Alertmanager: PathDown hides Degraded for the same
    target only; MonitorDown hides every path, gap and probe alert of its job."""
    with Proc.alertmanager(tmp_path, AM_CONFIG) as am, httpx.Client(base_url=am.url, timeout=5) as http:

        def post(*alerts: dict[str, str]) -> None:
            response = http.post("/api/v2/alerts", json=[{"labels": a} for a in alerts])
            response.raise_for_status()

        def states() -> dict[tuple[str, str], str]:
            return {
                (a["labels"]["alertname"], a["labels"].get("target") or a["labels"].get("probe", "")): a[
                    "status"
                ]["state"]
                for a in http.get("/api/v2/alerts").json()
            }

        job = {"job": "ecpm-monitor", "instance": "monitor:9470"}
        post(
            {"alertname": "EmergencyPathDown", "severity": "page", "target": "t1", **job},
            {"alertname": "EmergencyPathDegraded", "severity": "ticket", "target": "t1", **job},
            {"alertname": "EmergencyPathDegraded", "severity": "ticket", "target": "t2", **job},
            {"alertname": "EmergencyProbeDown", "severity": "ticket", "probe": "p1", **job},
            {"alertname": "SomethingElse", "severity": "ticket", "target": "t3", **job},
        )
        wait_for(lambda: len(states()) == 5, 10, "alerts accepted")
        assert states() == {
            ("EmergencyPathDown", "t1"): "active",
            ("EmergencyPathDegraded", "t1"): "suppressed",  # the page covers it
            ("EmergencyPathDegraded", "t2"): "active",
            ("EmergencyProbeDown", "p1"): "active",
            ("SomethingElse", "t3"): "active",
        }
        post({"alertname": "EmergencyMonitorDown", "severity": "page", **job})
        wait_for(lambda: len(states()) == 6, 10, "MonitorDown accepted")
        assert states() == {
            ("EmergencyMonitorDown", ""): "active",
            ("EmergencyPathDown", "t1"): "suppressed",
            ("EmergencyPathDegraded", "t1"): "suppressed",
            ("EmergencyPathDegraded", "t2"): "suppressed",
            ("EmergencyProbeDown", "p1"): "suppressed",
            ("SomethingElse", "t3"): "active",  # not ecpm's to hide
        }


@pytest.mark.peers("prometheus-alertmanager")
def test_a_monitor_cut_off_from_its_broker_pages_once_not_per_path(tmp_path: Path) -> None:
    """BrokerDisconnected hides that monitor's gap and probe alerts, not its path pages and
    not another monitor's alerts."""
    with Proc.alertmanager(tmp_path, AM_CONFIG) as am, httpx.Client(base_url=am.url, timeout=5) as http:

        def post(*alerts: dict[str, str]) -> None:
            http.post("/api/v2/alerts", json=[{"labels": a} for a in alerts]).raise_for_status()

        def states() -> dict[tuple[str, str, str], str]:
            return {
                (a["labels"]["alertname"], a["labels"].get("target") or a["labels"].get("probe", ""),
                 a["labels"]["instance"]): a["status"]["state"]
                for a in http.get("/api/v2/alerts").json()
            }  # fmt: skip

        one = {"job": "ecpm-monitor", "instance": "monitor:9470"}
        two = {"job": "ecpm-monitor", "instance": "monitor-2:9470"}
        post(
            {"alertname": "EcpmMonitorBrokerDisconnected", "severity": "page", **one},
            {"alertname": "EmergencyMonitoringGap", "severity": "page", "target": "t1", **one},
            {"alertname": "EmergencyProbeDown", "severity": "ticket", "probe": "p1", **one},
            {"alertname": "EmergencyPathDown", "severity": "page", "target": "t2", **one},
            {"alertname": "EmergencyMonitoringGap", "severity": "page", "target": "t1", **two},
        )
        wait_for(lambda: len(states()) == 5, 10, "alerts accepted")
        assert states() == {
            ("EcpmMonitorBrokerDisconnected", "", "monitor:9470"): "active",
            ("EmergencyMonitoringGap", "t1", "monitor:9470"): "suppressed",
            ("EmergencyProbeDown", "p1", "monitor:9470"): "suppressed",
            ("EmergencyPathDown", "t2", "monitor:9470"): "active",
            ("EmergencyMonitoringGap", "t1", "monitor-2:9470"): "active",
        }


# ------------------------------------------------------------------ PromQL metric names

# PromQL functions and aggregation operators (Prometheus 2.x); an identifier followed
# by "(" that is not here is a tokenizer mistake or a typo, and fails the test.
PROMQL_FUNCTIONS = frozenset(
    re.findall(
        r"\w+",
        """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
        clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
        days_in_month deg delta deriv exp floor histogram_count histogram_fraction histogram_quantile
        histogram_sum holt_winters hour idelta increase irate label_join label_replace last_over_time
        ln log10 log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
        present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc
        sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
        sum min max avg group stddev stdvar count count_values bottomk topk quantile""",
    )
)
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "inf", "nan", "atan2"})
GRAFANA_VARIABLE = re.compile(r"\$(\{[^}]*\}|\w+)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (strings, label matchers, ranges, label
    lists of by/without/on/ignoring/group_*, offsets and Grafana variables removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = GRAFANA_VARIABLE.sub(" ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if s[m.end() :].lstrip().startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word} in {expr}"
        elif word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def test_promql_tokenizer() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (target, le) (rate(a_bucket{stage="ringing",x=~"$t"}[$window])))'
        ' / on(target) group_left(probe) b_total offset 5m > bool 0 or absent(c{job="x"}) unless d'
    ) == {"a_bucket", "b_total", "c", "d"}
    assert promql_metric_names("max by (target) (x{state='up'}) + 2 * y") == {"x", "y"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        promql_metric_names("sun(x)")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def used_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard panel titles)."""
    used: dict[str, set[str]] = {}
    for name, rule in alert_rules().items():
        for metric in promql_metric_names(rule["expr"]):
            used.setdefault(metric, set()).add(f"rule {name}")
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            for metric in promql_metric_names(target["expr"]):
                used.setdefault(metric, set()).add(f"panel {panel['title']!r}")
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        if m := re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)[^,]*,\s*\w+\s*\)", text):
            used.setdefault(m.group(1), set()).add(f"variable {var['name']}")
    return used


def test_dashboard_covers_the_contract_and_is_provisioned() -> None:
    board = dashboard()
    assert board["uid"] == "ecpm-overview"
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len({p["id"] for p in dashboard_panels()}) == len(dashboard_panels())
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
    assert any(
        p["type"] == "state-timeline" and "ecpm_target_state" in p["targets"][0]["expr"] for p in panels
    )
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "ecpm_target_state",
        'ecpm_checks_total{target=~"$target",check="invite",outcome="pass"}',
        'ecpm_check_stage_seconds_bucket{target=~"$target",check="invite",stage="ringing"}',
        'ecpm_check_stage_seconds_bucket{target=~"$target",check="invite",stage="answer"}',
        "histogram_quantile(0.95,",
        "ecpm_media_mos",
        "ecpm_probe_up",
        "ecpm_incidents_open",
        "ecpm_results_rejected_total",
        "ecpm_results_missing_total",
    ):
        assert needle in exprs, needle
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "target", "window"}
    for var in GRAFANA_VARIABLE.findall(exprs):
        assert var.strip("{}") in variables | {"__rate_interval", "__range", "__interval"}, var
    # provisioning: the dashboards path is where compose mounts deploy/grafana/dashboards
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ecpm.yml").read_text())
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    assert source["datasources"][0]["type"] == "prometheus"
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


@pytest.mark.peers("promtool")
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every dashboard query, with its variables filled in, is valid PromQL to promtool."""
    fill = {"target": ".+", "window": "15m", "__rate_interval": "1m", "__range": "6h", "__interval": "15s"}
    rules = [
        {
            "record": f"ecpm:dashboard_query_{i}",
            "expr": GRAFANA_VARIABLE.sub(lambda m: fill[m.group(1).strip("{}")], expr),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    done = run([peer_path("promtool"), "check", "rules", path])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


@pytest.mark.peers("mosquitto")
def test_every_metric_in_rules_and_dashboard_is_exported_by_a_running_monitor(tmp_path: Path) -> None:
    """`ecpm monitor` with a real mosquitto, fed one signed passing result: its /metrics
    must carry every metric name the alert rules and the dashboard read (a call and a
    register check: ``ecpm_registration_up`` exists once a register result came)."""
    hook = {"type": "webhook", "name": "hook", "url": "http://127.0.0.1:9/never-called"}
    services = [{"id": "s1", "primary": ["t1"], "backup": ["t2"]}]  # for the redundancy series
    with (
        Broker(tmp_path) as broker,
        start_monitor(tmp_path, broker, notifiers=[hook], targets=("t1", "t2"), services=services) as monitor,
    ):
        sim = ProbeSim("p1")
        now = datetime.now(UTC)
        results = [sim.result("t1", "pass", now), sim.result("t1", "pass", now, check="register")]

        def observed() -> bool:
            publish(broker, [(sim.topic("t1"), r.to_json()) for r in results])  # again until it has them
            text = monitor.metrics_text()
            return "ecpm_media_mos{" in text and "ecpm_registration_up{" in text

        wait_for(observed, 20, "the monitor to take the result", [monitor.proc], every=0.5)
        families = list(text_string_to_metric_families(monitor.metrics_text()))

    types = {f.name: f.type for f in families}
    samples = {s.name for f in families for s in f.samples}
    count = next(
        s.value
        for f in families
        for s in f.samples
        if s.name == "ecpm_check_stage_seconds_count" and s.labels.get("stage") == "ringing"
    )
    assert count >= 1  # histograms have samples, not just zero series

    used = used_metric_names()
    assert {"ecpm_target_state", "ecpm_check_stage_seconds_bucket", "ecpm_probe_up", "up"} <= set(used)
    missing = {}
    for name, where in sorted(used.items()):
        if name == "up":  # made by Prometheus for every scrape, not by the monitor
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in samples and (base == name or types.get(base) == "histogram"):
            continue
        missing[name] = sorted(where)
    assert not missing, f"used in deploy/ but not exported by ecpm monitor: {missing}"


# ------------------------------------------------------------------ mosquitto ACL


class ShippedBroker(Broker):
    """mosquitto started from deploy/mosquitto/mosquitto.conf and acl, paths made local."""

    def __init__(self, workdir: Path, passwd: Path) -> None:
        super().__init__(workdir, anonymous=False)
        self.passwd = passwd

    def config_text(self) -> str:
        text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
        for old, new in (
            ("listener 1883 0.0.0.0", f"listener {self.port} {self.host}"),
            ("/mosquitto/auth/passwd", str(self.passwd)),
            ("/mosquitto/config/acl", str(DEPLOY / "mosquitto" / "acl")),
            ("/mosquitto/data/", f"{self.workdir}/"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        if os.geteuid() == 0:
            text += "\nuser root\n"
        return text


@pytest.mark.peers("mosquitto", "mosquitto_passwd")
def test_mosquitto_acl_confines_each_probe_to_its_own_topics(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    users = {"ecpm-monitor": "monitor-pw", "probe-a": "probe-a-pw", "probe-b": "probe-b-pw"}
    for user, password in users.items():
        done = run([peer_path("mosquitto_passwd"), "-b", passwd, user, password])
        assert done.returncode == 0, done.stderr
    with ShippedBroker(tmp_path, passwd) as broker:
        got = asyncio.run(_acl_exchange(broker, users))
    monitor, probe_a, probe_b = got["ecpm-monitor"], got["probe-a"], got["probe-b"]
    assert monitor == [
        "ecpm/v1/status/probe-a",  # retained, from before the monitor subscribed
        "ecpm/v1/results/probe-a/t1",
        "ecpm/v1/status/probe-a",
        "ecpm/v1/commands/all",  # its own broadcast: the probes' patterns apply to every user
        "ecpm/v1/results/probe-a/end",
    ]  # nothing probe-a sent in probe-b's name, no command addressed to a probe
    assert probe_a == ["ecpm/v1/commands/probe-a", "ecpm/v1/commands/all"]
    assert probe_b == ["ecpm/v1/commands/all"]  # a command forged by probe-a never arrives


async def _acl_exchange(broker: Broker, users: Mapping[str, str]) -> dict[str, list[str]]:
    def client(user: str, password: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"acl-test-{user}",
            username=user,
            password=users.get(user) if password is None else password,
            protocol=aiomqtt.ProtocolVersion.V5,
        )

    got: dict[str, list[str]] = {u: [] for u in users}
    async with contextlib.AsyncExitStack() as stack:
        monitor = await stack.enter_async_context(client("ecpm-monitor"))
        probe_a = await stack.enter_async_context(client("probe-a"))
        probe_b = await stack.enter_async_context(client("probe-b"))
        await probe_a.publish("ecpm/v1/status/probe-a", b"{}", qos=1, retain=True)
        await probe_a.publish("ecpm/v1/status/probe-b", b"{}", qos=1, retain=True)  # denied
        await monitor.subscribe([("$share/ecpm/ecpm/v1/results/#", 1), ("ecpm/v1/status/+", 1)])
        await monitor.subscribe("ecpm/v1/commands/#", qos=1)  # may not read commands
        for probe in (probe_a, probe_b):
            await probe.subscribe("ecpm/v1/commands/+", qos=1)  # receives only what the ACL lets it read

        async def collect(c: aiomqtt.Client, user: str, last: str) -> None:
            async for message in c.messages:
                got[user].append(message.topic.value)
                if message.topic.value == last:
                    return

        tasks = [
            asyncio.create_task(collect(monitor, "ecpm-monitor", "ecpm/v1/results/probe-a/end")),
            asyncio.create_task(collect(probe_a, "probe-a", "ecpm/v1/commands/all")),
            asyncio.create_task(collect(probe_b, "probe-b", "ecpm/v1/commands/all")),
        ]
        await probe_a.publish("ecpm/v1/results/probe-a/t1", b"own", qos=1)
        await probe_a.publish("ecpm/v1/results/probe-b/t1", b"forged", qos=1)  # denied
        await probe_a.publish("ecpm/v1/status/probe-a", b"{}", qos=1)
        await probe_a.publish("ecpm/v1/commands/probe-b", b"forged", qos=1)  # denied
        await probe_a.publish("ecpm/v1/commands/all", b"forged", qos=1)  # denied
        await monitor.publish("ecpm/v1/results/probe-a/t1", b"forged", qos=1)  # denied
        await monitor.publish("ecpm/v1/commands/probe-a", b"check", qos=1)
        await monitor.publish("ecpm/v1/commands/all", b"check", qos=1)
        await probe_a.publish("ecpm/v1/results/probe-a/end", b"own", qos=1)
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)  # anything denied but delivered late would show up now
        for task in tasks:
            task.cancel()
    # last: a refused client object closes its (by then reused) socket number when
    # collected, which would cut a connection opened after it
    for user, password in (("probe-a", "wrong"), ("nobody", "x")):
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with client(user, password):
                pass
    with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
        async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5):
            pass
    return got


# ------------------------------------------------------------------ compose and configs


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    return data


ECPM_SERVICES = {
    "monitor": "monitor.yaml",
    "probe-a": "probe-a.yaml",
    "probe-b": "probe-b.yaml",
    "responder": "responder.yaml",
}


def test_compose_stack_structure() -> None:
    """What `docker compose config` would catch, checked in Python (no Docker engine here),
    plus the cross-file facts compose cannot know."""
    data = compose()
    services = data["services"]
    assert set(services) == {
        "mosquitto-passwd",
        "mosquitto",
        "monitor",
        "probe-a",
        "probe-b",
        "responder",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    named_volumes = set(data["volumes"])
    networks = data["networks"]
    subnet = networks["ecpm"]["ipam"]["config"][0]
    for name, svc in services.items():
        assert "image" in svc, name
        assert set(svc) <= {
            "image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
            "networks", "restart", "read_only", "tmpfs", "cap_drop", "security_opt", "healthcheck",
        }, name  # fmt: skip
        deps = svc.get("depends_on", [])
        for dep in deps:
            assert dep in services, (name, dep)
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "./alertmanager/secrets", (name, volume)
            else:
                assert source in named_volumes, (name, volume)
        nets = svc.get("networks", {})
        assert not nets or "ecpm" in nets, name
    # the ecpm services: one image, hardened, each with its config and the env it needs
    for name, config_file in ECPM_SERVICES.items():
        svc = services[name]
        assert svc["image"] == "ecpm:local"
        assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert (DEPLOY / svc["build"]["context"] / "Dockerfile").is_file()
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]
        role = "probe" if name.startswith("probe") else name
        assert svc["command"] == [role, "-c", f"/etc/ecpm/{config_file}"]
        assert "./config:/etc/ecpm:ro" in svc["volumes"]
        text = (DEPLOY / "config" / config_file).read_text(encoding="utf-8")
        needed = set(re.findall(r"\$\{([A-Za-z_]\w*)\}", text))
        assert needed == set(svc["environment"]), f"{name}: config needs {needed}"
    # fixed SIP addresses: the configs bind where compose puts them
    fixed = {n: services[n]["networks"]["ecpm"]["ipv4_address"] for n in ("responder", "probe-a", "probe-b")}
    for name, address in fixed.items():  # inside the subnet, outside the dynamic range
        assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet["subnet"]), name
        assert ipaddress.ip_address(address) not in ipaddress.ip_network(subnet["ip_range"]), name
        config = yaml.safe_load((DEPLOY / "config" / ECPM_SERVICES[name]).read_text())
        assert config["sip"]["bind"] == address, name
        if name.startswith("probe"):
            assert config["targets"][0]["uri"] == f"sip:ecpm-test@{fixed['responder']}:5090"
    # Prometheus scrapes the monitor and sends to Alertmanager by compose service name
    monitor = yaml.safe_load((DEPLOY / "config" / "monitor.yaml").read_text())
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "ecpm-monitor")
    port = monitor["http"]["listen"].rpartition(":")[2]
    assert job["static_configs"][0]["targets"] == [f"monitor:{port}"]
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert {p["id"] for p in monitor["probes"]} == {"probe-a", "probe-b"}
    # mosquitto: every ecpm MQTT user has a password entry; probes log in as their id
    passwd_script = services["mosquitto-passwd"]["command"][0]
    for name in ("monitor", "probe-a", "probe-b"):
        user = yaml.safe_load((DEPLOY / "config" / ECPM_SERVICES[name]).read_text())["mqtt"]["username"]
        assert f'"$$f" {user} ' in passwd_script, user
    assert (
        services["mosquitto"]["depends_on"]["mosquitto-passwd"]["condition"]
        == "service_completed_successfully"
    )


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_when_available() -> None:
    """`docker compose config` needs only the compose plugin, not an engine; skipped
    with a message where the plugin is missing (as on this project's machines)."""
    probe = run(["docker", "compose", "version"])
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed: compose file checked structurally only")
    env = {**os.environ, **secrets_env()}
    done = run(["docker", "compose", "-f", DEPLOY / "docker-compose.yml", "config", "--quiet"], env=env)
    assert done.returncode == 0, done.stderr


def secrets_env() -> dict[str, str]:
    """The environment deploy/make-secrets.sh writes, as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ".env"
        done = run(["sh", DEPLOY / "make-secrets.sh", out])
        assert done.returncode == 0, done.stderr
        assert out.stat().st_mode & 0o077 == 0, "the secrets file must be private"
        lines = out.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_make_secrets_covers_every_variable_compose_needs() -> None:
    env = secrets_env()
    text = (DEPLOY / "docker-compose.yml").read_text(encoding="utf-8")
    needed = set(re.findall(r"(?<!\$)\$\{([A-Za-z_]\w*)", text))
    assert needed == set(env), f"compose needs {sorted(needed)}, make-secrets writes {sorted(env)}"
    assert all(len(v) >= 32 for v in env.values())
    assert secrets_env() != env  # random each time


def test_deploy_configs_pass_check_config() -> None:
    env = {**os.environ, **secrets_env()}
    files = sorted((DEPLOY / "config").glob("*.yaml"))
    assert {f.name for f in files} == set(ECPM_SERVICES.values())
    done = run([sys.executable, "-m", "ecpm", "check-config", *files], env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_dockerfile_builds_one_non_root_image_for_every_role() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(stages) >= 2 and " AS build" in stages[0], "multi-stage build"
    final = text[text.rindex("\nFROM ") :]
    assert "COPY --from=build /opt/ecpm /opt/ecpm" in final
    user = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    assert 'ENTRYPOINT ["ecpm"]' in final
    # every COPY source exists and is let through .dockerignore (which allow-lists)
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert ignore[[ln.strip() for ln in ignore].index("*")] == "*"
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    # what the wheel needs: the packages and the metadata pyproject reads
    assert {"pyproject.toml", "README.md", "ecpm", "probes", "monitor"} <= allowed
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "pjsua2-python" in pyproject  # the image gets pjsua2 from the PyPI wheel


# ------------------------------------------------------------------ systemd

UNITS = ("ecpm-monitor.service", "ecpm-probe@.service", "ecpm-responder.service")
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "Restart": "always",
}


def test_systemd_units_are_hardened() -> None:
    for unit in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(DEPLOY / "systemd" / unit)
        service = parser["Service"]
        for key, value in HARDENING.items():
            assert service.get(key) == value, (unit, key)
        assert service.get("StateDirectory", "").startswith("ecpm-"), unit
        assert "AF_INET" in service.get("RestrictAddressFamilies", ""), unit
        assert service.get("CapabilityBoundingSet") == "", unit
        assert service["ExecStart"].startswith("/opt/ecpm/bin/ecpm "), unit
        assert parser["Install"]["WantedBy"] == "multi-user.target", unit
    probe = (DEPLOY / "systemd" / "ecpm-probe@.service").read_text()
    assert "ExecStart=/opt/ecpm/bin/ecpm probe -c /etc/ecpm/probes/%i.yaml" in probe
    assert "LoadCredential=probe.key:/etc/ecpm/keys/%i.key" in probe


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: units checked by parsing only")
    ecpm = Path(sys.executable).with_name("ecpm")
    assert ecpm.exists()
    for unit in UNITS:  # verify needs an ExecStart that exists: point it at this venv's ecpm
        text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/ecpm/bin/ecpm", str(ecpm))
        (tmp_path / unit).write_text(text)
    names = [tmp_path / "ecpm-monitor.service", tmp_path / "ecpm-responder.service"]
    names.append(tmp_path / "ecpm-probe@probe-a.service")  # an instance of the template
    done = run([analyze, "verify", *names])
    output = done.stdout + done.stderr
    ours = [ln for ln in output.splitlines() if "ecpm" in ln]
    assert done.returncode == 0 and not ours, output  # unknown keys are only warnings: none allowed


# ------------------------------------------------------------------ the test brokers


def publish(broker: Broker, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish with QoS 1 from a throwaway client (the way a probe's results arrive)."""

    async def go() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher") as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    asyncio.run(go())


def test_the_tests_brokers_queue_and_keep_sessions_like_the_shipped_one(tmp_path: Path) -> None:
    def settings(text: str) -> dict[str, str]:
        lines = (line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {k: v.strip() for k, v in (pair for pair in lines if len(pair) == 2)}

    shipped = settings((DEPLOY / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8"))
    ours = settings(Broker(tmp_path, persistence=True).config_text())
    for key in (
        "max_queued_messages", "max_queued_bytes", "max_inflight_messages",
        "persistent_client_expiration", "persistence", "autosave_interval",
    ):  # fmt: skip
        assert ours[key] == shipped[key], key
