"""monitor.web: API, auth, /metrics, the status page (in headless Chromium) and serve()."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge
from starlette.applications import Starlette

from monitor.model import (
    Ack,
    Incident,
    IncidentDuty,
    Notification,
    PathView,
    ProbeView,
    ResultSummary,
    ServiceView,
    Snapshot,
    StateChange,
    TargetStateName,
    TargetView,
)
from monitor.web import ActionError, ListenError, create_app, serve
from tests.support import browser

NOW = datetime.now(UTC).replace(microsecond=0)
TOKEN = "s3cret-token"


# ------------------------------------------------------------------ snapshots as plain values


def ago(**kw: float) -> datetime:
    return NOW - timedelta(**kw)


def result(
    probe: str,
    target: str,
    *,
    at: datetime,
    outcome: Literal["pass", "fail", "inconclusive"] = "pass",
    check: str = "invite",
    stage: str | None = None,
    sip: tuple[int, str] | None = (200, "OK"),
    pdd: float | None = 1.21,
    mos: float | None = 4.32,
    confirm: bool = False,
    reason: str | None = None,
) -> ResultSummary:
    return ResultSummary(
        id=f"{probe}-{target}-{at.timestamp():.0f}-{check}",
        probe=probe,
        target=target,
        check=check,
        seq=int(at.timestamp()) % 100000,
        started_at=at - timedelta(seconds=6),
        finished_at=at,
        outcome=outcome,
        stage=stage,
        reason=reason,
        sip_status=sip[0] if sip else None,
        sip_reason=sip[1] if sip else None,
        post_dial_delay=pdd,
        mos=mos,
        confirm=confirm,
        request_id=None,
        version="0.1.0",
    )


def target(
    id: str,
    state: TargetStateName,
    *,
    since: datetime,
    why: str,
    latest: Sequence[ResultSummary],
    description: str = "",
    incident: int | None = None,
    last_success: datetime | None = None,
) -> TargetView:
    return TargetView(
        id=id,
        description=description,
        interval=30.0,
        state=state,
        since=since,
        why=why,
        last_success_at=last_success or (latest[0].finished_at if latest else None),
        covering_probes=tuple(sorted({r.probe for r in latest})),
        latest=tuple(latest),
        open_incident=incident,
    )


PROBES = {
    "lon-1": ProbeView(
        "lon-1", True, ago(hours=5), ago(seconds=4), True, "0.1.0", ("uk-999", "uk-112", "ie-112")
    ),
    "man-1": ProbeView("man-1", True, ago(hours=5), ago(seconds=9), True, "0.1.0", ("uk-999", "uk-112")),
    "edi-1": ProbeView("edi-1", True, ago(hours=2), ago(minutes=7), False, "0.1.0", ("uk-999",)),
    "bel-1": ProbeView("bel-1", False, ago(minutes=42), ago(minutes=43), False, "0.0.9", ("ie-112",)),
}

HISTORY = (  # the last 24 h: the monitor started 20 h ago; a 20-minute outage 6 h ago
    StateChange("uk-999", "unknown", ago(hours=20)),
    StateChange("uk-112", "unknown", ago(hours=20)),
    StateChange("ie-112", "unknown", ago(hours=20)),
    StateChange("uk-999", "up", ago(hours=19, minutes=58)),
    StateChange("uk-112", "up", ago(hours=19, minutes=58)),
    StateChange("ie-112", "up", ago(hours=19, minutes=57)),
    StateChange("uk-999", "down", ago(hours=6, minutes=20)),
    StateChange("uk-999", "up", ago(hours=6)),
    StateChange("ie-112", "unknown", ago(hours=3, minutes=10)),
    StateChange("ie-112", "up", ago(hours=2, minutes=55)),
    StateChange("uk-112", "degraded", ago(minutes=25)),
)

RESOLVED = Incident(
    id=41,
    target="uk-999",
    kind="down",
    opened_at=ago(hours=6, minutes=20),
    resolved_at=ago(hours=6),
    last_good_id="a",
    last_good_at=ago(hours=6, minutes=21),
    first_failed_id="b",
    first_failed_at=ago(hours=6, minutes=20, seconds=12),
    summary="INVITE failed at stage answer on 2 probes (SIP 503)",
    notifications=(
        Notification(
            "pagerduty", "trigger", "sent", 1, ago(hours=6, minutes=20), ago(hours=6, minutes=20), None
        ),
        Notification("pagerduty", "resolve", "sent", 1, ago(hours=6), ago(hours=6), None),
    ),
)


def healthy() -> Snapshot:
    """Three targets: one up, one degraded, one up over an offline probe."""
    targets = {
        "uk-999": target(
            "uk-999",
            "up",
            since=ago(hours=6),
            description="999 test route via BT (urn:service:test.sos)",
            why="last 2 calls passed on lon-1, man-1",
            latest=[
                result("lon-1", "uk-999", at=ago(seconds=4)),
                result("man-1", "uk-999", at=ago(seconds=9), pdd=1.48, mos=4.28),
                result("lon-1", "uk-999", at=ago(seconds=20), check="options", pdd=None, mos=None),
            ],
        ),
        "uk-112": target(
            "uk-112",
            "degraded",
            since=ago(minutes=25),
            description="112 test line, business VoIP trunk",
            why="calls pass but post-dial delay 4.62 s > 3.0 s on man-1",
            latest=[
                result("man-1", "uk-112", at=ago(seconds=11), pdd=4.62, mos=4.1),
                result("lon-1", "uk-112", at=ago(seconds=16), pdd=2.05, mos=4.3),
            ],
        ),
        "ie-112": target(
            "ie-112",
            "up",
            since=ago(hours=2, minutes=55),
            description="Irish 112 test service",
            why="last 2 calls passed on lon-1",
            latest=[result("lon-1", "ie-112", at=ago(seconds=14), mos=4.4)],
        ),
    }
    return Snapshot(at=NOW, targets=targets, probes=PROBES, open_incidents=(), timeline=HISTORY)


OPEN = Incident(
    id=42,
    target="uk-999",
    kind="down",
    opened_at=ago(seconds=95),
    resolved_at=None,
    last_good_id="lon-1-good",
    last_good_at=ago(seconds=140),
    first_failed_id="lon-1-bad",
    first_failed_at=ago(seconds=103),
    summary="INVITE failed at stage answer on lon-1, man-1: 503 Service Unavailable",
    notifications=(
        Notification("pagerduty", "trigger", "sent", 1, ago(seconds=95), ago(seconds=94), None),
        Notification("slack", "trigger", "failed", 3, ago(seconds=95), None, "HTTP 500"),
    ),
)


def outage() -> Snapshot:
    """uk-999 goes down: both probes fail at the answer stage, incident 42 is open."""
    snap = healthy()
    unavailable = functools.partial(
        result, outcome="fail", stage="answer", sip=(503, "Service Unavailable"), mos=None
    )
    failing = [
        unavailable("lon-1", "uk-999", at=ago(seconds=5), pdd=1.33, confirm=True),
        unavailable("man-1", "uk-999", at=ago(seconds=8), pdd=1.51),
        result("lon-1", "uk-999", at=ago(seconds=21), check="options", pdd=None, mos=None),
    ]
    down = target(
        "uk-999",
        "down",
        since=ago(seconds=95),
        description="999 test route via BT (urn:service:test.sos)",
        why="last 2 calls failed on lon-1, man-1 at stage answer (SIP 503)",
        latest=failing,
        incident=42,
        last_success=ago(seconds=140),
    )
    return replace(
        snap,
        targets={**snap.targets, "uk-999": down},
        open_incidents=(OPEN,),
        timeline=(*HISTORY, StateChange("uk-999", "down", ago(seconds=95))),
    )


# ------------------------------------------------------------------ app plumbing


class Incidents:
    """The ``incidents(n)`` callable, recording what it was asked."""

    def __init__(self, items: Sequence[Incident] = (RESOLVED,)) -> None:
        self.items = list(items)
        self.asked: list[int] = []

    def __call__(self, n: int) -> Sequence[Incident]:
        self.asked.append(n)
        return self.items[:n]


def make_app(
    snap: Snapshot | Callable[[], Snapshot] | None = None,
    *,
    registry: CollectorRegistry | None = None,
    incidents: Incidents | None = None,
    token: str | None = TOKEN,
    actions: Mapping[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] | None = None,
) -> Starlette:
    current = snap if callable(snap) else (lambda: snap or healthy())
    return create_app(
        snapshot=current,
        registry=registry or CollectorRegistry(),
        incidents=incidents or Incidents(),
        token=token,
        actions=actions,
    )


def request(app: Starlette, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def is_time(value: object) -> bool:
    return isinstance(value, str) and RFC3339_UTC.match(value) is not None


# ------------------------------------------------------------------ plain endpoints


def test_healthz() -> None:
    r = request(make_app(), "GET", "/healthz")
    assert (r.status_code, r.text) == (200, "ok")


def test_metrics_come_from_the_given_registry_only() -> None:
    registry = CollectorRegistry()
    Gauge("ecpm_web_test_marker", "marker", ["target"], registry=registry).labels("uk-999").set(7)
    r = request(make_app(registry=registry), "GET", "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert 'ecpm_web_test_marker{target="uk-999"} 7.0' in r.text
    assert "python_gc_objects_collected_total" not in r.text  # the global registry's collectors


# ------------------------------------------------------------------ JSON API


TARGET_FIELDS = {
    "id", "description", "interval_seconds", "state", "since", "why", "last_success_at",
    "covering_probes", "open_incident", "latest",
}  # fmt: skip
RESULT_FIELDS = {
    "id", "probe", "target", "check", "seq", "started_at", "finished_at", "outcome", "stage", "reason",
    "sip_status", "sip_reason", "post_dial_delay_seconds", "mos", "confirm", "request_id", "version",
    "judged_at", "clock_skew_seconds",
}  # fmt: skip


def test_api_targets() -> None:
    r = request(make_app(outage()), "GET", "/api/v1/targets")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"at", "targets"} and is_time(body["at"])
    assert [t["id"] for t in body["targets"]] == ["uk-999", "uk-112", "ie-112"]  # configuration order
    down = body["targets"][0]
    assert set(down) == TARGET_FIELDS
    assert (down["state"], down["open_incident"], down["interval_seconds"]) == ("down", 42, 30.0)
    assert down["covering_probes"] == ["lon-1", "man-1"]
    assert is_time(down["since"]) and is_time(down["last_success_at"])
    first = down["latest"][0]
    assert set(first) == RESULT_FIELDS
    assert (first["outcome"], first["stage"], first["sip_status"], first["sip_reason"]) == (
        "fail", "answer", 503, "Service Unavailable"
    )  # fmt: skip
    assert (first["post_dial_delay_seconds"], first["mos"], first["confirm"]) == (1.33, None, True)
    assert is_time(first["started_at"]) and is_time(first["finished_at"])


def test_api_probes_status() -> None:
    never = ProbeView("new-1", None, None, None, False, None, ())
    snap = replace(healthy(), probes={**PROBES, "new-1": never})
    body = request(make_app(snap), "GET", "/api/v1/probes").json()
    assert is_time(body["at"])
    by_id = {p["id"]: p for p in body["probes"]}
    assert {k: p["status"] for k, p in by_id.items()} == {
        "lon-1": "online", "man-1": "online", "edi-1": "stale", "bel-1": "offline", "new-1": "unknown"
    }  # fmt: skip
    assert set(by_id["lon-1"]) == {
        "id", "status", "online", "up", "status_at", "last_result_at", "version", "targets",
        "outbox", "results_outstanding", "clock_skew_seconds", "clock_skewed",
    }  # fmt: skip
    assert by_id["new-1"]["status_at"] is None and by_id["new-1"]["online"] is None
    assert by_id["lon-1"]["targets"] == ["uk-999", "uk-112", "ie-112"]


def test_api_incidents() -> None:
    incidents = Incidents([OPEN, RESOLVED])
    app = make_app(outage(), incidents=incidents)
    body = request(app, "GET", "/api/v1/incidents", params={"limit": "5"}).json()
    assert incidents.asked == [5]
    open_, resolved = body["incidents"]
    assert set(open_) == {
        "id", "target", "kind", "state", "opened_at", "resolved_at", "last_good_id", "last_good_at",
        "first_failed_id", "first_failed_at", "detection_latency_seconds", "summary", "notifications",
        "ack", "duties",
    }  # fmt: skip
    assert (open_["id"], open_["state"], open_["resolved_at"]) == (42, "open", None)
    assert open_["detection_latency_seconds"] == 8.0
    assert (resolved["id"], resolved["state"]) == (41, "resolved") and is_time(resolved["resolved_at"])
    assert open_["notifications"][1] == {
        "notifier": "slack", "event": "trigger", "state": "failed", "attempts": 3,
        "created_at": open_["opened_at"], "sent_at": None, "last_error": "HTTP 500",
    }  # fmt: skip

    request(app, "GET", "/api/v1/incidents")
    assert incidents.asked == [5, 100]
    for bad in ("0", "1001", "ten", "-1", "²", ""):
        r = request(app, "GET", "/api/v1/incidents", params={"limit": bad})
        assert r.status_code == 400 and "limit" in r.json()["error"]


# ------------------------------------------------------------------ actions and auth


class Verify:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(body)
        if body.get("target") == "nope":
            raise ActionError("unknown target nope", status=422)
        return {"passed": True, "at": NOW}


def test_action_runs_with_the_right_token() -> None:
    verify = Verify()
    app = make_app(actions={"verify": verify})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = request(app, "POST", "/api/v1/verify", json={"target": "uk-999"}, headers=headers)
    assert r.status_code == 200
    assert r.json() == {"passed": True, "at": NOW.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    assert verify.calls == [{"target": "uk-999"}]

    assert request(app, "POST", "/api/v1/verify", headers=headers).status_code == 200  # empty body: {}
    assert verify.calls[-1] == {}
    r = request(app, "POST", "/api/v1/verify", json={"target": "nope"}, headers=headers)
    assert (r.status_code, r.json()) == (422, {"error": "unknown target nope"})


def test_actions_are_looked_up_per_request_and_tokens_compare_as_bytes() -> None:
    actions: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {}
    token = "clé-secrète"  # not ASCII: the client sends it as UTF-8
    app = make_app(token=token, actions=actions)
    auth = {"Authorization": f"Bearer {token}".encode()}
    assert request(app, "POST", "/api/v1/verify", headers=auth).status_code == 404
    actions["verify"] = Verify()  # registered after the app was built
    assert request(app, "POST", "/api/v1/verify", headers=auth).status_code == 200


@pytest.mark.parametrize(
    ("token", "header", "status"),
    [
        (None, f"Bearer {TOKEN}", 403),  # no token configured: state-changing endpoints are disabled
        (None, None, 403),
        (TOKEN, None, 401),
        (TOKEN, "Bearer wrong", 401),
        (TOKEN, f"Bearer {TOKEN}x", 401),
        (TOKEN, f"Basic {TOKEN}", 401),
        (TOKEN, "Bearer ", 401),
        (TOKEN, "Bearer ünïcode".encode("latin-1"), 401),
    ],
)
def test_action_refused(token: str | None, header: str | bytes | None, status: int) -> None:
    verify = Verify()
    headers = {"Authorization": header} if header is not None else {}
    r = request(
        make_app(token=token, actions={"verify": verify}), "POST", "/api/v1/verify", json={}, headers=headers
    )
    assert r.status_code == status
    assert "error" in r.json()
    assert verify.calls == []
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer ")


def test_action_bad_requests() -> None:
    app = make_app(actions={"verify": Verify()})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(app, "POST", "/api/v1/reboot", json={}, headers=auth).status_code == 404
    assert request(app, "POST", "/api/v1/verify", content=b"[1]", headers=auth).status_code == 400
    assert request(app, "POST", "/api/v1/verify", content=b"{not json", headers=auth).status_code == 400
    assert (
        request(app, "POST", "/api/v1/verify", content=b"{}" + b" " * 70_000, headers=auth).status_code == 413
    )
    assert request(app, "GET", "/api/v1/verify").status_code == 405
    # unauthenticated callers learn nothing about which actions exist
    assert request(app, "POST", "/api/v1/reboot", json={}).status_code == 401


# ------------------------------------------------------------------ the page, as HTML


def test_page_escapes_every_value() -> None:
    snap = healthy()
    evil = replace(snap.targets["uk-999"], description='<script>alert("x")</script>', why="a & b <b>bold</b>")
    r = request(make_app(replace(snap, targets={**snap.targets, "uk-999": evil})), "GET", "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in r.text and "<b>bold</b>" not in r.text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in r.text
    assert "a &amp; b &lt;b&gt;bold&lt;/b&gt;" in r.text


def test_page_content_security_policy_pins_the_inline_style_and_script() -> None:
    r = request(make_app(), "GET", "/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    for kind in ("style", "script"):
        (body,) = re.findall(rf"<{kind}>(.*?)</{kind}>", r.text, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in csp
    assert "http://" not in r.text.replace('href="/', "") and "https://" not in r.text  # no external assets


def test_page_warns_when_the_snapshot_is_stale() -> None:
    # snapshots here are built at import time; a long test run must not make "fresh" stale
    fresh = browser.parse(request(make_app(replace(healthy(), at=datetime.now(UTC))), "GET", "/").text)
    assert fresh.find_all(data_stale=True) == []
    old = replace(healthy(), at=datetime.now(UTC) - timedelta(minutes=5))
    stale = browser.parse(request(make_app(old), "GET", "/").text)
    assert "Stale page" in stale.find(data_stale="true").text


def test_page_timeline_covers_24_hours() -> None:
    dom = browser.parse(request(make_app(outage()), "GET", "/").text)
    card = dom.find("article", data_target="uk-999")
    rects = sorted(card.find_all("rect"), key=lambda r: float(r.attrs["x"]))
    assert [r.attrs["class"] for r in rects] == ["s-none", "s-unknown", "s-up", "s-down", "s-up", "s-down"]
    assert float(rects[0].attrs["x"]) == 0
    assert float(rects[-1].attrs["x"]) + float(rects[-1].attrs["width"]) == pytest.approx(1440)
    assert float(rects[-1].attrs["width"]) >= 4  # 95 s of outage is still visible
    assert rects[3].find("title").text.startswith("down: ") and "(20 min)" in rects[3].find("title").text
    quiet = dom.find("article", data_target="ie-112")
    assert "no record 16.7%" in quiet.find("p", class_="share").text


def test_page_title_leads_with_the_worst() -> None:
    assert "<title>✓ all up" not in request(make_app(), "GET", "/").text  # one is degraded
    text = request(make_app(outage()), "GET", "/").text
    assert "<title>✕ 1 down, 1 degraded · ecpm</title>" in text


# ------------------------------------------------------------------ serve()


def test_serve_and_stop() -> None:
    async def scenario() -> None:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(make_app(), "127.0.0.1:0", ready=ready.set_result))
        url = await asyncio.wait_for(ready, 5)
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).text == "ok"
            # the port is taken now
            with pytest.raises(ListenError, match=r"http.listen: cannot listen on 127\.0\.0\.1:\d+"):
                await serve(make_app(), url.removeprefix("http://").rstrip("/"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ the page, in Chromium


@pytest.mark.peers("chromium")
def test_status_page_in_chromium(tmp_path: Path) -> None:
    current = {"snap": healthy()}
    app = make_app(lambda: current["snap"], incidents=Incidents([RESOLVED]))

    async def scenario() -> None:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(app, "127.0.0.1:0", ready=ready.set_result))
        url = await asyncio.wait_for(ready, 5)
        try:
            dom = browser.parse(await asyncio.to_thread(browser.dump_dom, url))
            assert dom.find("html").attrs.get("data-live") == "on"  # the refresh script ran under the CSP
            cards = {c.attrs["data-target"]: c.attrs["data-state"] for c in dom.find_all("article")}
            assert cards == {"uk-999": "up", "uk-112": "degraded", "ie-112": "up"}
            assert dom.find(data_verdict=True).attrs["data-verdict"] == "degraded"
            assert "No open incidents" in dom.find("main").text

            current["snap"] = outage()
            dom = browser.parse(await asyncio.to_thread(browser.dump_dom, url))
            card = dom.find("article", data_target="uk-999")
            assert card.attrs["data-state"] == "down"
            assert "DOWN" in card.find(class_="badge").text.upper()
            assert "SIP 503" in card.find("p", class_="why").text
            failed = card.find_all("tr", data_outcome="fail")
            assert [r.attrs["data-probe"] for r in failed] == ["lon-1", "man-1"]
            assert "503 Service Unavailable" in failed[0].text
            verdict = dom.find(data_verdict=True)
            assert verdict.attrs["data-verdict"] == "down" and "uk-999" in verdict.text
            incident = dom.find("tr", data_incident="42")
            assert "8.0 s" in incident.text and "pagerduty trigger sent" in incident.text
            assert "slack trigger failed (3 tries)" in incident.text

            shot = await asyncio.to_thread(browser.screenshot, url, tmp_path / "status-page.png")
            assert shot.stat().st_size > 10_000
            if target_png := os.environ.get("ECPM_STATUS_PAGE_PNG"):  # to refresh docs/img/status-page.png
                shutil.copyfile(shot, target_png)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def with_duties(snap: Snapshot, now: datetime | None = None) -> Snapshot:
    """incident 42 with three duties: one counting down, one met, one missed and escalated,
    timed from ``now`` (default: the snapshot's time, which the API counts from)."""
    now = now or snap.at
    duties = (
        IncidentDuty("us-fcc-psap", "notify the PSAPs", now + timedelta(minutes=10), now, ()),
        IncidentDuty(
            "noc", "open the bridge", now - timedelta(seconds=20), now - timedelta(seconds=50), (),
            ack=Ack(now - timedelta(seconds=30), "jo", "BRIDGE-7"),
        ),
        IncidentDuty(
            "us-nors", "file NORS", now - timedelta(seconds=5), now - timedelta(seconds=60), ("ops",),
            escalated_at=now - timedelta(seconds=60),
        ),
    )  # fmt: skip
    [incident] = snap.open_incidents
    return replace(snap, open_incidents=(replace(incident, duties=duties),))


@pytest.mark.peers("chromium")
def test_duties_count_down_on_the_status_page_in_chromium() -> None:
    # timed from the clock the page renders with, not the snapshot's NOW (taken when the
    # module was imported: in a full run that is many minutes before this test)
    snap = with_duties(outage(), datetime.now(UTC))

    async def scenario() -> dict[str, Any]:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(make_app(lambda: snap), "127.0.0.1:0", ready=ready.set_result))
        url = await asyncio.wait_for(ready, 5)
        try:  # 4.5 s of virtual time: the countdown ticks four times, the page is not yet refreshed
            early = browser.parse(await asyncio.to_thread(browser.dump_dom, url, budget_ms=300))
            late = browser.parse(await asyncio.to_thread(browser.dump_dom, url, budget_ms=4_500))
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return {"early": early, "late": late}

    seen = asyncio.run(scenario())

    def left(dom: Any) -> tuple[float, str]:
        row = dom.find("tr", data_incident="42")
        counting = row.find(data_duty="us-fcc-psap").find(class_="countdown")
        minutes, seconds = counting.text.removesuffix(" left").split(":")
        return float(counting.attrs["data-due"]) - (int(minutes) * 60 + int(seconds)), counting.text

    early_gone, early_text = left(seen["early"])
    late_gone, late_text = left(seen["late"])
    assert re.fullmatch(r"\d+:\d\d left", late_text) and late_text != early_text
    # counted down by the page's script, second by second (virtual time: the page's clock)
    assert 0 <= early_gone < 3 and late_gone - early_gone >= 2 and late_gone < 10, (early_gone, late_gone)
    row = seen["late"].find("tr", data_incident="42")
    assert (
        row.find(data_duty="noc").attrs["data-status"] == "met"
        and "BRIDGE-7" in row.find(data_duty="noc").text
    )
    nors = row.find(data_duty="us-nors")
    assert nors.attrs["data-status"] == "missed" and "escalated" in nors.text and "overdue" in nors.text


def test_api_incidents_show_each_duty_with_its_seconds_left() -> None:
    snap = with_duties(outage())
    app = make_app(snap, incidents=Incidents(list(snap.open_incidents)))
    [incident] = request(app, "GET", "/api/v1/incidents").json()["incidents"]
    psap, noc, nors = incident["duties"]
    at = snap.open_incidents[0].duties[0].due_at - snap.at  # counted at the snapshot's time
    assert psap["status"] == "pending" and psap["remaining_seconds"] == pytest.approx(at.total_seconds())
    assert noc["status"] == "met" and noc["ack"]["ref"] == "BRIDGE-7" and noc["ack"]["by"] == "jo"
    assert nors["status"] == "missed" and nors["remaining_seconds"] < 0 and nors["escalated_at"] is not None
    assert nors["route"] == ["ops"] and is_time(nors["due_at"])


@pytest.mark.peers("chromium")
def test_status_page_refreshes_in_place_and_says_when_the_monitor_is_gone() -> None:
    calls = 0

    def snapshot() -> Snapshot:  # first load: healthy; first refresh: outage; then the monitor breaks
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("monitor broken (expected by this test)")
        return healthy() if calls == 1 else outage()

    async def scenario() -> None:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(make_app(snapshot), "127.0.0.1:0", ready=ready.set_result))
        url = await asyncio.wait_for(ready, 5)
        try:  # 11 s of virtual time: two refreshes
            dom = browser.parse(await asyncio.to_thread(browser.dump_dom, url, budget_ms=11_000))
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert calls == 3
        assert dom.find("article", data_target="uk-999").attrs["data-state"] == "down"  # swapped in place
        assert len(dom.find_all("main")) == 1
        assert dom.find("head").find("title").text.startswith("✕ 1 down")
        offline = dom.find(id="offline")
        assert "hidden" not in offline.attrs
        assert "NOT live" in offline.text and "HTTP 500" in offline.text

    asyncio.run(scenario())


def test_page_with_nothing_known_yet() -> None:
    empty = Snapshot(at=NOW, targets={}, probes={}, open_incidents=(), timeline=())
    dom = browser.parse(request(make_app(empty, incidents=Incidents([])), "GET", "/").text)
    assert dom.find(data_verdict=True).attrs["data-verdict"] == "none"
    assert "No targets configured" in dom.find("main").text and "No probes known" in dom.find("main").text
    fresh = replace(healthy(), timeline=())  # no state changes recorded: the strip starts at `since`
    card = browser.parse(request(make_app(fresh), "GET", "/").text).find("article", data_target="uk-112")
    assert [r.attrs["class"] for r in card.find_all("rect")] == ["s-none", "s-degraded"]


def test_clock_skew_on_the_api_and_the_status_page() -> None:
    """A probe whose clock is off: its estimated skew is in the API and on the page, and a
    result judged with a skew beyond ingest.max_clock_skew is marked; times shown are judged."""
    snap = healthy()
    skewed = replace(
        snap.targets["uk-999"].latest[0],
        finished_at=ago(minutes=-5),
        judged_at=ago(seconds=4),
        clock_skew=300.0,
    )
    uk = replace(snap.targets["uk-999"], latest=(skewed, *snap.targets["uk-999"].latest[1:]))
    probes = {**PROBES, "lon-1": replace(PROBES["lon-1"], clock_skew=300.0, clock_skewed=True)}
    snap = replace(snap, targets={**snap.targets, "uk-999": uk}, probes=probes, max_clock_skew=30.0)
    app = make_app(snap)
    by_id = {p["id"]: p for p in request(app, "GET", "/api/v1/probes").json()["probes"]}
    assert (by_id["lon-1"]["clock_skew_seconds"], by_id["lon-1"]["clock_skewed"]) == (300.0, True)
    assert (by_id["man-1"]["clock_skew_seconds"], by_id["man-1"]["clock_skewed"]) == (None, False)
    latest = request(app, "GET", "/api/v1/targets").json()["targets"][0]["latest"][0]
    assert latest["clock_skew_seconds"] == 300.0
    assert latest["judged_at"] < latest["finished_at"]  # the probe's stamp is 5 min ahead

    dom = browser.parse(request(app, "GET", "/").text)
    row = dom.find("tr", data_probe="lon-1", data_status="online")
    assert "+300.0 s" in row.text and "beyond 30 s" in row.text
    assert "—" in dom.find("tr", data_probe="man-1", data_status="online").text
    card = dom.find("article", data_target="uk-999")
    first = card.find("tr", data_probe="lon-1", data_check="invite")
    assert "probe clock +300.0 s" in first.text
    assert first.find("time").attrs["datetime"] == latest["judged_at"]  # shown at its judged time
    assert "probe clock" not in card.find("tr", data_probe="man-1").text


# ------------------------------------------------------------------ many targets: filter and paging


def estate(n: int, *, down_every: int = 20) -> Snapshot:
    """``n`` targets ``psap-0000``… on three probes, one in ``down_every`` down, one degraded."""
    targets: dict[str, TargetView] = {}
    for i in range(n):
        name = f"psap-{i:04d}"
        state: TargetStateName = "down" if i % down_every == 0 else "degraded" if i == 7 else "up"
        calls = [result(p, name, at=ago(seconds=5 + k), outcome="fail" if state == "down" else "pass")
                 for k, p in enumerate(("lon-1", "man-1", "edi-1"))]  # fmt: skip
        options = [
            result(p, name, at=ago(seconds=9), check="options", pdd=None, mos=None)
            for p in ("lon-1", "man-1")
        ]
        why = "last 2 calls failed" if state == "down" else "last 2 calls passed"
        targets[name] = target(name, state, since=ago(hours=1), why=why, latest=[*calls, *options],
                               description=f"answering point {i}")  # fmt: skip
    changes = tuple(StateChange(t, "up", ago(hours=3)) for t in targets)
    return Snapshot(at=NOW, targets=targets, probes=PROBES, open_incidents=(), timeline=changes)


def cards(markup: str) -> list[tuple[str, str]]:
    return [
        (c.attrs["data-target"], c.attrs["data-state"]) for c in browser.parse(markup).find_all("article")
    ]


def test_page_shows_the_worst_first_a_page_at_a_time_and_links_the_rest() -> None:
    app = make_app(estate(120))
    text = request(app, "GET", "/").text
    shown = cards(text)
    assert len(shown) == 50
    down = [(f"psap-{i:04d}", "down") for i in range(0, 120, 20)]
    assert shown[:7] == [*down, ("psap-0007", "degraded")]  # then the up ones, in configuration order
    assert shown[7:9] == [("psap-0001", "up"), ("psap-0002", "up")]
    dom = browser.parse(text)
    pager = dom.find_all("nav", class_="pager")[0]
    assert "Targets 1–50 of 120" in pager.text and "page 1 of 3" in pager.text
    assert [a.attrs["href"] for a in pager.find_all("a", rel="next")] == ["?page=2"]
    rest = dom.find("div", class_="rest")  # every target not on this page, a link to its card
    links = {a.text: a.attrs["href"] for a in rest.find_all("a")}
    assert len(links) == 70 and links["psap-0119"] == "?page=3#target-psap-0119"
    assert "psap-0001" not in links

    last = cards(request(app, "GET", "/", params={"page": "3"}).text)
    assert len(last) == 20 and last[-1] == ("psap-0119", "up")
    assert "No targets on this page" in request(app, "GET", "/", params={"page": "9"}).text


def test_page_filters_by_state_and_text_in_the_query_string() -> None:
    app = make_app(estate(120))
    assert cards(request(app, "GET", "/", params={"state": "down"}).text) == [
        (f"psap-{i:04d}", "down") for i in range(0, 120, 20)
    ]
    problems = request(app, "GET", "/?state=degraded,down").text
    assert [s for _, s in cards(problems)] == ["down"] * 6 + ["degraded"]
    dom = browser.parse(problems)
    counts = {
        a.text.split()[0]: a for a in dom.find("nav", aria_label="Filter targets by state").find_all("a")
    }
    assert (
        counts["all"].text == "all 120" and counts["down"].text == "down 6" and counts["up"].text == "up 113"
    )
    assert counts["down"].attrs["href"] == "?state=down"
    assert dom.find("input", name="state").attrs["value"] == "down,degraded"  # the search keeps the filter

    found = request(app, "GET", "/", params={"q": "PSAP-011"}).text
    assert [t for t, _ in cards(found)] == [f"psap-{i:04d}" for i in range(110, 120)]
    assert browser.parse(found).find("input", name="q").attrs["value"] == "PSAP-011"
    assert "No targets match" in request(app, "GET", "/", params={"q": "nowhere"}).text
    assert len(cards(request(app, "GET", "/", params={"limit": "5", "page": "2"}).text)) == 5
    for bad in ({"state": "sideways"}, {"page": "0"}, {"page": "x"}, {"limit": "201"}, {"q": "x" * 201}):
        r = request(app, "GET", "/", params=bad)
        assert r.status_code == 400, bad
        assert next(iter(bad)) in r.text


def test_page_at_1000_targets_stays_small() -> None:
    snap = estate(1000)
    r = request(make_app(snap), "GET", "/", headers={"Accept-Encoding": "identity"})
    assert len(cards(r.text)) == 50
    assert len(r.content) < 500_000
    zipped = request(make_app(snap), "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and cards(zipped.text) == cards(r.text)
    assert zipped.num_bytes_downloaded < len(r.content) / 5


def test_api_targets_filter_and_pages() -> None:
    app = make_app(estate(120))
    whole = request(app, "GET", "/api/v1/targets")
    assert len(whole.json()["targets"]) == 120 and "link" not in whole.headers  # without ?limit: every one
    assert whole.headers["x-total-count"] == "120"
    r = request(app, "GET", "/api/v1/targets", params={"limit": "50", "page": "2"})
    assert set(r.json()) == {"at", "targets"}
    ids = [t["id"] for t in r.json()["targets"]]
    assert ids == [f"psap-{i:04d}" for i in range(50, 100)]  # configuration order, as without paging
    assert r.headers["link"] == (
        '</api/v1/targets?limit=50>; rel="first", </api/v1/targets?limit=50>; rel="prev", '
        '</api/v1/targets?limit=50&page=3>; rel="next", </api/v1/targets?limit=50&page=3>; rel="last"'
    )
    down = request(app, "GET", "/api/v1/targets", params={"state": "down", "q": "psap-00"})
    assert [t["id"] for t in down.json()["targets"]] == [
        "psap-0000",
        "psap-0020",
        "psap-0040",
        "psap-0060",
        "psap-0080",
    ]
    assert down.headers["x-total-count"] == "5"
    for bad in ({"state": "nope"}, {"limit": "0"}, {"limit": "1001"}, {"page": "-1"}):
        r = request(app, "GET", "/api/v1/targets", params=bad)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["error"]


@pytest.mark.peers("chromium")
def test_filtered_page_in_chromium_keeps_its_query_when_it_refreshes() -> None:
    calls = 0

    def snapshot() -> Snapshot:  # the first refresh brings psap-0001 down too
        nonlocal calls
        calls += 1
        snap = estate(120)
        if calls == 1:
            return snap
        one = replace(snap.targets["psap-0001"], state="down")
        return replace(snap, targets={**snap.targets, "psap-0001": one})

    async def scenario() -> None:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(make_app(snapshot), "127.0.0.1:0", ready=ready.set_result))
        url = await asyncio.wait_for(ready, 5)
        try:  # 6 s of virtual time: one refresh
            dom = browser.parse(
                await asyncio.to_thread(browser.dump_dom, f"{url}?state=down", budget_ms=6_000)
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert calls >= 2
        assert dom.find("html").attrs.get("data-live") == "on"
        shown = [c.attrs["data-target"] for c in dom.find_all("article")]
        assert shown == [
            "psap-0000",
            "psap-0001",
            "psap-0020",
            "psap-0040",
            "psap-0060",
            "psap-0080",
            "psap-0100",
        ]

    asyncio.run(scenario())


def test_services_on_the_api_and_the_status_page() -> None:
    snap = outage()  # uk-999 down, ie-112 up
    paths = (PathView("ie-112", "primary", "up", False), PathView("uk-999", "backup", "down", True))
    snap = replace(snap, services={"uk": ServiceView("uk", "two platforms", "degraded", paths)})
    app = make_app(snap)
    [service] = request(app, "GET", "/api/v1/services").json()["services"]
    assert service == {
        "id": "uk", "description": "two platforms", "state": "degraded", "redundancy_lost": True,
        "paths": [
            {"target": "ie-112", "role": "primary", "state": "up", "lost": False},
            {"target": "uk-999", "role": "backup", "state": "down", "lost": True},
        ],
    }  # fmt: skip
    page = browser.parse(request(app, "GET", "/").text)
    row = page.find("tr", data_service="uk")
    assert row.attrs["data-state"] == "degraded" and "redundancy LOST" in row.text
    assert row.find(data_path="uk-999").attrs["data-lost"] == "true"
