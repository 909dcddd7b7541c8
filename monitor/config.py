"""Config model for the monitor. Every option is documented in ``config/monitor.example.yaml``."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, model_validator

from ecpm.configfile import (
    DAY,
    HOUR,
    MINUTE,
    Duration,
    Loc,
    SecretFile,
    StrictModel,
    duration,
    pick_secret,
    repeats,
    secret_text,
)
from ecpm.settings import Listen, ListenField, MqttSettings, Name, SigningKey
from monitor.store import is_url


class KnownProbe(SigningKey):
    id: Name  # its key (SigningKey) verifies its results


# Notification duties (docs/monitor.md, "Notification duties"). The presets carry the
# figures of the rules they are named after, as this version read them; they are not
# legal advice: the operator confirms them for its own licence before relying on them.
DUTY_PRESETS: dict[str, dict[str, object]] = {
    "us-fcc-psap": {
        "deadline": "30m",
        "text": "notify every affected PSAP of the 911 outage (FCC 22-88: as soon as possible,"
        " within 30 minutes of discovering it)",
    },
    "us-nors": {
        "deadline": "120m",
        "text": "file the NORS notification of the outage (47 CFR 4.9: within 120 minutes of discovering it)",
    },
    "us-nors-voip": {
        "deadline": "240m",
        "text": "file the NORS notification for interconnected VoIP (47 CFR 4.9(g): within 240 minutes)",
    },
    # s105K says "as soon as reasonably practicable": no figure, so the operator sets deadline
    "uk-ofcom-s105k": {
        "text": "tell Ofcom of the security compromise (Communications Act 2003 s105K: as soon as"
        " reasonably practicable; judged against General Condition A3.2(b))",
    },
}
IncidentKindName = Literal["down", "gap"]
_DOWN: tuple[IncidentKindName, ...] = ("down",)


class Duty(StrictModel):
    """A clock an incident starts: ``deadline`` after detection, someone must have done
    ``text`` and acknowledged it (``ecpm incident ack``); unacknowledged ``escalate_before``
    the deadline, it pages ``route`` (notifier names; empty: every notifier) once."""

    name: Name
    preset: Literal["us-fcc-psap", "us-nors", "us-nors-voip", "uk-ofcom-s105k"] | None = None
    deadline: Annotated[float, duration(at_most=30 * DAY)]
    escalate_before: Annotated[float, duration(at_most=30 * DAY, zero_ok=True)] = 10 * MINUTE
    route: list[Name] = Field(default_factory=list, max_length=50)
    text: str = Field(min_length=1, max_length=500)
    # which incidents carry it: down (an outage) by default; gap (no fresh results) too if named
    kinds: list[IncidentKindName] = Field(default_factory=lambda: list(_DOWN), min_length=1, max_length=2)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("preset"), str):
            preset = DUTY_PRESETS.get(data["preset"])
            if preset is not None:
                if "deadline" not in preset and "deadline" not in data:
                    raise ValueError(
                        f"preset {data['preset']} has no fixed deadline in its rule"
                        " (as soon as reasonably practicable): set deadline to the one you confirmed"
                    )
                return {**preset, "name": data["preset"], **data}
        return data

    @model_validator(mode="after")
    def _lead(self) -> Self:
        if self.escalate_before >= self.deadline:
            raise ValueError("escalate_before must be shorter than deadline (it is counted back from it)")
        return self


class MonitoredTarget(StrictModel):
    id: Name
    interval: Annotated[float, duration(at_most=DAY)] = 30.0  # the probes' invite interval for this target
    description: str = ""
    duties: list[Duty] = Field(default_factory=list, max_length=20)  # besides the global ones


class Service(StrictModel):
    """Targets grouped as the paths of one service (docs/monitor.md, "Redundancy"): it is
    available while any path is up; a lost path, primary or backup, is ``degraded``."""

    id: Name
    description: str = ""
    primary: list[Name] = Field(min_length=1, max_length=20)  # target ids
    backup: list[Name] = Field(min_length=1, max_length=20)


class Reachability(StrictModel):
    confirm_results: int = Field(default=2, ge=1, le=10)  # K: latest K results all failed → down
    min_failing_probes: int = Field(default=2, ge=1, le=100)  # M, when at least M probes cover the target
    stale_after: float = Field(default=3.0, ge=1.0, le=100.0)  # × interval without a fresh result → unknown
    # a monitoring gap this long opens an incident
    gap_incident_after: Annotated[float, duration(at_most=7 * DAY)] = 300.0
    # slower ringing on a pass → degraded
    degraded_post_dial_delay: Annotated[float, duration(at_most=5 * MINUTE)] = 3.0
    degraded_mos: float = Field(default=3.6, ge=1.0, le=4.5)  # lower MOS on a pass → degraded
    probe_stale_after: Annotated[float, duration(at_most=DAY)] = 120.0  # a probe silent this long is not up
    # out of down this long before it resolves
    resolve_after: Annotated[float, duration(at_most=DAY, zero_ok=True)] = 60.0


class StoreSettings(StrictModel):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "ecpm-monitor.db"  # sqlite: the file
    # postgres: postgresql://user:password@host:port/database — a secret (it may hold a password)
    url: SecretStr | None = None
    url_file: SecretFile | None = None
    retention: Annotated[float, duration(at_most=3660 * DAY)] = 400 * DAY  # older results are pruned
    # no effect since batched ingest (monitor.service: a batch commits as soon as it is
    # handled); still accepted, so that configs naming it load
    commit_interval: Annotated[float, duration(at_most=10.0)] = 0.2

    @model_validator(mode="after")
    def _one_place(self) -> Self:
        url = pick_secret(self.url, self.url_file, name="url", required=self.backend == "postgres")
        if self.backend == "sqlite" and url is not None:
            raise ValueError("url is the postgres backend's: set backend: postgres, or give path for sqlite")
        if self.backend == "postgres" and "path" in self.model_fields_set:
            raise ValueError("path is the sqlite backend's: give url (or url_file) for postgres, not both")
        if url is not None and not is_url(url.get_secret_value()):
            raise ValueError("url must be a postgresql:// URL")
        return self

    @property
    def where(self) -> str:
        """What ``open_store`` takes: the SQLite file, or the PostgreSQL URL."""
        return secret_text(self, "url") or self.path


class MonitorMqtt(MqttSettings):
    # MQTT 5 Session Expiry Interval: how long the broker keeps this monitor's session —
    # its subscriptions' queue of results — after it disconnects. Long enough to cover a
    # monitor restart or a day's outage; not for ever, because a monitor that is retired
    # or renamed leaves a session that goes on taking results (docs/deploy.md). MQTT 3.1.1
    # cannot send it: there the broker's persistent_client_expiration decides.
    session_expiry: Annotated[float, duration(at_least=MINUTE, at_most=7 * DAY)] = DAY


class Http(StrictModel):
    listen: ListenField = Listen("127.0.0.1", 9470)
    # where people reach the status page (a page links to it); without it, the listen
    # address when that is a usable one, no link when it is a wildcard (0.0.0.0, ::)
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+")
    token: SecretStr | None = None  # bearer token for endpoints that change state
    token_file: SecretFile | None = None

    @property
    def status_url(self) -> str | None:
        if self.public_url is not None:
            return self.public_url if self.public_url.endswith("/") else self.public_url + "/"
        if ipaddress.ip_address(self.listen.host).is_unspecified:
            return None
        return f"http://{self.listen}/"

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        pick_secret(self.token, self.token_file, name="token", required=False)
        return self


class Ingest(StrictModel):
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    shared_group: str | None = "ecpm"  # $share/<group>/... ; None: plain subscription
    # a result's times, against the monitor's clock when it arrives (docs/monitor.md, Bounds):
    # finished no longer ago than max_result_age (an outbox drained after a long outage is
    # still evidence), started and finished no further ahead than max_clock_ahead
    max_result_age: Annotated[Duration, Field(ge=60, le=400 * 86400)] = 30 * 86400.0
    max_clock_ahead: Annotated[Duration, Field(ge=1, le=86400)] = 900.0
    # a probe clock skew (monitor.skew) beyond this, either way, is marked in the evidence and
    # alerted on (EcpmProbeClockSkew); results are judged by the monitor's clock whatever it is
    max_clock_skew: Annotated[Duration, Field(ge=1, le=3600)] = 30.0


class _Notifier(StrictModel):
    name: Name
    timeout: Annotated[float, duration(at_most=5 * MINUTE)] = 5.0
    retries: int = Field(default=5, ge=0, le=20)
    backoff: Annotated[float, duration(at_most=HOUR)] = 2.0  # first retry delay; doubles each time


class WebhookNotifier(_Notifier):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")


class PagerDutyNotifier(_Notifier):
    type: Literal["pagerduty"]
    routing_key: SecretStr | None = None
    routing_key_file: SecretFile | None = None
    url: str = Field(default="https://events.pagerduty.com/v2/enqueue", pattern=r"^https?://")

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        pick_secret(self.routing_key, self.routing_key_file, name="routing_key", required=True)
        return self


class SlackNotifier(_Notifier):
    type: Literal["slack"]
    url: SecretStr | None = None  # the incoming-webhook URL is itself a secret
    url_file: SecretFile | None = None

    @model_validator(mode="after")
    def _one_url(self) -> Self:
        pick_secret(self.url, self.url_file, name="url", required=True)
        return self


Notifier = Annotated[WebhookNotifier | PagerDutyNotifier | SlackNotifier, Field(discriminator="type")]


class MonitorConfig(StrictModel):
    kind: Literal["monitor"]
    id: Name = "monitor"
    mqtt: MonitorMqtt = Field(default_factory=MonitorMqtt)
    ingest: Ingest = Field(default_factory=Ingest)
    store: StoreSettings = Field(default_factory=StoreSettings)
    http: Http = Field(default_factory=Http)
    reachability: Reachability = Field(default_factory=Reachability)
    probes: list[KnownProbe] = Field(min_length=1, max_length=500)
    targets: list[MonitoredTarget] = Field(min_length=1, max_length=2000)
    notifiers: list[Notifier] = Field(default_factory=list, max_length=50)
    duties: list[Duty] = Field(default_factory=list, max_length=20)  # every target's
    services: list[Service] = Field(default_factory=list, max_length=1000)

    def duties_for(self, target: str, kind: str) -> list[Duty]:
        """The duties an incident of ``kind`` on ``target`` carries: the global ones, a
        target's own duty replacing a global one of its name."""
        own = next((t.duties for t in self.targets if t.id == target), [])
        names = {d.name for d in own}
        return [d for d in [*(d for d in self.duties if d.name not in names), *own] if kind in d.kinds]

    def config_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for section, key, ids in (
            ("probes", "id", [p.id for p in self.probes]),
            ("targets", "id", [t.id for t in self.targets]),
            ("notifiers", "name", [n.name for n in self.notifiers]),
            ("duties", "name", [d.name for d in self.duties]),
            ("services", "id", [s.id for s in self.services]),
        ):
            problems += _twice(section, key, ids)
        notifiers = {n.name for n in self.notifiers}
        duty_lists: list[tuple[Loc, list[Duty]]] = [(("duties",), self.duties)]
        for i, t in enumerate(self.targets):
            duty_lists.append((("targets", i, "duties"), t.duties))
            problems += _twice(("targets", i, "duties"), "name", [d.name for d in t.duties])
        for where, duties in duty_lists:
            for i, d in enumerate(duties):
                for j, route in enumerate(d.route):
                    if route not in notifiers:
                        problems.append(((*where, i, "route", j), f"no notifier is named {route}"))
        targets = {t.id for t in self.targets}
        for i, service in enumerate(self.services):
            seen: list[str] = []
            for role in ("primary", "backup"):
                for j, target in enumerate(getattr(service, role)):
                    if target not in targets:
                        problems.append((("services", i, role, j), f"no target is named {target}"))
                    elif target in seen:
                        problems.append(
                            (("services", i, role, j), f"{target} is a path of this service twice")
                        )
                    seen.append(target)
        return problems


def _twice(section: str | Loc, key: str, ids: list[str]) -> list[tuple[Loc, str]]:
    where: Loc = (section,) if isinstance(section, str) else section
    return [((*where, i, key), f"{value} appears twice") for i, value in repeats(ids)]
