"""The invite and options checks against the project's own responder (a subprocess
on loopback): both tones heard, every fault mode failing at the right stage, the
NENA-style answer, the busy limit, the HTTP control, clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecpm.settings import TlsFiles
from probes.checks import ANNOUNCEMENT, invite_check, options_check
from probes.config import EmergencyShape, Location, ScheduleSettings, SipSettings, Target
from probes.media import wav_duration
from probes.outcome import CheckOutcome
from probes.scheduler import CheckReport, Scheduler
from probes.sip import SipEngine
from tests.support.paths import REPO
from tests.support.peers import peer_path
from tests.support.sip import ResponderProcess, make_target, with_engine


def invite(uri: str, *, announcement: Path | None = None, **kwargs: object) -> CheckOutcome:
    target = make_target(uri, **kwargs)  # type: ignore[arg-type]

    async def body(engine: SipEngine) -> CheckOutcome:
        return await invite_check(engine, target, announcement=announcement)

    return with_engine(body)


def test_pass_with_both_tones_heard(clean_responder: ResponderProcess) -> None:
    out = invite(clean_responder.uri)
    assert out.outcome == "pass", out
    assert out.stage is None and out.reason is None
    assert (out.sip_status, out.sip_reason) == (200, "OK")
    assert list(out.timings) == ["transport", "trying", "ringing", "answer", "media", "teardown"]
    # ring_time is 20 ms: the answer comes after it, the 180 long before
    assert out.timings["ringing"] < 0.02 <= out.timings["answer"] < 0.5
    assert out.media is not None
    assert out.media.tone_heard and out.media.echo_heard is True
    assert out.media.rx_packets >= 40 and out.media.tx_packets >= 40  # 1 s of 20 ms packets
    assert out.media.loss == 0.0
    assert out.media.mos is not None and 4.3 <= out.media.mos <= 4.5
    assert "announcement" not in out.detail


def test_pass_over_tcp(clean_responder: ResponderProcess) -> None:
    out = invite(clean_responder.uri, transport="tcp")
    assert out.outcome == "pass", out


def test_wrong_expected_tone_is_not_heard(clean_responder: ResponderProcess) -> None:
    """The responder plays 1400 Hz; listening for 1800 Hz must not find it."""
    out = invite(clean_responder.uri, expect_tone_hz=1800)
    assert (out.outcome, out.stage, out.reason) == ("fail", "media", "no_tone")
    assert out.media is not None and not out.media.tone_heard and out.media.echo_heard


@pytest.mark.parametrize(
    ("fault", "stage", "reason", "status"),
    [
        ("answer_503", "answer", "service_unavailable", 503),
        ("never_answer", "answer", "answer_timeout", 180),
        ("no_media", "media", "no_rtp", 200),
        ("one_way_media", "media", "no_echo", 200),
        ("delayed_answer", "answer", "answer_timeout", 180),
    ],
)
def test_fault_fails_at_its_stage(
    clean_responder: ResponderProcess, fault: str, stage: str, reason: str, status: int
) -> None:
    clean_responder.set_fault(fault)
    started = time.monotonic()
    out = invite(clean_responder.uri)
    took = time.monotonic() - started
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", stage, reason, status), out
    if reason == "answer_timeout":  # 2 s after the INVITE went out, then CANCEL
        assert 1.9 <= took < 8.0  # the 2 s answer timer, not the call's max duration
        assert "answer" not in out.timings and out.timings["ringing"] < 1.0  # rings at once
    if fault == "one_way_media":
        assert out.media is not None and out.media.tone_heard and out.media.echo_heard is False
    if fault == "no_media":
        assert out.media is not None and out.media.rx_packets == 0 and out.media.mos is None


def test_delayed_answer_passes_when_the_wait_is_long_enough(clean_responder: ResponderProcess) -> None:
    proc = ResponderProcess("--fault", "delayed_answer", "--answer-delay", "1500ms")
    try:
        out = invite(proc.uri, answer_timeout="3s")
        assert out.outcome == "pass", out
        assert 1.5 <= out.timings["answer"] < 2.5
        assert out.timings["ringing"] < 0.75  # ringing at once, not at the answer
    finally:
        assert proc.stop() == 0


def test_announcement_when_no_responder_tone(clean_responder: ResponderProcess) -> None:
    """Answered by something that plays no responder tone: the prompt is played."""
    started = time.monotonic()
    out = invite(clean_responder.uri, expect_tone_hz=1800, announcement=ANNOUNCEMENT)
    took = time.monotonic() - started
    assert out.detail.get("announcement") == "played"
    assert took >= 1.0 + wav_duration(ANNOUNCEMENT)  # media window, then the whole prompt
    assert out.reason == "no_tone" and "teardown" in out.timings


def test_through_the_scheduler_the_result_goes_as_the_announcement_starts(
    clean_responder: ResponderProcess,
) -> None:
    """The verdict is final before the prompt: reported at once, while the slot stays
    taken until the call has ended (no confirmation call during the prompt)."""
    target = make_target(clean_responder.uri, expect_tone_hz=1800, options=False)

    async def body(engine: SipEngine) -> tuple[float, CheckReport, float]:
        loop = asyncio.get_running_loop()
        reported: list[tuple[float, CheckReport]] = []
        ended: list[float] = []
        call_over = asyncio.Event()

        async def run(t: Target, kind: str) -> CheckOutcome:
            try:
                return await invite_check(engine, t, announcement=ANNOUNCEMENT)
            finally:
                ended.append(loop.time())
                call_over.set()

        async def sink(report: CheckReport) -> None:
            reported.append((loop.time(), report))

        schedule = ScheduleSettings(jitter=0.0, confirm_failures=False)
        scheduler = Scheduler(targets=[target], settings=schedule, runner=run, sink=sink)
        started = loop.time()
        task = asyncio.create_task(scheduler.run())
        await call_over.wait()
        await scheduler.stop()
        await task
        assert len(reported) == 1
        return reported[0][0] - started, reported[0][1], ended[0] - started

    at, report, ended = with_engine(body)
    out = report.outcome
    assert out.reason == "no_tone" and out.detail.get("announcement") == "played"
    assert "teardown" not in out.timings  # handed over before the hang-up
    assert at < 1.0 + wav_duration(ANNOUNCEMENT)  # the media window, not the whole prompt
    assert ended >= at + wav_duration(ANNOUNCEMENT)  # the call went on after the report


def test_options_pass(clean_responder: ResponderProcess) -> None:
    target = make_target(clean_responder.uri)

    async def body(engine: SipEngine) -> CheckOutcome:
        return await options_check(engine, target)

    out = with_engine(body)
    assert (out.outcome, out.sip_status) == ("pass", 200), out
    assert out.timings["answer"] < 0.5


def test_nena_answer_echoes_location(clean_responder: ResponderProcess) -> None:
    shape = EmergencyShape(
        p_asserted_identity="sip:+441632960000@probe.example;user=phone",
        resource_priority="esnet.1",
        location=Location(latitude=51.501, longitude=-0.1416, radius_m=20, civic={"country": "GB"}),
    )
    out = invite(clean_responder.uri, emergency=shape)
    assert out.outcome == "pass", out
    assert out.detail["nena.answering_point"] == "ecpm test responder"
    assert out.detail["nena.location"].startswith("geo:51.501,-0.1416")
    assert out.detail["nena.service_urn"] == clean_responder.uri


def test_busy_above_max_calls_fails_as_busy() -> None:
    proc = ResponderProcess("--max-calls", "1", "--fault", "never_answer")
    try:
        first = make_target(proc.uri, answer_timeout="3s", max_duration="10s")
        second = make_target(proc.uri)

        async def body(engine: SipEngine) -> tuple[CheckOutcome, CheckOutcome]:
            ringing = asyncio.ensure_future(invite_check(engine, first, announcement=None))
            await asyncio.sleep(0.3)  # the first call is ringing at the responder
            busy = await invite_check(engine, second, announcement=None)
            return await ringing, busy

        ringing, busy = with_engine(body)
        assert (busy.outcome, busy.stage, busy.reason, busy.sip_status) == (
            "fail",  # on a plain target 486 is a failure; NENA-shaped targets score it inconclusive
            "answer",
            "busy",
            486,
        )
        assert ringing.reason == "answer_timeout"
        _, status = proc.http("GET", "/status")
        assert '"busy_total": 1' in status
    finally:
        assert proc.stop() == 0


def test_control_endpoint(clean_responder: ResponderProcess) -> None:
    assert clean_responder.http("GET", "/health") == (200, "ok\n")
    assert clean_responder.http("GET", "/fault") == (200, "none\n")
    status, body = clean_responder.http("PUT", "/fault", "melt_down")
    assert status == 400 and "answer_503" in body
    assert clean_responder.http("PUT", "/fault", "no_media") == (200, "no_media\n")
    assert clean_responder.http("GET", "/fault") == (200, "no_media\n")
    assert clean_responder.http("GET", "/nowhere")[0] == 404
    assert clean_responder.http("DELETE", "/fault")[0] == 405


def test_control_token(tmp_path: Path) -> None:
    config = tmp_path / "responder.yaml"
    config.write_text("kind: responder\ncontrol:\n  token: ${ECPM_TEST_TOKEN}\n")
    proc = ResponderProcess("-c", str(config), token="s3cret")
    try:
        assert proc.http("GET", "/fault")[0] == 401
        assert proc.http("GET", "/fault", token="wrong")[0] == 401
        assert proc.http("PUT", "/fault", "answer_503", token="s3cret") == (200, "answer_503\n")
        out = invite(proc.uri)
        assert (out.stage, out.sip_status) == ("answer", 503)
    finally:
        assert proc.stop() == 0


def test_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "responder.yaml"
    config.write_text("kind: responder\nmode: karaoke\n")
    run = subprocess.run(
        [sys.executable, "-m", "ecpm", "responder", "-c", str(config)],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert run.returncode == 2
    assert f"{config}:2: mode: must be" in run.stderr
    assert "Traceback" not in run.stderr


def test_far_end_hangs_up_before_the_tones_are_heard() -> None:
    proc = ResponderProcess("--max-call-duration", "100ms")
    try:
        out = invite(proc.uri)
        assert (out.outcome, out.stage, out.reason) == ("fail", "media", "remote_hangup"), out
        assert out.detail["hangup"] == "far end, during media"
        assert "teardown" not in out.timings
    finally:
        assert proc.stop() == 0


def test_responder_shutdown_with_call_in_flight_exits_0() -> None:
    """SIGTERM while a call is up: the responder hangs up (BYE), destroys pjsua2 and
    exits 0 — no C assertion, no traceback. Both tones were heard before the far end
    hung up, but a plain path that drops the call inside the media window fails it."""
    proc = ResponderProcess()
    target = make_target(proc.uri, media_time="4s")

    async def body(engine: SipEngine) -> CheckOutcome:
        task = asyncio.ensure_future(invite_check(engine, target, announcement=None))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(proc.stop, signal.SIGTERM)
        return await task

    out = with_engine(body)
    assert proc.proc.returncode == 0, proc.stderr_text
    assert "Assertion" not in proc.stderr_text and "Traceback" not in proc.stderr_text
    assert (out.outcome, out.stage, out.reason) == ("fail", "media", "remote_hangup"), out
    assert out.detail["hangup"] == "far end, during media"
    assert out.media is not None and out.media.rx_packets > 20
    assert out.media.tone_heard and out.media.echo_heard


@pytest.mark.peers("openssl")
def test_tls(tmp_path: Path) -> None:
    """TLS both ways: the responder's certificate verified against our CA file; the
    same call with another CA fails at transport."""
    key, cert, other_key, other = (tmp_path / n for n in ("key.pem", "cert.pem", "k2.pem", "other.pem"))
    for k, c in ((key, cert), (other_key, other)):
        subprocess.run(
            [
                peer_path("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(k), "-out", str(c), "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    config = tmp_path / "responder.yaml"
    config.write_text(
        "kind: responder\nsip:\n  transports: [udp, tls]\n"
        f"  tls: {{cert_file: {cert}, key_file: {key}, verify_peer: false}}\n"
    )
    proc = ResponderProcess("-c", str(config))
    try:
        assert f"tls 127.0.0.1:{proc.port + 1}" in proc.ready_line
        target = make_target(f"sip:ecpm-test@127.0.0.1:{proc.port + 1};transport=tls", transport="tls")
        outcomes = []
        for ca in (cert, other):
            settings = SipSettings(transports=["udp", "tls"], tls=TlsFiles(ca_file=str(ca), verify_peer=True))

            async def body(engine: SipEngine) -> CheckOutcome:
                return await invite_check(engine, target, announcement=None)

            outcomes.append(with_engine(body, settings=settings))
        good, bad = outcomes
        assert good.outcome == "pass", good
        assert (bad.outcome, bad.stage, bad.reason) == ("fail", "transport", "transport_error"), bad
        # the handshake as negotiated: OpenSSL 1.0.2k in the wheel, so TLS 1.2 at most
        assert good.detail["tls.protocol"] == "TLSv1.2" and good.detail["tls.verified"] == "yes", good
        assert good.detail["tls.verify"] == "ok" and good.detail["tls.peer"] == "127.0.0.1"
        assert good.detail["tls.cipher"]
        assert bad.detail["tls.verified"] == "no" and bad.detail["tls.verify"] != "ok", bad
    finally:
        assert proc.stop() == 0
