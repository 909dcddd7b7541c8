"""Connecting to the MQTT broker, the same way for probes and monitors (aiomqtt >= 2.5, < 3).

``connect()`` speaks MQTT 5 where the broker has it and falls back to 3.1.1 when
``protocol: auto`` (e.g. amqtt, the demo's embedded broker, speaks only 3.1.1).
A *persistent* session (fixed client id, no clean start, long session expiry)
makes the broker keep QoS 1 messages for us while we are away. With
``manual_ack`` the PUBACK for a received message is sent only when the caller
calls ``ack(client, message)`` — after it has durably stored the message — so a
crash between receipt and commit loses nothing: the broker redelivers.

    aiomqtt.MqttError  ─▶ the caller's reconnect loop (with backoff)
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ecpm.configfile import secret_text
from ecpm.errors import ConfigError
from ecpm.settings import MqttSettings, TlsFiles

logger = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 86400  # seconds a broker keeps a persistent session's messages (MQTT 5)
RECEIVE_MAXIMUM = 200  # QoS 1 messages in flight to a manual-ack client (MQTT 5)


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """A client TLS context from ``mqtt.tls``; ``ConfigError`` naming the key on bad files."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"mqtt.tls: cannot load certificates: {exc}"]) from None
    if not tls.verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _protocols(settings: MqttSettings) -> list[aiomqtt.ProtocolVersion]:
    if settings.protocol == "5":
        return [aiomqtt.ProtocolVersion.V5]
    if settings.protocol == "3.1.1":
        return [aiomqtt.ProtocolVersion.V311]
    return [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311]


def build_client(
    settings: MqttSettings,
    *,
    identifier: str,
    protocol: aiomqtt.ProtocolVersion,
    will: aiomqtt.Will | None = None,
    persistent: bool = False,
    manual_ack: bool = False,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    **extra: Any,
) -> aiomqtt.Client:
    """The one place an MQTT client is made: credentials, TLS, protocol, session flags.

    ``tls`` is a context already built with ``tls_context`` (build it once, reuse it);
    ``extra`` goes to ``aiomqtt.Client`` (e.g. ``max_queued_incoming_messages``, ``logger``).
    """
    v5 = protocol == aiomqtt.ProtocolVersion.V5
    properties = None
    if v5 and (persistent or manual_ack):
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = SESSION_EXPIRY
        if manual_ack:
            # unacknowledged messages wait at the broker, not in our memory: without this,
            # a backlog (a long persistent-session queue) arrives all at once
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        identifier=identifier,
        username=settings.username,
        password=secret_text(settings, "password"),
        protocol=protocol,
        will=will,
        keepalive=max(1, math.ceil(settings.keepalive)),
        tls_context=tls if tls is not None or settings.tls is None else tls_context(settings.tls),
        clean_session=None if v5 else not persistent,
        # paho refuses clean_start on 3.1.1 unless it is the default
        clean_start=(not persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        timeout=timeout,
        **extra,
    )
    if manual_ack:
        # aiomqtt 2.x has no public switch; paho's is set before connecting so that
        # messages queued for a persistent session are not acknowledged on arrival.
        client._client.manual_ack_set(True)
    return client


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Send the PUBACK for a QoS 1 message received with ``manual_ack``."""
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


@asynccontextmanager
async def connect(
    settings: MqttSettings,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    persistent: bool = False,
    manual_ack: bool = False,
) -> AsyncIterator[aiomqtt.Client]:
    """Connect with the newest protocol the broker accepts; yield the connected client."""
    protocols = _protocols(settings)
    for i, protocol in enumerate(protocols):
        client = build_client(
            settings,
            identifier=identifier,
            protocol=protocol,
            will=will,
            persistent=persistent,
            manual_ack=manual_ack,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            if i + 1 < len(protocols):
                logger.info("MQTT 5 refused by %s:%d (%s); trying 3.1.1", settings.host, settings.port, exc)
                continue
            raise
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)
        return
