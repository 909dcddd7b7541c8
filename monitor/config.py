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


class MonitoredTarget(StrictModel):
    id: Name
    interval: Annotated[float, duration(at_most=DAY)] = 30.0  # the probes' invite interval for this target
    description: str = ""


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
    commit_interval: Annotated[float, duration(at_most=10.0)] = 0.2  # batch commits at most this far apart

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

    def config_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for section, key, ids in (
            ("probes", "id", [p.id for p in self.probes]),
            ("targets", "id", [t.id for t in self.targets]),
            ("notifiers", "name", [n.name for n in self.notifiers]),
        ):
            problems += [((section, i, key), f"{value} appears twice") for i, value in repeats(ids)]
        return problems
