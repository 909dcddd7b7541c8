"""Connecting to the MQTT broker, the same way for probes and monitors (aiomqtt >= 2.5, < 3).

``connect()`` speaks MQTT 5 where the broker has it and falls back to 3.1.1 when
``protocol: auto`` (e.g. amqtt, the demo's embedded broker, speaks only 3.1.1).
A *persistent* session (fixed client id, no clean start, a session expiry the caller
chooses: the monitor's ``mqtt.session_expiry``) makes the broker keep QoS 1 messages for
us while we are away. On MQTT 3.1.1 a client cannot say how long: the broker keeps such
a session until its own ``persistent_client_expiration`` (mosquitto: for ever unless set).

A restored session is not trusted to hold the subscriptions: mosquitto 2.0.11 restores
a persistent session after its own restart (persistence on) without its *shared*
subscriptions (it never writes them to its persistence file), and says
``session present`` all the same. A subscriber therefore subscribes again on every
connect, whatever ``session present`` says (the monitor does). With
``manual_ack`` the PUBACK for a received message is sent only when the caller
calls ``ack(client, message)`` — after it has durably stored the message — so a
crash between receipt and commit loses nothing: the broker redelivers.

Bounded reading (``max_packet_size``, ``max_buffered``): what a client reads from the
broker is bounded before it is read, not after.

- ``max_packet_size`` is sent as the MQTT 5 CONNECT property Maximum Packet Size: a
  compliant broker (mosquitto ≥ 1.6) drops a bigger message for this client instead of
  sending it ("Dropping too large outgoing PUBLISH" in its log) and goes on with the
  next. Where the broker does not honour it (MQTT 3.1.1, or a broker that ignores
  it), the client itself reads socket data in chunks of at most 64 KiB and keeps only
  the first ``max_packet_size`` bytes of a PUBLISH: the message still arrives (and is
  acknowledged by its receiver, so it is not redelivered for ever) but with its payload
  cut, longer than any payload limit the receiver applies, so it is rejected as
  ``too_large`` after at most ``max_packet_size`` + 64 KiB were held.
- ``max_buffered`` bounds the client's own incoming queue: when that many messages are
  waiting for the application, the client stops reading its socket (TCP flow control
  then holds the rest at the broker) and starts again at half. mosquitto 2.0.11 keeps
  sending beyond the MQTT 5 Receive Maximum while acknowledgements flow (3,400 queued
  in the client for Receive Maximum 200 in a 5,000-message backlog: its send quota is
  miscounted as PUBACKs arrive, eclipse-mosquitto/mosquitto#2301), so Receive Maximum
  alone does not bound memory; nor does aiomqtt's queue bound, which drops messages.

Cheap receiving, for a consumer that handles batches: each readiness callback reads
every packet the socket holds (``_read_burst``, up to ``READ_BURST`` or a full queue;
paho's ``loop_read`` reads one), so a consumer finds a batch waiting, not one message; an
MQTT 5 QoS 1 PUBLISH without properties is decoded without a ``Properties`` object
(``_plain_publish``); and ``ack_ids`` sends a batch's PUBACKs in one write.

Reconnecting (``Reconnector``, the one loop of probes and monitors): each attempt gets
a fresh client; ``protocol: auto`` switches to 3.1.1 at once when the broker refuses
MQTT 5 and alternates when a CONNECT gets no CONNACK at all; a lost connection or a
failed attempt waits ``Backoff`` (exponential from ``initial`` to ``maximum``, each delay
drawn from the upper half, reset by a successful connection; the probe: 0.5 s to 30 s,
the monitor: 1 s to 2 s).

    aiomqtt.MqttError, OSError  ─▶ Reconnector: on_down, backoff, the next attempt
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt import MqttCodeError
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ecpm.configfile import secret_text
from ecpm.errors import ConfigError
from ecpm.settings import MqttSettings, TlsFiles

logger = logging.getLogger(__name__)

SESSION_EXPIRY = 86400  # default seconds a broker keeps a persistent session (MQTT 5)
RECEIVE_MAXIMUM = 200  # QoS 1 messages in flight to a manual-ack client (MQTT 5)
# What a PUBLISH adds to its payload at most, for a sane client: topic (≤ 65,535 bytes),
# packet id, properties, fixed header. A receiver that accepts payloads up to N bytes asks
# for packets of at most N + PACKET_HEADROOM (``packet_limit``).
PACKET_HEADROOM = 64 * 1024 + 4096
READ_CHUNK = 64 * 1024  # the most one socket read asks for (paho would ask for a whole packet)
READ_BURST = 512  # packets one readiness callback reads at most (then the loop runs others)
_PUBLISH = 0x30  # MQTT fixed-header packet type of PUBLISH (high nibble)
_PUBACK = 0x40
_UNSUPPORTED_PROTOCOL: Final = frozenset({1, 132})  # 3.1.1 CONNACK rc / MQTT 5 reason code


def packet_limit(max_payload: int) -> int:
    """The Maximum Packet Size for a receiver that accepts payloads of ``max_payload`` bytes.

    Larger than the payload limit by ``PACKET_HEADROOM``: a message a little too big still
    arrives and is rejected (and counted) by the receiver; one cut by the client-side
    bound still has more than ``max_payload`` bytes of payload, so it is rejected too.
    """
    return max_payload + PACKET_HEADROOM


class _WatchedQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, telling its client whenever a message is taken."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.on_get: Callable[[], None] = lambda: None

    def get_nowait(self) -> aiomqtt.Message:  # asyncio.Queue.get() ends here too
        item = super().get_nowait()
        self.on_get()
        return item


class BoundedClient(aiomqtt.Client):
    """An ``aiomqtt.Client`` (2.x) whose reads are bounded: see the module docstring.

    It replaces aiomqtt's socket-open hook with one that can pause the reader; the
    rest is aiomqtt's own. ``paused_total`` counts the pauses (tests and benchmarks).
    """

    def __init__(
        self,
        *args: Any,
        max_buffered: int | None = None,
        max_packet_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, queue_type=_WatchedQueue, **kwargs)
        self._high = max_buffered
        self._low = 0 if max_buffered is None else max_buffered // 2
        self._reader: tuple[int, Callable[[], None]] | None = None
        self._paused = False
        self.paused_total = 0
        queue = self._queue
        assert isinstance(queue, _WatchedQueue)
        queue.on_get = self._maybe_resume
        if max_packet_size is not None:
            _bound_reads(self._client, max_packet_size)
        _plain_publish(self._client)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # As aiomqtt 2.5's own hook (called from the connecting executor thread), plus
        # the pause when the queue is full.
        def reader() -> None:
            try:
                while True:
                    self._read_burst(client)
                    pending = getattr(client.socket(), "pending", None)  # TLS: decoded bytes left
                    if pending is not None and pending() > 0:
                        continue
                    break
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)
                return
            if self._high is not None and self._queue.qsize() >= self._high and not self._paused:
                self._loop.remove_reader(fileno)
                self._paused = True
                self.paused_total += 1

        def start() -> None:
            self._reader, self._paused = (fileno, reader), False
            self._loop.add_reader(fileno, reader)
            self._misc_task = self._loop.create_task(self._misc_loop())

        fileno = sock.fileno()
        self._loop.call_soon_threadsafe(start)

    def _read_burst(self, client: paho.Client) -> None:
        """Read packets while the socket has them, up to ``READ_BURST`` or until the queue
        is full: paho's ``loop_read`` reads one packet per call, so a consumer woken by the
        first message of a burst would find it alone (a batch of one, a commit per message)."""
        high = self._high
        for _ in range(READ_BURST):
            if client._sock is None:
                return
            rc = client._packet_read()
            if rc == paho.MQTT_ERR_AGAIN:
                return
            if rc > 0:  # as loop_read: a lost connection or a protocol error
                client._loop_rc_handle(rc)
                return
            if high is not None and self._queue.qsize() >= high:
                return

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._reader, self._paused = None, False
        super()._on_socket_close(client, userdata, sock)

    def take_nowait(self, limit: int) -> list[aiomqtt.Message]:
        """Up to ``limit`` messages already received, without waiting (a batch's rest)."""
        queue = self._queue
        n = min(limit, queue.qsize())
        return [queue.get_nowait() for _ in range(n)]

    def _maybe_resume(self) -> None:
        if self._paused and self._reader is not None and self._queue.qsize() <= self._low:
            self._paused = False
            self._loop.add_reader(*self._reader)


def _bound_reads(client: paho.Client, limit: int) -> None:
    """Make paho read in chunks and keep at most ``limit`` (+ one chunk) bytes of a PUBLISH.

    paho 2.x reads a packet with ``_sock_recv(bytes still to come)`` into
    ``_in_packet["packet"]``; this wraps that one method of this one instance. A PUBLISH
    whose remaining length exceeds ``limit`` is cut to its first ``limit`` bytes (topic,
    packet id and properties come first, so they survive; ``limit`` is at least 64 KiB +
    the payload limit).
    """
    original = client._sock_recv

    def recv(bufsize: int) -> bytes:
        state = client._in_packet  # a new dict after every packet: look it up each time
        if state["have_remaining"] and state["command"] & 0xF0 == _PUBLISH:
            packet = state["packet"]
            if len(packet) > limit:
                del packet[limit:]
        return original(min(bufsize, READ_CHUNK))

    client._sock_recv = recv  # type: ignore[method-assign]


def _plain_publish(client: paho.Client) -> None:
    """Decode an MQTT 5 QoS 1 PUBLISH that carries no properties (what mosquitto sends a
    subscriber of plain messages) without building paho's ``Properties`` for it: the
    message comes with ``properties`` None. Anything else goes to paho's own decoder.

    paho 2.x builds and parses a ``Properties`` object per PUBLISH on MQTT 5, about 12 µs
    of the 15 µs its decoding costs (2.7 µs on 3.1.1); this wraps ``_handle_publish`` of
    this one instance, as paho 2.2's does it for QoS 1 (``_handle_on_message``, then the
    PUBACK unless ``manual_ack``), minus its debug log line.
    """
    original = client._handle_publish

    def handle() -> MQTTErrorCode:
        command, packet = client._in_packet["command"], client._in_packet["packet"]
        if client._protocol != paho.MQTTv5 or command & 0x06 != 0x02:  # not MQTT 5 QoS 1
            return original()
        length = int.from_bytes(packet[0:2], "big")
        props = 2 + length + 2  # topic length, topic, packet id: then the properties' length
        if len(packet) <= props or packet[props] != 0 or length == 0:
            return original()
        message = paho.MQTTMessage(
            mid=int.from_bytes(packet[props - 2 : props], "big"), topic=bytes(packet[2 : 2 + length])
        )
        message.dup, message.qos, message.retain = bool(command & 0x08), 1, bool(command & 0x01)
        message.properties = None
        message.payload = bytes(packet[props + 1 :])
        message.timestamp = paho.time_func()
        client._handle_on_message(message)
        if client._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return client._send_puback(message.mid)

    client._handle_publish = handle  # type: ignore[method-assign]


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
    session_expiry: int = SESSION_EXPIRY,
    manual_ack: bool = False,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    max_packet_size: int | None = None,
    max_buffered: int | None = None,
    **extra: Any,
) -> BoundedClient:
    """The one place an MQTT client is made: credentials, TLS, protocol, session flags.

    ``session_expiry``: seconds the broker keeps a ``persistent`` session after a
    disconnect (MQTT 5 Session Expiry Interval; 3.1.1 cannot send it);
    ``tls`` is a context already built with ``tls_context`` (build it once, reuse it);
    ``max_packet_size`` and ``max_buffered`` bound what it reads (module docstring);
    ``extra`` goes to ``aiomqtt.Client`` (e.g. ``max_queued_incoming_messages``, ``logger``).
    """
    v5 = protocol == aiomqtt.ProtocolVersion.V5
    properties = None
    if v5 and (persistent or manual_ack or max_packet_size is not None):
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = session_expiry
        if manual_ack:
            # unacknowledged messages wait at the broker, not in our memory: without this,
            # a backlog (a long persistent-session queue) arrives all at once
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        if max_packet_size is not None:
            # a compliant broker drops bigger messages for us instead of sending them
            properties.MaximumPacketSize = max_packet_size
    client = BoundedClient(
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
        max_buffered=max_buffered,
        max_packet_size=max_packet_size,
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


def ack_ids(client: aiomqtt.Client, mids: Sequence[int]) -> None:
    """The PUBACKs of a batch of QoS 1 messages received with ``manual_ack``, queued as one
    write (one ``send`` for the batch, not one per message). Each is the 4 bytes paho's
    ``ack`` would send (packet type, remaining length 2, packet id: on MQTT 5 the reason
    code 0 is implied by that length)."""
    if mids:
        packet = b"".join(struct.pack("!BBH", _PUBACK, 2, mid) for mid in mids)
        client._client._packet_queue(_PUBACK, packet, 0, 0)


def _after_failure(
    settings: MqttSettings, protocol: aiomqtt.ProtocolVersion, exc: BaseException
) -> tuple[aiomqtt.ProtocolVersion, bool]:
    """The protocol of the next attempt after a failed CONNECT, and whether to retry at once.

    Only with ``protocol: auto``: a broker that refuses MQTT 5 (CONNACK 1 / reason 132)
    gets 3.1.1 at once; a CONNECT with no CONNACK at all (a broker that drops MQTT 5
    silently, or a TLS/network problem) makes the attempts alternate between 5 and 3.1.1.
    """
    if settings.protocol != "auto":
        return protocol, False
    v5 = protocol == aiomqtt.ProtocolVersion.V5
    if v5 and isinstance(exc, MqttConnectError) and _rc_value(exc) in _UNSUPPORTED_PROTOCOL:
        logger.info("MQTT broker %s:%d refuses MQTT 5; using 3.1.1", settings.host, settings.port)
        return aiomqtt.ProtocolVersion.V311, True
    if isinstance(exc, aiomqtt.MqttError) and "timed out" in str(exc):
        return (aiomqtt.ProtocolVersion.V311 if v5 else aiomqtt.ProtocolVersion.V5), False
    return protocol, False


def _rc_value(exc: MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    return int(rc.value) if hasattr(rc, "value") else int(rc)


@asynccontextmanager
async def connect(
    settings: MqttSettings,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    persistent: bool = False,
    session_expiry: int = SESSION_EXPIRY,
    manual_ack: bool = False,
    max_packet_size: int | None = None,
    max_buffered: int | None = None,
) -> AsyncIterator[BoundedClient]:
    """One connection (no retries but the protocol fallback): yield the connected client."""
    protocol = _protocols(settings)[0]
    for last in (False, True):
        client = build_client(
            settings,
            identifier=identifier,
            protocol=protocol,
            will=will,
            persistent=persistent,
            session_expiry=session_expiry,
            manual_ack=manual_ack,
            max_packet_size=max_packet_size,
            max_buffered=max_buffered,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            fallback, _ = _after_failure(settings, protocol, exc)
            if last or fallback == protocol:
                raise
            protocol = fallback
            continue
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)
        return


@dataclass
class Backoff:
    """The one reconnect policy: ``initial`` doubling up to ``maximum``, each delay drawn
    from the upper half of its value (jitter, so a fleet does not reconnect in step);
    ``reset()`` after a successful connection starts again at ``initial``."""

    initial: float = 0.5
    maximum: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    _failures: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2.0 ** min(self._failures, 32))
        self._failures += 1
        return delay * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._failures = 0


Session = Callable[[BoundedClient, str], Awaitable[None]]  # (client, "5" or "3.1.1")


class Reconnector:
    """Connect, run a session, reconnect after ``backoff``, until ``stop`` is set: the one
    connection loop of probes and monitors.

    ``client(protocol)`` makes each attempt's client (``build_client``); the protocol
    follows ``_after_failure``. ``aiomqtt.MqttError`` and ``OSError`` end a session (or
    an attempt) and never escape ``run()``; ``on_down`` is called after each. Any other
    exception is a bug: with ``keep_going`` it is logged and the loop goes on, else it
    is raised. While the broker stays away a warning is logged every ``LOG_EVERY`` s,
    not per attempt. ``connects``, ``failures`` (attempts that got no CONNACK),
    ``protocol`` (while connected) are read from other threads (plain attributes).
    """

    LOG_EVERY = 60.0

    def __init__(
        self,
        settings: MqttSettings,
        client: Callable[[aiomqtt.ProtocolVersion], BoundedClient],
        *,
        backoff: Backoff,
        on_down: Callable[[BaseException | None], None] = lambda exc: None,
        keep_going: bool = False,
    ) -> None:
        self._settings = settings
        self._client = client
        self._backoff = backoff
        self._on_down = on_down
        self._bugs: tuple[type[Exception], ...] = (Exception,) if keep_going else ()
        self._next = _protocols(settings)[0]
        self.protocol: str | None = None  # "5" or "3.1.1" while connected
        self.connects = 0
        self.failures = 0

    async def run(self, session: Session, stop: asyncio.Event) -> None:
        failing_since: float | None = None  # monotonic time the current outage began
        logged_at = 0.0
        while not stop.is_set():
            protocol, connected, retry_now = self._next, False, False
            error: BaseException | None = None
            try:
                async with self._client(protocol) as client:
                    connected, failing_since = True, None
                    self.connects += 1
                    self._backoff.reset()
                    self.protocol = "5" if protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"
                    try:
                        await session(client, self.protocol)
                    finally:
                        self.protocol = None
            except* (aiomqtt.MqttError, OSError) as group:
                error = group.exceptions[0]
                if not connected:
                    self.failures += 1
                    self._next, retry_now = _after_failure(self._settings, protocol, error)
            except* self._bugs as group:
                error = group.exceptions[0]
                logger.error("MQTT session failed unexpectedly", exc_info=error)
            self._on_down(error)
            if stop.is_set():
                break
            if retry_now:
                continue
            now, s = time.monotonic(), self._settings
            if failing_since is None or now - logged_at >= self.LOG_EVERY:
                away = "" if failing_since is None else f" (for {now - failing_since:.0f}s)"
                reconnect = f"reconnecting every {self._backoff.maximum:.0f}s at most"
                logger.warning("MQTT %s:%d: %s%s; %s", s.host, s.port, error, away, reconnect)
                logged_at = now
            failing_since = now if failing_since is None else failing_since
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.next()):
                    await stop.wait()
