"""``ecpm probe -c probe.yaml``: the long-running probe agent.

    Scheduler ──run(target, kind)──▶ WorkerPool (guard) ──▶ SIP worker processes:
        check_kinds.REGISTRY[kind] on each worker's engine (guard again) ──CheckOutcome──▶
    sink: number, sign, store in the outbox (before anything is sent) ──▶
    Publisher: drain the outbox over MQTT QoS 1, keep until the monitor's ack; replay; Last Will; commands

The SIP engines run in worker processes (probes.workers, ``sip.workers`` of them, 4 calls
each); a worker that dies loses only its own checks (``internal_error``) and is started
again. The agent keeps the schedule, the outbox, ``seq`` and the key.

Signals: SIGTERM/SIGINT stop cleanly (in-flight calls are hung up, their results
kept in the outbox); SIGHUP re-reads the config and swaps the targets only if the
new file is valid — a broken file is refused with its errors and the old config
keeps running. Changes to sections other than ``targets`` and ``schedule`` need a
restart, and the agent says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from ecpm import __version__
from ecpm.configfile import load_config
from ecpm.errors import ConfigError
from ecpm.signals import run_until_signalled
from probes.config import ProbeConfig, ScheduleSettings
from probes.guard import Guard
from probes.health import HealthServer
from probes.mqtt import Command, Publisher
from probes.outbox import Outbox
from probes.result import Result
from probes.scheduler import CheckReport, Scheduler
from probes.workers import WorkerPool

logger = logging.getLogger(__name__)


class ProbeAgent:
    def __init__(self, config: ProbeConfig, *, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.guard = Guard(home_region=config.probe.region, dial_prefixes=config.guard.dial_prefixes)
        self._key = config.probe.secret.get_secret_value().encode()
        self.outbox = Outbox(
            config.outbox.path,
            max_results=config.outbox.max_results,
            keep_unconfirmed=config.outbox.keep_unconfirmed,
            keep_for=config.outbox.keep_for,
        )
        self.workers = WorkerPool(config, self.guard)
        self.scheduler = Scheduler(
            targets=config.targets,
            settings=self._schedule(config),
            runner=self.workers.run,
            sink=self._store,
        )
        self.publisher = Publisher(
            settings=config.mqtt,
            probe_id=config.probe.id,
            outbox=self.outbox,
            on_command=self._command,
            key=self._key,
            targets=[t.id for t in config.targets],
            version=__version__,
        )
        self.health: HealthServer | None = None
        if config.health.listen is not None:
            self.health = HealthServer(
                listen=config.health.listen,
                probe=config.probe.id,
                outbox=self.outbox,
                publisher=self.publisher,
                scheduler=self.scheduler,
                guard_refusals=self._guard_refusals,
                workers=self.workers,
            )

    def _schedule(self, config: ProbeConfig) -> ScheduleSettings:
        """The schedule, never running more checks at once than the workers have call slots."""
        slots = self.workers.capacity * self.workers.size
        cap = min(config.schedule.max_concurrent_checks, slots)
        return config.schedule.model_copy(update={"max_concurrent_checks": cap})

    def _guard_refusals(self) -> dict[str, int]:
        """Refusals by reason: the agent's guard before dispatch, then the workers' own."""
        out = self.guard.refusals
        for reason, n in self.workers.guard_refusals().items():
            out[reason] = out.get(reason, 0) + n
        return out

    # ------------------------------------------------------------ the pipeline

    async def _store(self, report: CheckReport) -> None:
        """Number, sign and store a result before anything else sees it."""
        probe, target = self.config.probe.id, report.target.id

        def make(seq: int) -> Result:
            return Result.from_outcome(
                report.outcome,
                probe=probe,
                seq=seq,
                target=target,
                key=self._key,
                confirm=report.confirm,
                request_id=report.request_id,
            )

        result = await self.outbox.add(make)
        level = logging.INFO if result.outcome == "pass" else logging.WARNING
        logger.log(
            level,
            "%s %s %s%s: %s%s (seq %d)",
            target,
            report.kind,
            result.outcome.upper(),
            " (confirm)" if result.confirm else "",
            result.stage or "all stages",
            f" {result.sip_status}" if result.sip_status else "",
            result.seq,
        )

    def _command(self, command: Command) -> str | None:
        if all(t.id != command.target for t in self.config.targets):
            return "not_covered" if command.broadcast else "unknown_target"
        return self.scheduler.request(command.target, command.check, command.request_id)

    # ------------------------------------------------------------ reload

    def reload(self) -> None:
        """SIGHUP: swap targets and schedule if the file is valid; otherwise keep running as is."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path, ProbeConfig)
        except ConfigError as exc:
            logger.error("config reload refused, still running the previous config:\n%s", exc)
            return
        unchanged = ("probe", "sip", "guard", "mqtt", "outbox", "health")
        if any(getattr(new, name) != getattr(self.config, name) for name in unchanged):
            logger.warning(
                "config reload: only targets and schedule change at run time; restart for the rest"
            )
        self.scheduler.replace_config(new.targets, self._schedule(new))
        self.publisher.set_targets([t.id for t in new.targets])
        self.config = self.config.model_copy(update={"targets": new.targets, "schedule": new.schedule})
        logger.info("config reloaded: %d targets", len(new.targets))

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        async with self.workers:
            publisher = asyncio.create_task(self.publisher.run(), name="publisher")
            scheduler = asyncio.create_task(self.scheduler.run(), name="scheduler")
            heartbeat = None
            if self.health is not None:
                self.health.start()
                heartbeat = asyncio.create_task(self.health.run_heartbeat(), name="heartbeat")
            logger.info(
                "probe %s running: %d target(s), results to %s:%d",
                self.config.probe.id,
                len(self.config.targets),
                self.config.mqtt.host,
                self.config.mqtt.port,
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([stopper, publisher, scheduler], return_when=asyncio.FIRST_COMPLETED)
            logger.info("probe %s stopping", self.config.probe.id)
            await self.scheduler.stop()  # hangs up calls in flight; their results are kept
            await self.publisher.stop()  # publishes what it can, then retains "offline"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(publisher), timeout=15)
            extra = [heartbeat] if heartbeat is not None else []
            for task in (publisher, scheduler, stopper, *extra):
                task.cancel()
            await asyncio.gather(publisher, scheduler, stopper, *extra, return_exceptions=True)
        self.outbox.close()
        if self.health is not None:
            self.health.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="probe config file (kind: probe)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, ProbeConfig)
    agent = ProbeAgent(config, config_path=args.config)
    asyncio.run(run_until_signalled(agent.run))
    return 0
