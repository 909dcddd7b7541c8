"""The customer's path as a user runs it (issue 15): ``ecpm probe`` with a SIP account
registers at a real Kamailio (digest auth), places its emergency-shaped test call from
the account through Kamailio to the responder, and publishes both results over MQTT to
``ecpm monitor``, every piece its own process; Kamailio restarted shows as the loss and
the re-registration in the monitor's ``ecpm_registration_up``. Every peer on 127.0.0.1."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from probes.result import Result
from tests.support.kamailio import PASSWORD, USER, Kamailio
from tests.support.mqtt import Subscriber
from tests.support.system import System

pytestmark = pytest.mark.peers("mosquitto", "kamailio")

NUMBER = "+441632960000"
INVITE = {"interval": "2s", "media_time": "1s", "answer_timeout": "3s", "first_response_timeout": "2s",
          "max_duration": "12s", "dtmf": "1234#"}  # fmt: skip


def account(kamailio: Kamailio) -> dict[str, object]:
    """The target's fields for a desk phone's account: register, then call through the proxy."""
    return {
        "uri": kamailio.service_uri,
        "account": {"registrar": kamailio.registrar, "username": USER, "password": PASSWORD, "expiry": "60s"},
        "emergency": {
            "callback_number": NUMBER,
            "location": {"latitude": 51.5034, "longitude": -0.1276, "radius_m": 50},
        },
        "checks": {"register": {"interval": "2s", "timeout": "1s"}, "invite": INVITE},
    }


def latest(sub: Subscriber, check: str) -> Result | None:
    seen = [r for r in sub.results() if r.check == check]
    return seen[-1] if seen else None


def test_a_registered_probe_calls_through_kamailio_and_the_monitor_sees_registration_come_and_go(
    tmp_path: Path,
) -> None:
    with System(tmp_path, interval="2s") as system:
        responder = system.add_responder("r1")
        with Kamailio(tmp_path, responder=responder.uri).start() as kamailio:
            sub = Subscriber(system.broker, "ecpm/v1/results/#", tmp_path / "sub.txt")
            try:
                system.add_probe("p1", {"desk": "r1"}, target=account(kamailio))
                system.start_monitor()
                system.wait_state("desk", "up", timeout=60)

                def registration() -> float | None:
                    return system.metric("ecpm_registration_up", target="desk", probe="p1")

                system.wait_for(lambda: registration() == 1, 30, "ecpm_registration_up 1")
                system.wait_for(lambda: latest(sub, "invite") is not None, 30, "a call's result")
                call = latest(sub, "invite")
                assert call is not None and call.outcome == "pass", call
                assert {"answer", "identity", "media", "dtmf", "teardown"} <= set(call.timings), call.timings
                assert call.detail["identity.cli"] == f"<tel:{NUMBER}>"
                assert call.detail["dtmf.received"] == "1234#"
                reg = latest(sub, "register")
                assert reg is not None and reg.outcome == "pass" and reg.sip_status == 200, reg
                log = kamailio.text()
                assert "ecpm: challenged INVITE" in log and "ecpm: relayed INVITE to the responder" in log

                kamailio.stop()
                system.wait_for(lambda: registration() == 0, 30, "ecpm_registration_up 0, registrar gone")
                lost_seen = datetime.now(UTC)  # a call already under way may still pass

                def calls_since() -> list[Result]:
                    return [r for r in sub.results() if r.check == "invite" and r.started_at > lost_seen]

                system.wait_for(calls_since, 30, "a call while unregistered")
                failed = calls_since()
                assert all((r.outcome, r.stage) == ("fail", "transport") for r in failed), failed
                assert failed[0].reason == "not_registered", failed

                kamailio.start()
                system.wait_for(lambda: registration() == 1, 30, "ecpm_registration_up 1 again")
                back = latest(sub, "register")
                assert back is not None and back.detail.get("registration") == "re-registered", back
                system.wait_state("desk", "up", timeout=60)
            finally:
                sub.stop()
