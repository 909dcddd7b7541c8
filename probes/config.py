"""Config models for the probe agent and the test responder.

Every option here is documented, with its default, in ``config/probe.example.yaml``
and ``config/responder.example.yaml``; keep the two in step.
"""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Literal, Protocol, Self

import phonenumbers
from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from ecpm.configfile import (
    DAY,
    HOUR,
    MINUTE,
    Bool,
    Loc,
    SecretFile,
    StrictModel,
    duration,
    pick_secret,
    repeats,
    secret_of,
)
from ecpm.settings import IPAddress, Listen, ListenField, MqttSettings, Name, SigningKey, TlsFiles, Transport
from probes.guard import (
    CarrierTestService,
    GuardRefusal,
    check_dial_target,
)
from probes.media import DTMF_OFF, DTMF_ON

# The pjsua2 wheel is compiled with PJSUA_MAX_CALLS = 4 (see docs/checks.md).
WHEEL_MAX_CALLS = 4
# sip.workers: at most this many SIP worker processes (about 64 MB each, probes.workers);
# "auto" never starts more than AUTO_WORKERS_CAP
MAX_WORKERS = 64
AUTO_WORKERS_CAP = 32


def _region(value: str) -> str:
    if value not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"'{value}' is not an ISO 3166 region code known to phonenumbers, e.g. GB")
    return value


Region = Annotated[str, AfterValidator(_region)]


class SipSettings(StrictModel):
    bind: IPAddress = "127.0.0.1"
    port: int = Field(default=0, ge=0, lt=65536)  # 0: any free port
    transports: list[Transport] = Field(
        default_factory=lambda: list[Transport](["udp", "tcp"]), min_length=1, max_length=3
    )
    tls: TlsFiles | None = None
    max_calls: int = Field(default=WHEEL_MAX_CALLS, ge=1, le=WHEEL_MAX_CALLS)
    max_call_rate: float = Field(default=20.0, gt=0, le=40.0)  # new calls per second, per process
    # the agent's SIP worker processes (probes.workers), max_calls calls each; "auto":
    # enough for schedule.max_concurrent_checks (ProbeConfig.sip_workers)
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = "auto"
    user_agent: str = "ecpm"
    log_level: int = Field(default=1, ge=0, le=6)  # pjsip's own log, routed to logging

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        """One clear message instead of one per member of the union."""
        if value == "auto" or (type(value) is int and 1 <= value <= MAX_WORKERS):
            return value
        raise ValueError(f"must be a number of worker processes from 1 to {MAX_WORKERS}, or auto")

    @model_validator(mode="after")
    def _tls_needs_files(self) -> Self:
        if "tls" in self.transports and self.tls is None:
            raise ValueError("transport tls needs a tls: section (ca_file, cert_file, key_file)")
        return self


class GuardSettings(StrictModel):
    # Extra PBX access and CLI prefixes stripped before judging a number. They ADD to the
    # guard's built-in list (probes.guard.DEFAULT_DIAL_PREFIXES) and can never remove one.
    dial_prefixes: list[str] = Field(default_factory=list, max_length=100)


# SRTP with SDES keying (RFC 4568 a=crypto) for a call's media (docs/checks.md, "SRTP"):
# off (plain RTP/AVP), optional (RTP/AVP offered with keys: encrypted when the far end
# takes them), mandatory (RTP/SAVP only: a plain answer fails the call)
Srtp = Literal["off", "optional", "mandatory"]


class Location(StrictModel):
    """Sent as a PIDF-LO body (RFC 4119/5491) when a target asks for emergency shape."""

    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    radius_m: float = Field(default=50.0, gt=0, le=100_000)
    # RFC 5139 elements: country, A1, RD, HNO, PC
    civic: dict[str, str] = Field(default_factory=dict, max_length=40)


def _e164(value: str) -> str:
    if not re.fullmatch(r"\+[1-9][0-9]{2,14}", value):
        raise ValueError(f"{value!r} is not an E.164 number: + and 3 to 15 digits, e.g. +441632960000")
    return value


class EmergencyShape(StrictModel):
    p_asserted_identity: str | None = None  # e.g. "sip:+441632960000@probe.example;user=phone"
    # the caller's number (E.164) a call handler must receive: sent as P-Asserted-Identity
    # <tel:...> when p_asserted_identity is not set; the answer must report it (stage identity)
    callback_number: Annotated[str, AfterValidator(_e164)] | None = None
    resource_priority: str | None = None  # e.g. "esnet.1"
    location: Location | None = None  # adds Geolocation: <cid:...> and a PIDF-LO body
    expect_location_echo: Bool = True  # NENA i3 test answer must echo the location sent


class CheckSettings(Protocol):
    """What the scheduler needs of any check kind's settings (``checks.<kind>``)."""

    @property
    def interval(self) -> float: ...  # seconds between scheduled checks

    @property
    def time_limit(self) -> float: ...  # the check's own hard limit (the scheduler adds a margin)


DTMF_DIGIT_SECONDS = 0.25  # one RFC 4733 digit as pjsua sends it: 160 ms and the gap after it
INBAND_DIGIT_SECONDS = DTMF_ON + DTMF_OFF  # one in-band digit as the probe plays it
DtmfMethod = Literal["rfc4733", "inband", "auto"]


def _dtmf_digits(value: str) -> str:
    if not re.fullmatch(r"[0-9*#A-D]{1,16}", value):
        raise ValueError(f"{value!r}: DTMF digits are 1 to 16 of 0-9, *, #, A-D")
    return value


class InviteCheck(StrictModel):
    interval: Annotated[float, duration(at_most=DAY)] = 30.0
    # no response at all: fail at transport (a next hop answers 100 Trying in milliseconds;
    # 3 s still covers two retransmissions of a lost INVITE, at 0.5 s and 1.5 s)
    first_response_timeout: Annotated[float, duration(at_most=MINUTE)] = 3.0
    # ringing without answer: CANCEL, fail at answer (fitted to automatic test endpoints,
    # which answer at once; a target that rings first needs its own)
    answer_timeout: Annotated[float, duration(at_most=5 * MINUTE)] = 4.0
    # how long to listen for tones after answer
    media_time: Annotated[float, duration(at_most=5 * MINUTE)] = 2.0
    max_duration: Annotated[float, duration(at_most=15 * MINUTE)] = 30.0  # hard limit for the whole call
    tone_hz: float = Field(default=1000.0, gt=100, lt=3900)  # what we send
    expect_tone_hz: float = Field(default=1400.0, gt=100, lt=3900)  # what the responder plays
    expect_tone: Bool = True  # the responder's tone must be heard; false for a plain echo endpoint
    expect_echo: Bool = True  # our tone must come back (two-way audio)
    # DTMF digits sent after the media check; the far end must return them (the responder
    # echoes them; stage dtmf). None: no DTMF check
    dtmf: Annotated[str, AfterValidator(_dtmf_digits)] | None = None
    # how: rfc4733 telephone-events, inband tones in the audio (back in the echo), or auto:
    # rfc4733 when the far end's SDP answer offers telephone-event, else inband
    dtmf_method: DtmfMethod = "auto"
    # all digits sent -> every digit back, or fail at dtmf
    dtmf_timeout: Annotated[float, duration(at_most=MINUTE)] = 3.0

    @model_validator(mode="after")
    def _tones_differ(self) -> Self:
        if abs(self.tone_hz - self.expect_tone_hz) < 200:
            raise ValueError("tone_hz and expect_tone_hz must differ by at least 200 Hz")
        if not (self.expect_tone or self.expect_echo):
            raise ValueError("expect_tone and expect_echo are both false: media would prove nothing")
        if self.max_duration < self.answer_timeout + self.media_time + self.dtmf_time:
            raise ValueError(
                "max_duration must cover answer_timeout + media_time"
                + (" + the DTMF digits and dtmf_timeout" if self.dtmf else "")
            )
        return self

    @property
    def time_limit(self) -> float:
        return self.max_duration

    @property
    def dtmf_time(self) -> float:
        """The longest the DTMF stage takes: every digit sent (RFC 4733, 160 ms and a gap
        each, the longer of the two methods), then ``dtmf_timeout``; 0 without DTMF."""
        per_digit = max(DTMF_DIGIT_SECONDS, INBAND_DIGIT_SECONDS)
        return 0.0 if not self.dtmf else len(self.dtmf) * per_digit + self.dtmf_timeout


class OptionsCheck(StrictModel):
    interval: Annotated[float, duration(at_most=DAY)] = 10.0
    timeout: Annotated[float, duration(at_most=MINUTE)] = 5.0
    # extra status codes that pass (2xx always do)
    accept: list[Annotated[int, Field(ge=100, le=699)]] = Field(default_factory=list, max_length=100)

    @property
    def time_limit(self) -> float:
        return self.timeout


class RegisterCheck(StrictModel):
    interval: Annotated[float, duration(at_most=DAY)] = 60.0
    # each REGISTER transaction (the challenged one, then the one with credentials): no
    # final response within it fails at transport
    timeout: Annotated[float, duration(at_most=MINUTE)] = 5.0

    @property
    def time_limit(self) -> float:
        return 2 * self.timeout  # REGISTER -> 401/407, then REGISTER with credentials -> 200


# "register" is also ABCMeta.register, a method of the model's metaclass (never seen on an
# instance, where the field lives): pydantic warns that the field shadows it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", 'Field name "register"', UserWarning)

    class Checks(StrictModel):
        """A target's ``checks:``: one optional field per check kind, named as the kind and
        typed as its registry entry's ``settings`` (probes.check_kinds; a test keeps them in
        step). Nothing else here names a kind."""

        invite: InviteCheck | None = None
        options: OptionsCheck | None = None
        register: RegisterCheck | None = None

        @model_validator(mode="after")
        def _at_least_one(self) -> Self:
            if not self.enabled():
                raise ValueError(f"enable at least one check: {' or '.join(type(self).model_fields)}")
            return self

        def enabled(self) -> dict[str, CheckSettings]:
            """The kinds this target runs, in field order, with their settings."""
            found = {kind: getattr(self, kind) for kind in type(self).model_fields}
            return {kind: settings for kind, settings in found.items() if settings is not None}


class Auth(StrictModel):
    username: str
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    realm: str = "*"

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        pick_secret(self.password, self.password_file, name="password", required=True)
        return self

    @property
    def secret(self) -> SecretStr:
        found = secret_of(self, "password")
        assert found is not None  # required by the validator
        return found


class SipAccount(Auth):
    """A SIP account the probe registers as a phone does: ``register`` checks it, and every
    call of a target with an account is placed from it (through ``outbound_proxy``, or the
    registrar, answering 401/407 challenges with these credentials)."""

    registrar: str  # REGISTER's Request-URI, e.g. "sip:registrar.example:5060"; its host is the AOR's domain
    auth_username: str | None = None  # the digest user name when it is not ``username``
    expiry: Annotated[float, duration(at_least=10, at_most=DAY)] = 300.0  # the Expires asked for
    transport: Transport = "udp"

    @property
    def auth_user(self) -> str:
        return self.auth_username or self.username


class CarrierService(StrictModel):
    number: str
    region: Region
    why: str = Field(min_length=3)  # recorded in logs and evidence: which carrier service this is


class Target(StrictModel):
    id: Name
    uri: str
    # deny by default: you must declare the target a test endpoint (validated even when absent)
    test_endpoint: Bool = Field(default=False, validate_default=True)
    carrier_test_service: CarrierService | None = None
    transport: Transport = "udp"
    outbound_proxy: str | None = None  # e.g. "sip:127.0.0.1:5090;lr" (needed for urn: targets)
    auth: Auth | None = None
    account: SipAccount | None = None  # the account its calls are placed from (probe.account if unset)
    # never start two calls to this target closer than this
    min_spacing: Annotated[float, duration(at_most=HOUR)] = 2.0
    emergency: EmergencyShape | None = None
    srtp: Srtp = "off"  # SDES-SRTP for the call's media: off, optional, mandatory
    checks: Checks = Field(default_factory=lambda: Checks(invite=InviteCheck()))

    @field_validator("test_endpoint")
    @classmethod
    def _declared(cls, value: bool) -> bool:
        if not value:
            raise ValueError("must be true: ecpm dials only targets declared as emergency test endpoints")
        return value

    @field_validator("carrier_test_service")
    @classmethod
    def _carrier(cls, value: CarrierService | None) -> CarrierService | None:
        if value is not None:
            CarrierTestService(value.number, value.region)  # raises ValueError with the reason
        return value

    def carrier(self) -> CarrierTestService | None:
        c = self.carrier_test_service
        return None if c is None else CarrierTestService(c.number, c.region)


class ProbeIdentity(SigningKey):
    id: Name  # its key (SigningKey) signs its results
    region: Region  # home region: numbers not in +CC form are judged against it


class OutboxSettings(StrictModel):
    path: str = "ecpm-probe-outbox.db"  # SQLite file (WAL); relative to the working directory
    # unpublished results beyond it: loud log + counter, no silent drop
    max_results: int = Field(default=100_000, ge=100, le=10_000_000)
    # published results kept until the monitor confirms it stored them (its ack), for
    # replay of what the broker lost; the oldest beyond either bound are evicted, counted
    keep_unconfirmed: int = Field(default=100_000, ge=100, le=10_000_000)
    keep_for: Annotated[float, duration(at_least=MINUTE, at_most=30 * DAY)] = 7 * DAY


class ScheduleSettings(StrictModel):
    max_concurrent_checks: int = Field(default=WHEEL_MAX_CALLS, ge=1, le=MAX_WORKERS * WHEEL_MAX_CALLS)
    jitter: float = Field(default=0.1, ge=0, le=0.5)  # fraction of the interval
    first_check_at_start: Bool = True
    confirm_failures: Bool = True  # one immediate confirmation check after a failure
    backoff_after_busy: Annotated[float, duration(at_most=DAY)] = 300.0  # after a NENA 486 test-call limit
    # hard timeout = check's own limit + this
    check_timeout_margin: Annotated[float, duration(at_most=5 * MINUTE)] = 5.0


class HealthSettings(StrictModel):
    listen: ListenField | None = None  # e.g. "127.0.0.1:9469"; off by default


class ProbeConfig(StrictModel):
    kind: Literal["probe"]
    probe: ProbeIdentity
    account: SipAccount | None = None  # the account of every target that names none
    sip: SipSettings = Field(default_factory=SipSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    targets: list[Target] = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _probe_account(self) -> Self:
        if self.account is not None:  # resolved here, so a check sees its target's account
            update = {"account": self.account}
            targets = [t if t.account else t.model_copy(update=update) for t in self.targets]
            object.__setattr__(self, "targets", targets)  # frozen: set once, while validating
        return self

    def sip_workers(self) -> int:
        """How many SIP worker processes the agent runs: ``sip.workers``, or for "auto" enough
        call slots for the checks that may run at once (``schedule.max_concurrent_checks``,
        and at most one per enabled kind of each target), ``max_calls`` per worker, at most
        ``AUTO_WORKERS_CAP``."""
        if isinstance(self.sip.workers, int):
            return self.sip.workers
        kinds = sum(len(t.checks.enabled()) for t in self.targets)
        at_once = min(self.schedule.max_concurrent_checks, kinds)
        return max(1, min(AUTO_WORKERS_CAP, -(-at_once // self.sip.max_calls)))

    def config_problems(self) -> list[tuple[Loc, str]]:
        """Cross-field checks, located exactly: duplicate ids and the live-number guard."""
        problems: list[tuple[Loc, str]] = []
        ids = (target.id for target in self.targets)
        problems += [(("targets", i, "id"), f"target id {value} appears twice") for i, value in repeats(ids)]
        for i, target in enumerate(self.targets):
            if target.uri.lower().startswith("urn:") and target.outbound_proxy is None:
                problems.append((("targets", i, "outbound_proxy"), "a urn: target needs an outbound_proxy"))
            if target.checks.register is not None and target.account is None:
                problems.append((("targets", i, "account"), "a register check needs an account"))
            account = target.account
            registrar = None if account is None else account.registrar
            for key, uri in (
                ("uri", target.uri), ("outbound_proxy", target.outbound_proxy), ("account", registrar)
            ):  # fmt: skip
                if uri is None:
                    continue
                try:
                    check_dial_target(
                        uri,
                        declared_test_endpoint=target.test_endpoint,
                        home_region=self.probe.region,
                        dial_prefixes=self.guard.dial_prefixes,
                        carrier_test_service=target.carrier(),
                    )
                except GuardRefusal as refusal:
                    # the probe-wide account is named where it is written, once
                    shared = key == "account" and account is self.account
                    leaf: Loc = ("account", "registrar") if key == "account" else (key,)
                    loc: Loc = leaf if shared else ("targets", i, *leaf)
                    problem = (loc, f"refused by the live-number guard ({refusal.reason}): {refusal.detail}")
                    if problem not in problems:
                        problems.append(problem)
        return problems


# ---------------------------------------------------------------- responder

Fault = Literal[
    "none", "answer_503", "never_answer", "no_media", "one_way_media", "delayed_answer",
    "strip_identity", "strip_location", "plain_rtp", "dtmf_lost",
]  # fmt: skip


class ResponderSip(StrictModel):
    bind: IPAddress = "127.0.0.1"
    port: int = Field(default=5090, gt=0, lt=65536)
    transports: list[Transport] = Field(
        default_factory=lambda: list[Transport](["udp", "tcp"]), min_length=1, max_length=3
    )
    tls: TlsFiles | None = None
    log_level: int = Field(default=1, ge=0, le=6)


class ResponderControl(StrictModel):
    listen: ListenField | None = Listen("127.0.0.1", 8091)  # HTTP control to switch faults; None = off
    token: SecretStr | None = None  # required in the X-ECPM-Token header when set
    token_file: SecretFile | None = None

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        pick_secret(self.token, self.token_file, name="token", required=False)
        return self


class ResponderConfig(StrictModel):
    kind: Literal["responder"]
    sip: ResponderSip = Field(default_factory=ResponderSip)
    mode: Literal["echo+tone", "echo", "tone"] = "echo+tone"
    tone_hz: float = Field(default=1400.0, gt=100, lt=3900)
    answering_point: str = "ecpm test responder"  # name in the NENA-style 200 body
    ring_time: Annotated[float, duration(at_most=5 * MINUTE)] = 0.05  # 180 Ringing this long before 200 OK
    # ring time of the delayed_answer fault
    answer_delay: Annotated[float, duration(at_most=10 * MINUTE)] = 20.0
    max_calls: int = Field(default=WHEEL_MAX_CALLS, ge=1, le=WHEEL_MAX_CALLS)  # 486 above it
    max_call_duration: Annotated[float, duration(at_most=HOUR)] = 60.0  # BYE after this
    fault: Fault = "none"  # initial fault mode; switch at run time via control
    control: ResponderControl = Field(default_factory=ResponderControl)
