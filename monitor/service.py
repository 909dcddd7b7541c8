"""``ecpm monitor -c monitor.yaml``: the central service.

Tasks, all in one asyncio loop:

- **mqtt**: a persistent QoS 1 session (shared subscription where configured) on
  ``<prefix>/results/#`` and ``<prefix>/status/+``. Messages are handled in
  batches, receive to commit (``_consume``): every message the client holds (at most
  ``MAX_BATCH``) is handled at one receive time, stored in one transaction (one chain
  update, the rows written together), committed once, *then* acknowledged — a crash or a
  store failure before the commit means the broker redelivers, and the store drops
  duplicates. The acks are manual (``manual_ack``), so at most the in-flight window
  (MQTT 5 Receive Maximum 200; mosquitto's ``max_inflight_messages`` on 3.1.1) waits
  unacknowledged, and the batch is that window at most.
  Reconnects with ``ecpm.mqtt.Reconnector`` (the probes' loop too). Memory is bounded
  before anything is read: the MQTT 5 CONNECT asks for packets of at most
  ``ingest.max_payload_bytes`` + 68 KiB (``ecpm.mqtt.packet_limit``; a compliant broker
  drops bigger ones for us), the client cuts any bigger PUBLISH it is sent anyway
  (3.1.1) so that it is rejected as ``too_large``, and it stops reading its socket
  while ``MAX_BUFFERED`` messages wait to be handled (mosquitto 2.0.11 sends beyond
  Receive Maximum, ``ecpm.mqtt``). Once a batch is committed, its messages are kept as
  packet ids only, for the acks.
  It subscribes on **every** connect, whatever ``session present`` says: mosquitto 2.0.11
  restores a persistent session after its own restart without its shared subscriptions
  (``ecpm.mqtt``). It retries every ``RECONNECT_MAX`` seconds at most, so that after a
  broker outage it is usually subscribed again before the probes' outboxes drain (what
  the broker dropped meanwhile is a seq gap). ``ecpm_monitor_mqtt_connected`` and
  ``ecpm_monitor_mqtt_last_message_timestamp_seconds`` export the connection, and while it
  is down an unknown target's reason says the monitor is cut off.
- **tick**: re-evaluates every target each second (staleness and gaps need no message)
  and sends replay requests again while results are outstanding.
- **delivery** (``monitor.delivery``): after each committed batch, a signed ack per probe
  (``<prefix>/acks/<probe>``, retained: what the store holds, so the probe may delete it)
  and a replay request (``<prefix>/commands/<probe>``) for each seq range found missing.
- **pages**: the notifier dispatcher.
- **http**: /metrics, /healthz, the JSON API and the status page.
- **retention**: prunes results older than ``store.retention`` hourly.

Replicas (docs/scaling.md): monitors on one PostgreSQL store and one shared subscription
split the results. Each tick asks the store's ``Election`` whether this one evaluates
(``ecpm_monitor_evaluator``); pages go out through a store connection of their own, each
claimed before it is sent. SQLite takes one monitor per file: a second one refuses to start.

A store connection that breaks (``StoreLost``: PostgreSQL restarted, a network cut) is
reopened every second until the server answers (``ecpm_monitor_store_up`` 0 meanwhile,
``ecpm_monitor_store_reconnects_total``), the core is rebuilt from what was committed, and
the MQTT session is dropped and resumed: the broker delivers again every message not
acknowledged, and none was acknowledged before its batch committed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
from prometheus_client import CollectorRegistry

from ecpm.configfile import load_config, secret_text
from ecpm.mqtt import Backoff, BoundedClient, Reconnector, ack_ids, build_client, packet_limit
from ecpm.signals import run_until_signalled
from monitor.config import MonitorConfig
from monitor.core import MonitorCore
from monitor.delivery import Outgoing
from monitor.duties import Acknowledgements
from monitor.model import Incident, IncidentDuty
from monitor.notify import Dispatcher
from monitor.store import StoreError, StoreLost, open_store
from monitor.verification import PostChangeVerifier
from monitor.web import create_app, serve

logger = logging.getLogger(__name__)

MAX_BATCH = 500
MAX_BUFFERED = 256  # messages read from the socket and not yet handled (then reading pauses)
MAX_OUTGOING = 1024  # acks and replay requests waiting to be published
EVALUATE_EVERY = 0.1  # seconds between evaluations (and acks) driven by incoming messages
# reconnect attempts (ecpm.mqtt.Backoff): 1 s doubling to RECONNECT_MAX, each delay drawn from its upper half
RECONNECT_FIRST = 1.0
RECONNECT_MAX = 2.0
Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class MonitorService:
    def __init__(self, config: MonitorConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.store = open_store(config.store.where)
        self.election = self.store.election()  # SQLite: refuses a second monitor on the file
        # replicas: pages are claimed on a connection of their own (a row lock held while sent)
        self.page_store = open_store(config.store.where) if self.store.shared else self.store
        self._store_down = False  # the store's connection broke; _store_back reopens it
        self._reopening = asyncio.Lock()
        self._elected: bool | None = None  # what the election said last (None: not asked yet)
        # the core restores its state but evaluates nothing (so pages nothing) until run():
        # by then the dispatcher exists, and an incident the stored state opens at once
        # (e.g. a gap after a long stop) is stored and paged like any other
        self.core = MonitorCore(config, self.store, self.registry, pager=self._page, escalator=self._escalate)
        self.dispatcher = Dispatcher(
            store=self.store,
            sender=self.page_store,
            notifiers=config.notifiers,
            metrics=self.core.metrics,
            monitor=config.id,
            status_url=config.http.status_url,
        )
        self.connected = asyncio.Event()
        self._outgoing: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=MAX_OUTGOING)
        self.mqtt_client: aiomqtt.Client | None = None  # for actions that publish (ecpm verify)
        verifier = PostChangeVerifier(
            core=self.core, store=self.store, publish=self._publish, topic_prefix=config.mqtt.topic_prefix
        )
        acks = Acknowledgements(store=self.store)
        self.actions: dict[str, Action] = {
            "verify": verifier.start,
            "verify_status": verifier.status,
            "incident_ack": acks.ack,
        }

    def _page(self, incident: Any, event: str) -> None:
        self.dispatcher.page(incident, event)

    def _escalate(self, incident: Incident, duty: IncidentDuty) -> None:
        self.dispatcher.escalate(incident, duty)

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self.mqtt_client is None:
            raise ConnectionError("not connected")
        await asyncio.wait_for(self.mqtt_client.publish(topic, payload, qos=1), timeout=10)

    async def run(self, stop: asyncio.Event) -> None:
        self._elect()
        self.core.evaluate()  # the first evaluation after a (re)start: the pager exists now
        app = create_app(
            snapshot=self.core.snapshot,
            registry=self.registry,
            incidents=self.store.incidents,
            token=secret_text(self.config.http, "token"),
            actions=self.actions,
        )
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._mqtt(), name="mqtt"),
            asyncio.create_task(self._tick(), name="tick"),
            asyncio.create_task(self._send_delivery(), name="delivery"),
            asyncio.create_task(self._pages(), name="pages"),
            asyncio.create_task(serve(app, self.config.http.listen), name="http"),
            asyncio.create_task(self._retention(), name="retention"),
        ]
        logger.info(
            "monitor %s: status page and /metrics on http://%s/", self.config.id, self.config.http.listen
        )
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in (*tasks, stopper):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(StoreLost):
            self.store.commit()
        self.election.close()
        for store in {id(self.store): self.store, id(self.page_store): self.page_store}.values():
            store.close()
        for task in tasks:  # a task that ended by itself is a failure worth raising
            if task in done and not task.cancelled() and (error := task.exception()) is not None:
                raise error

    # ------------------------------------------------------------ MQTT

    async def _mqtt(self) -> None:
        mqtt = self.config.mqtt

        def client(protocol: aiomqtt.ProtocolVersion) -> BoundedClient:
            return build_client(
                mqtt,
                identifier=mqtt.client_id or f"ecpm-monitor-{self.config.id}",
                protocol=protocol,
                persistent=True,
                session_expiry=round(mqtt.session_expiry),
                manual_ack=True,
                max_packet_size=packet_limit(self.config.ingest.max_payload_bytes),
                max_buffered=MAX_BUFFERED,
            )

        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        connection = Reconnector(mqtt, client, backoff=backoff, on_down=self._down)
        await connection.run(self._session, asyncio.Event())  # until cancelled

    async def _session(self, client: BoundedClient, protocol: str) -> None:
        mqtt = self.config.mqtt
        prefix = mqtt.topic_prefix
        group = self.config.ingest.shared_group
        results = f"$share/{group}/{prefix}/results/#" if group else f"{prefix}/results/#"
        # every connect, whatever "session present" says: a broker may restore the
        # session without its (shared) subscriptions (ecpm.mqtt)
        await client.subscribe(results, qos=1)
        await client.subscribe(f"{prefix}/status/+", qos=1)
        logger.info("connected to MQTT %s:%d, subscribed to %s", mqtt.host, mqtt.port, results)
        self.mqtt_client = client
        self.core.delivery.resend_acks()  # the broker may have lost the retained ones
        self.connected.set()
        self.core.broker_connection(True)
        try:
            await self._consume(client)
        except StoreLost as exc:
            await self._store_back(exc)
            # the batch that was being stored is gone: resume the session, and the broker
            # delivers again what was not acknowledged
            raise aiomqtt.MqttError("the store reconnected: unacknowledged messages come again") from None

    def _down(self, exc: BaseException | None) -> None:
        self.connected.clear()
        self.mqtt_client = None
        self.core.broker_connection(False)

    async def _consume(self, client: BoundedClient) -> None:
        """Batches, receive to commit: wait for a message, take every other one the client
        holds already (at most ``MAX_BATCH``: the in-flight window keeps it smaller, see
        ``ecpm.mqtt``), handle them all at one receive time (``MonitorCore.handle_batch``),
        commit once (one transaction: one chain update, rows written together), and only
        then acknowledge each. Nothing awaits between the first handle and the acks: no
        other task commits half a batch, and a store failure (``StoreLost``) leaves every
        message of the batch unacknowledged, so the broker delivers it again."""
        evaluated = 0.0
        last_message = self.core.metrics.mqtt_last_message
        messages = client.messages
        while True:
            first = await anext(messages)
            batch = [first, *client.take_nowait(MAX_BATCH - 1)]
            del first
            last_message.set(time.time())
            self.core.handle_batch([(m.topic.value, _payload(m.payload)) for m in batch])
            self.store.commit()
            acks = [m.mid for m in batch if m.qos == 1]  # the status topic is QoS 1 too
            del batch  # the acks keep packet ids, not payloads
            ack_ids(client, acks)
            # re-evaluating and acking after every message of a trickle (a probe replaying
            # a gap sends them one by one) would cost more than storing them: at most
            # every EVALUATE_EVERY here; the tick does it every second anyway
            now = time.monotonic()
            if now - evaluated >= EVALUATE_EVERY:
                evaluated = now
                self.core.evaluate()
                self._queue_delivery()

    def _queue_delivery(self) -> None:
        """Acks and replay requests (monitor.delivery), computed right after a commit with no
        await in between, so an ack never covers a row a crash could still lose."""
        self.store.commit()
        for out in self.core.delivery.outgoing(self.core.clock(), replays=self.core.evaluator):
            if self._outgoing.full():
                logger.warning("delivery queue full: %s dropped (sent again later)", out.topic)
                continue
            self._outgoing.put_nowait(out)

    async def _send_delivery(self) -> None:
        """Publish what ``_queue_delivery`` queued. A task of its own: waiting for a PUBACK
        inside the consume loop would deadlock while the client has paused reading."""
        while True:
            out = await self._outgoing.get()
            client = self.mqtt_client
            if client is None:
                continue  # acks are sent again on connect, replays asked again
            try:
                await client.publish(out.topic, out.payload, qos=1, retain=out.retain, timeout=10)
            except aiomqtt.MqttError as exc:
                logger.warning("MQTT: could not send %s: %s", out.topic, exc)

    # ------------------------------------------------------------ periodic work

    async def _tick(self) -> None:
        while True:
            try:
                self._elect()
                self.core.evaluate()
                self.core.beat()  # a restart after silence records the time away as unknown
                if self.mqtt_client is not None:
                    self._queue_delivery()  # replay requests are asked again while outstanding
            except StoreLost as exc:
                await self._store_back(exc)
            await asyncio.sleep(1.0)

    def _elect(self) -> None:
        """Whether this monitor evaluates, as the store's election says now."""
        held = self.election.held()
        if held != self.core.evaluator or self._elected is None:
            logger.warning("monitor %s: %s", self.config.id, "evaluating" if held else "not evaluating")
        self.core.evaluator = self._elected = held
        self.core.metrics.evaluator.set(1.0 if held else 0.0)

    async def _pages(self) -> None:
        while True:
            try:
                await self.dispatcher.run()
            except StoreLost as exc:  # the pages' own connection: reopened by itself
                logger.error("pages: %s; reconnecting", exc)
                await self._reopen(self.page_store)

    async def _store_back(self, exc: StoreLost) -> None:
        """The store's connection broke: reopen it and rebuild the core from what was
        committed. Whichever task meets it first does it; the others wait for that one."""
        self._store_down = True  # set before any await: whoever meets it marks it
        async with self._reopening:
            if not self._store_down:
                return  # reopened meanwhile by another task
            logger.error("store: %s; reconnecting every second", exc)
            self.core.metrics.store_up.set(0.0)
            await self._reopen(self.store, after=self.core.reload)
            self._store_down = False
            self.core.metrics.store_up.set(1.0)
            self.core.metrics.store_reconnects.inc()
            logger.warning("store: reconnected")

    @staticmethod
    async def _reopen(store: Any, *, after: Callable[[], None] = lambda: None) -> None:
        while True:
            try:
                await asyncio.to_thread(store.reconnect)
                after()
                return
            except StoreError:  # still away (StoreLost: lost again while rebuilding)
                await asyncio.sleep(1.0)

    async def _retention(self) -> None:
        while True:
            cutoff = datetime.now(UTC) - timedelta(seconds=self.config.store.retention)
            try:
                with self.store.transaction():
                    pruned = self.store.prune(cutoff)
            except StoreLost as exc:
                await self._store_back(exc)
                continue
            if pruned:
                logger.info("retention: pruned %d results older than %s", pruned, cutoff.isoformat())
            await asyncio.sleep(3600)


def _payload(payload: object) -> bytes:
    return payload if isinstance(payload, bytes) else str(payload).encode()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="monitor config file (kind: monitor)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, MonitorConfig)
    service = MonitorService(config)
    asyncio.run(run_until_signalled(service.run))
    return 0
