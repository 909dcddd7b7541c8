"""Config models that probes, responder and monitor share: names, addresses, TLS, MQTT."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, SecretStr, model_validator

from ecpm.configfile import Bool, SecretFile, StrictModel, duration, pick_secret, secret_of

# A name that also appears in MQTT topics and metric labels: no '/', '+', '#', spaces.
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
Transport = Literal["udp", "tcp", "tls"]


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"'{value}' is not an IP address") from None
    return value


IPAddress = Annotated[str, AfterValidator(_ip)]


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{value}' is not HOST:PORT, e.g. 127.0.0.1:9469")
    _ip(host.strip("[]"))
    return value


Listen = Annotated[str, AfterValidator(_listen)]


class TlsFiles(StrictModel):
    ca_file: str | None = None  # CA bundle to verify the peer; None = system store
    cert_file: str | None = None  # our certificate (client auth / TLS listener)
    key_file: str | None = None
    verify_peer: Bool = True


class SigningKey(StrictModel):
    """A probe's HMAC-SHA256 key, inline or from a file: the probe signs with it, the
    monitor verifies with it (exactly one of ``key`` and ``key_file``)."""

    key: SecretStr | None = None
    key_file: SecretFile | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        pick_secret(self.key, self.key_file, name="key", required=True)
        return self

    @property
    def secret(self) -> SecretStr:
        found = secret_of(self, "key")
        assert found is not None  # required by the validator
        return found


class MqttSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, lt=65536)
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    tls: TlsFiles | None = None
    topic_prefix: str = Field(default="ecpm/v1", pattern=r"^[^#+]+[^/#+]$")
    client_id: str | None = None  # default: ecpm-<role>-<id>
    keepalive: Annotated[float, duration(at_most=65535.0)] = 30.0  # MQTT's own limit: 18h12m15s
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto: MQTT 5, falling back to 3.1.1

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        pick_secret(self.password, self.password_file, name="password", required=False)
        return self
