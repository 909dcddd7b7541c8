"""MQTT publisher: drains the outbox to the broker, keeps the probe's status, takes commands.

Topics (``prefix`` = ``MqttSettings.topic_prefix``, default ``ecpm/v1``)::

    {prefix}/results/{probe}/{target}   results, QoS 1, not retained
    {prefix}/status/{probe}             retained QoS 1, signed (probes.status, ecpm.status/1):
                                        online on connect and when targets change, offline
                                        as Last Will and on a clean stop
    {prefix}/commands/{probe}           on-demand check requests and replay requests
                                        (ecpm.replay/1, signed by the monitor; subscribed, QoS 1)
    {prefix}/commands/all               check requests for every probe
    {prefix}/acks/{probe}               the monitor's signed ack (ecpm.ack/1, retained):
                                        results up to its seq are stored (subscribed, QoS 1)

Delivery (``probes.delivery``)
    Results leave the outbox in ``seq`` order, at most ``max_in_flight`` (≤ 10, where
    aiomqtt starts warning) unacknowledged at once; a QoS 1 publish returns after the
    broker's PUBACK and the result is then marked published (batched), but kept: only
    the monitor's ack deletes it. A replay request marks what is kept of its range
    unpublished again, so it is sent again unchanged, and the next status names what
    is gone. Delivery is at-least-once from outbox to store: a subscriber can see an id
    twice (the monitor deduplicates by id) but a result the broker drops is sent again.
    The status carries the outbox's health (``OutboxHealth``) and is published again
    when that changes (a result lost, evicted, a storing error, a replay answered) and
    every ``STATUS_EVERY`` seconds.

Connection
    One session at a time, each with a fresh client (clean session: nothing is
    queued for us at the broker while we are away, so a stale command never fires
    late). The loop is ``ecpm.mqtt.Reconnector``: ``protocol: auto`` tries MQTT 5 and
    switches to 3.1.1 (without waiting) when the broker refuses the protocol version;
    when a CONNECT gets no CONNACK at all (a broker that drops MQTT 5 silently, or a
    TLS problem) the attempts alternate between 5 and 3.1.1; whichever connects is
    kept. A lost connection is retried with ``ecpm.mqtt.Backoff`` (0.5 s doubling to
    30 s, each delay drawn from the upper half), reset by a successful connection.
    While disconnected nothing is lost: checks go on and the outbox absorbs their results.

Status
    Signed with the probe's key like a result (``probes.status``). The Last Will is
    signed when each session's CONNECT is made (it cannot change afterwards): its
    ``connected_at`` and ``at`` are that moment, and every ``online`` of the session
    has the same ``connected_at`` and a later ``at``; the monitor orders statuses by
    (``connected_at``, offline after online, ``at``) and refuses anything not newer
    than what it has, so an old status replayed cannot undo a newer one. The times
    this publisher stamps only ever increase, even if the clock steps back.

Commands
    ``{"target": "<target id>", "check": "invite"|"options", "request_id": "<id>"|null}``
    (``check``: one of ``CHECK_KINDS``).
    A malformed command is refused with a bounded reason (``too_large``, ``encoding``,
    ``json``, ``fields``, ``check``, ``retained``, ``duplicate``), logged and counted;
    a well-formed one goes to the injected ``on_command`` callback, which returns
    ``None`` (accepted) or its own bounded refusal reason (e.g. ``unknown_target``,
    ``guard``); an exception there is logged and counted as ``error``. Nothing a
    command contains can stop the publisher. Retained commands are refused: they
    would fire again on every reconnect.

Errors
    ``aiomqtt.MqttError`` (and ``OSError``) never escape ``run()``: they end a
    session and the backoff loop starts another; so does a bug, logged loudly.
    ``PublisherError`` is raised only at construction for bad TLS files.

Size
    Commands are at most ``MAX_COMMAND_BYTES``; the client asks the broker (MQTT 5
    Maximum Packet Size) for nothing bigger and bounds its own reads
    (``ecpm.mqtt.build_client``), so a flood of huge commands costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiomqtt
from aiomqtt import MqttError, ProtocolVersion, Will

from ecpm import __version__
from ecpm.errors import ConfigError, EcpmError
from ecpm.mqtt import Backoff, BoundedClient, Reconnector, build_client, packet_limit, tls_context
from ecpm.settings import MqttSettings
from probes.delivery import (
    ACK_SCHEMA,
    MAX_GONE_RANGES,
    REPLAY_SCHEMA,
    Ack,
    DeliveryError,
    OutboxHealth,
    Replay,
    parse_message,
)
from probes.outbox import Outbox, OutboxError, Pending
from probes.result import CHECK_KINDS, NAME_RE, REQUEST_ID_RE
from probes.status import Status

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT: Final = 10
MAX_COMMAND_BYTES: Final = 4096
COMMAND_KINDS: Final = frozenset(CHECK_KINDS)  # the registry's kinds (tests/test_check_kinds.py)
_NAME = re.compile(NAME_RE)
_REQUEST_ID = re.compile(REQUEST_ID_RE)
_RECENT_REQUESTS: Final = 1024
_PREFETCH: Final = 200  # outbox rows read ahead of the publish window
STATUS_EVERY: Final = 30.0  # seconds between statuses when nothing changed (outbox health)


class PublisherError(EcpmError):
    """The MQTT settings cannot be used (e.g. unreadable TLS files)."""


class CommandRefused(Exception):  # a refusal is a value, not an ecpm error
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Command:
    """An on-demand check request, validated for shape (not for target existence)."""

    target: str
    check: str
    request_id: str | None
    broadcast: bool  # arrived on commands/all rather than commands/{probe}


CommandHandler = Callable[[Command], str | None]  # None: accepted; else a bounded refusal reason


@dataclass(slots=True)
class _Window:
    """One session's drain: the publishes awaiting PUBACK, the rows read ahead, the cursor."""

    size: int  # at most this many publishes unacknowledged at once
    in_flight: dict[asyncio.Task[None], Pending] = field(default_factory=dict)
    buffer: deque[Pending] = field(default_factory=deque)
    fetched: int = 0  # highest seq fetched in this session

    @property
    def full(self) -> bool:
        return len(self.in_flight) >= self.size

    def rewind(self) -> None:
        """Read the outbox again from its start (a replay reopened rows below the cursor)."""
        self.buffer.clear()
        self.fetched = 0

    def acknowledged(self) -> list[str]:
        """The ids of the finished publishes that got their PUBACK; every finished one
        leaves the window (a failed one stays unpublished in the outbox)."""
        acked: list[str] = []
        for task in [t for t in self.in_flight if t.done()]:
            row = self.in_flight.pop(task)
            if task.exception() is None:
                acked.append(row.id)
        return acked


@dataclass(frozen=True, slots=True)
class PublisherStats:
    connected: bool
    protocol: str | None  # "5" or "3.1.1" while connected
    connects_total: int
    connection_failures_total: int
    published_total: int
    publish_errors_total: int
    commands_accepted_total: int
    commands_refused_total: Mapping[str, int]  # reason -> count ("ack"/"replay": a bad one)
    last_error: str | None
    acks_total: int = 0  # the monitor's verified acks
    replays_total: int = 0  # replay requests answered


def parse_command(payload: bytes, *, broadcast: bool) -> Command:
    """Check a command's shape; raise ``CommandRefused`` with a bounded reason."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRefused("too_large", f"{len(payload)} bytes")
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommandRefused("encoding", "not UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError, or a number too long to convert
        raise CommandRefused("json", "not JSON") from None
    if not isinstance(data, dict):
        raise CommandRefused("json", "not a JSON object")
    if set(data) - {"target", "check", "request_id"} or not {"target", "check"} <= set(data):
        raise CommandRefused("fields", f"keys {sorted(str(k)[:20] for k in data)[:5]}")
    target, check, request_id = data["target"], data["check"], data.get("request_id")
    if not isinstance(target, str) or not _NAME.match(target):
        raise CommandRefused("fields", "target is not a target id")
    if check not in COMMAND_KINDS:
        raise CommandRefused("check", f"check is not one of {sorted(COMMAND_KINDS)}")
    if request_id is not None and (not isinstance(request_id, str) or not _REQUEST_ID.match(request_id)):
        raise CommandRefused("fields", "request_id is not a valid id")
    return Command(target=target, check=check, request_id=request_id, broadcast=broadcast)


class Publisher:
    """One probe's MQTT side. ``await run()`` until ``await stop()``."""

    def __init__(
        self,
        *,
        settings: MqttSettings,
        probe_id: str,
        outbox: Outbox,
        on_command: CommandHandler,
        key: bytes | str,
        targets: Sequence[str] = (),
        version: str = __version__,
        max_in_flight: int = MAX_IN_FLIGHT,
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight must be within 1..{MAX_IN_FLIGHT}")
        self._settings = settings
        self._probe = probe_id
        self._key = key
        self._outbox = outbox
        self._on_command = on_command
        self._targets = list(targets)
        self._version = version
        self._max_in_flight = max_in_flight
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        try:
            self._tls = None if settings.tls is None else tls_context(settings.tls)
        except ConfigError as exc:
            raise PublisherError(str(exc)) from None
        self._last_stamp = datetime.min.replace(tzinfo=UTC)
        self._started_at = self._stamp()
        self._connected_at = self._started_at  # of the current (or last) session
        prefix = settings.topic_prefix
        self.status_topic = f"{prefix}/status/{probe_id}"
        self.command_topic = f"{prefix}/commands/{probe_id}"
        self.broadcast_topic = f"{prefix}/commands/all"
        self.ack_topic = f"{prefix}/acks/{probe_id}"
        self._result_prefix = f"{prefix}/results"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._drain_grace = 0.0
        self._status_stale = False
        self._recent: deque[str] = deque(maxlen=_RECENT_REQUESTS)
        self._lock = threading.Lock()
        self._published = 0
        self._publish_errors = 0
        self._accepted = 0
        self._refused: dict[str, int] = {}
        self._last_error: str | None = None
        self._gone: tuple[tuple[int, int], ...] = ()  # the answer to the last replay request
        self._rewind = False  # a replay reopened results: read the outbox from the start
        self._reported: tuple[object, ...] | None = None  # outbox health in the last status
        self._next_status = 0.0  # loop time of the next periodic status
        self._replays = 0
        self._acks = 0
        backoff = Backoff(backoff_initial, backoff_max, rng if rng is not None else random.Random())
        self._connection = Reconnector(
            settings, self._client, backoff=backoff, on_down=self._down, keep_going=True
        )

    # ------------------------------------------------------------ public API

    def result_topic(self, probe: str, target: str) -> str:
        return f"{self._result_prefix}/{probe}/{target}"

    def set_targets(self, targets: Sequence[str]) -> None:
        """New target list (after a reload): republish the retained status."""
        self._targets = list(targets)
        self._status_stale = True
        if self._wake is not None:
            self._wake.set()

    def stats(self) -> PublisherStats:
        connection = self._connection
        with self._lock:
            return PublisherStats(
                connected=connection.protocol is not None,
                protocol=connection.protocol,
                connects_total=connection.connects,
                connection_failures_total=connection.failures,
                published_total=self._published,
                publish_errors_total=self._publish_errors,
                commands_accepted_total=self._accepted,
                commands_refused_total=dict(self._refused),
                last_error=self._last_error,
                acks_total=self._acks,
                replays_total=self._replays,
            )

    async def run(self) -> None:
        """Connect, publish, reconnect, until ``stop()``. Never raises ``MqttError``."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        stop = self._stop_event()
        self._outbox.add_listener(self._on_added)
        try:
            await self._connection.run(self._session, stop)
        finally:
            self._outbox.remove_listener(self._on_added)

    async def stop(self, *, drain: float = 5.0) -> None:
        """Ask ``run()`` to finish: publish what it can within ``drain`` seconds, mark
        the probe offline (retained), disconnect. Unpublished results stay in the outbox.
        Returns immediately; await the ``run()`` task to know it has finished."""
        self._drain_grace = drain
        self._stop_event().set()

    # ------------------------------------------------------------ internals

    def _stop_event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    def _on_added(self) -> None:  # outbox thread
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(wake.set)

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._last_error = text[:200]

    def _stamp(self) -> datetime:
        """Now, to the millisecond, and always after the previous stamp (status order)."""
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        self._last_stamp = max(now, self._last_stamp + timedelta(milliseconds=1))
        return self._last_stamp

    def _status(self, online: bool, reason: str | None = None, *, will: bool = False) -> bytes:
        """A signed status of the current session; the Last Will is stamped at its connect."""
        at = self._connected_at if will else self._stamp()
        return Status.make(
            probe=self._probe,
            online=online,
            reason=None if online else reason,
            version=self._version,
            started_at=self._started_at,
            connected_at=self._connected_at,
            at=at,
            targets=self._targets,
            key=self._key,
            outbox=self._health(),
        ).to_json()

    def _health(self) -> OutboxHealth:
        st = self._outbox.stats()
        age = self._outbox.oldest_age()
        return OutboxHealth(
            unpublished=st.depth,
            unconfirmed=st.unconfirmed,
            last_seq=st.last_seq,
            confirmed_seq=st.confirmed_seq,
            lost=st.lost_total,
            evicted=st.evicted_total,
            overflow=st.overflow_total,
            oldest_age=None if age is None else round(age, 3),
            error=st.error,
            gone=self._gone[:MAX_GONE_RANGES],
        )

    def _health_key(self) -> tuple[object, ...]:
        """What makes a new status worth sending at once (not every depth change)."""
        st = self._outbox.stats()
        return (st.lost_total, st.evicted_total, st.error, st.overflow_total > 0, self._gone)

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        self._status_stale = False
        self._reported = self._health_key()
        loop = asyncio.get_running_loop()
        self._next_status = loop.time() + STATUS_EVERY
        await client.publish(
            self.status_topic, self._status(True), qos=1, retain=True, timeout=self._publish_timeout
        )

    def _client(self, protocol: ProtocolVersion) -> BoundedClient:
        self._connected_at = self._stamp()  # a new session: its Last Will is signed now
        last_will = self._status(False, "connection_lost", will=True)
        client = build_client(
            self._settings,
            identifier=self._settings.client_id or f"ecpm-probe-{self._probe}",
            protocol=protocol,
            will=Will(self.status_topic, last_will, qos=1, retain=True),
            tls=self._tls,
            timeout=self._connect_timeout,  # CONNACK, SUBACK; publishes pass their own
            max_queued_incoming_messages=100,
            max_packet_size=packet_limit(MAX_COMMAND_BYTES),
            logger=logging.getLogger("probes.mqtt.paho"),
        )
        client.pending_calls_threshold = self._max_in_flight + 2
        return client

    async def _session(self, client: BoundedClient, protocol: str) -> None:
        """One connection, from CONNACK to its end."""
        logger.info(
            "MQTT connected to %s:%d (MQTT %s); %d result(s) waiting in the outbox",
            self._settings.host,
            self._settings.port,
            protocol,
            self._outbox.depth(),
        )
        await self._publish_status(client)
        await client.subscribe([(self.command_topic, 1), (self.broadcast_topic, 1), (self.ack_topic, 1)])
        async with asyncio.TaskGroup() as tasks:
            commands = tasks.create_task(self._read_commands(client))
            tasks.create_task(self._drain(client, tasks, commands))
        if self._stop_event().is_set():
            await client.publish(self.status_topic, self._status(False, "shutdown"), qos=1, retain=True)

    def _down(self, exc: BaseException | None) -> None:
        if exc is not None:
            self._note_error(str(exc) or type(exc).__name__)

    async def _read_commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            raw = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            if topic == self.ack_topic:
                self._handle_delivery(ACK_SCHEMA, raw)
            elif topic == self.command_topic and REPLAY_SCHEMA.encode() in raw:
                if not bool(message.retain):
                    message_ = self._handle_delivery(REPLAY_SCHEMA, raw)
                    if isinstance(message_, Replay):
                        await self._replay(message_)
            else:
                self._handle_command(topic, raw, bool(message.retain))

    def _handle_delivery(self, schema: str, raw: bytes) -> Ack | Replay | None:
        """The monitor's ack (delete what it stored) or replay request, verified."""
        try:
            message = parse_message(raw, schema=schema, probe=self._probe, key=self._key)
        except DeliveryError as exc:
            kind = "ack" if schema == ACK_SCHEMA else "replay"
            with self._lock:
                self._refused[kind] = self._refused.get(kind, 0) + 1
            logger.warning("MQTT %s refused: %s", kind, exc)
            return None
        if isinstance(message, Ack):
            with self._lock:
                self._acks += 1
            with contextlib.suppress(OutboxError):  # closing: the next session gets it again
                self._outbox.confirm_soon(message.seq)
        return message

    async def _replay(self, replay: Replay) -> None:
        """Send what is kept of the range again; the next status names what is gone."""
        try:
            reopened = await self._outbox.reopen(replay.first, replay.last)
        except OutboxError as exc:
            logger.error("replay of seq %d..%d failed: %s", replay.first, replay.last, exc)
            return
        with self._lock:
            self._replays += 1
        logger.info(
            "replay of seq %d..%d requested: %d result(s) sent again, %d range(s) gone",
            replay.first,
            replay.last,
            reopened.again,
            len(reopened.gone),
        )
        self._gone = reopened.gone[:MAX_GONE_RANGES]
        self._rewind = True
        self._status_stale = True
        if self._wake is not None:
            self._wake.set()

    def _handle_command(self, topic: str, payload: object, retained: bool) -> None:
        broadcast = topic == self.broadcast_topic
        try:
            if retained:
                raise CommandRefused("retained", "a retained command would fire on every reconnect")
            raw = payload if isinstance(payload, bytes) else str(payload).encode("utf-8")
            command = parse_command(raw, broadcast=broadcast)
            if command.request_id is not None and command.request_id in self._recent:
                raise CommandRefused("duplicate", f"request {command.request_id} seen already")
            try:
                reason = self._on_command(command)
            except Exception:
                logger.exception("command handler failed on %s", command)
                reason = "error"
            if command.request_id is not None:
                self._recent.append(command.request_id)
            if reason is not None:
                raise CommandRefused(reason, f"{command.check} of {command.target}")
        except CommandRefused as refused:
            with self._lock:
                self._refused[refused.reason] = self._refused.get(refused.reason, 0) + 1
            logger.warning("MQTT command on %s refused: %s", topic, refused)
            return
        with self._lock:
            self._accepted += 1
        logger.info(
            "MQTT command accepted: %s check of %s (request %s)",
            command.check,
            command.target,
            command.request_id,
        )

    async def _publish(self, client: aiomqtt.Client, row: Pending) -> None:
        try:
            await client.publish(
                self.result_topic(row.probe, row.target), row.payload, qos=1, timeout=self._publish_timeout
            )
        except MqttError as exc:
            with self._lock:
                self._publish_errors += 1
            self._note_error(f"publish: {exc}")
            raise

    async def _drain(
        self,
        client: aiomqtt.Client,
        tasks: asyncio.TaskGroup,
        commands: asyncio.Task[None],
    ) -> None:
        """Publish the outbox in seq order with a window of unacknowledged results.

        Rows are prefetched (``_PREFETCH`` at a time) so that refilling the window does
        not wait for SQLite; deletes after PUBACK are queued to the outbox thread
        without waiting (its single thread keeps them ordered before later reads).
        """
        assert self._wake is not None and self._loop is not None
        wake, stop, loop = self._wake, self._stop_event(), self._loop
        window = _Window(self._max_in_flight)
        deadline: float | None = None  # stopping: give up on what is not sent by then
        stop_waiter = asyncio.ensure_future(stop.wait())
        try:
            while True:
                if stop.is_set() and deadline is None:
                    deadline = loop.time() + self._drain_grace
                late = deadline is not None and loop.time() >= deadline
                if self._rewind:  # a replay reopened results below the cursor
                    self._rewind = False
                    window.rewind()
                if self._health_key() != self._reported or loop.time() >= self._next_status:
                    self._status_stale = True
                if not late and not window.full:
                    await self._refill(client, tasks, window, wake)
                if not window.in_flight and (late or (deadline is not None and not window.buffer)):
                    break  # stopping: everything sent, or out of time
                await self._await_any(window, wake, stop_waiter, deadline)
                self._mark_published(window.acknowledged())
                if late and window.in_flight:
                    break  # give up on the stragglers: they stay in the outbox
        finally:
            stop_waiter.cancel()
            for task in window.in_flight:
                task.cancel()
            if stop.is_set():
                commands.cancel()

    async def _refill(
        self, client: aiomqtt.Client, tasks: asyncio.TaskGroup, window: _Window, wake: asyncio.Event
    ) -> None:
        """Send a stale status first, then fill the window, reading ahead when the buffer is empty."""
        if self._status_stale:
            await self._publish_status(client)
        if not window.buffer:
            wake.clear()
            window.buffer.extend(await self._outbox.pending(_PREFETCH, after_seq=window.fetched))
            if window.buffer:
                window.fetched = window.buffer[-1].seq
        while window.buffer and not window.full:
            row = window.buffer.popleft()
            window.in_flight[tasks.create_task(self._publish(client, row))] = row

    async def _await_any(
        self, window: _Window, wake: asyncio.Event, stop_waiter: asyncio.Future[Any], deadline: float | None
    ) -> None:
        """Until a publish finishes, new rows arrive (room in the window and nothing read
        ahead), a stop is asked, a status falls due, or the drain's deadline passes."""
        assert self._loop is not None
        loop = self._loop
        waiters: set[asyncio.Future[Any]] = set(window.in_flight)
        if not window.full and not window.buffer:
            waiters.add(asyncio.ensure_future(wake.wait()))
        if deadline is None:
            waiters.add(stop_waiter)
        timeout = max(0.0, self._next_status - loop.time())
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - loop.time()))
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters - set(window.in_flight) - {stop_waiter}:
            waiter.cancel()

    def _mark_published(self, acked: list[str]) -> None:
        if acked:
            self._outbox.published_soon(acked)
            with self._lock:
                self._published += len(acked)
