"""The registry of check kinds: one entry per kind, as blackbox_exporter's prober map.

An entry names the kind and gives its settings model (the ``checks.<kind>`` section of a
target, ``probes/config.py``), its runner (``async (engine, target, settings) ->
CheckOutcome``; invite and options are in ``probes/checks.py``, register in ``probes/register.py``: a
new kind brings its own module), the stages it times and fails at, the bounded
reasons it fails with, and whether it is a test call (its results decide reachability)
or a ping. Everything that needs to know the kinds reads this: the agent runs
``REGISTRY[kind]``, MQTT commands accept its names, ``ecpm call`` prints its stages.

The light modules that may not import pjsua2 hold only the wire vocabulary
(``probes.outcome``: ``CHECK_KINDS``, ``CALL_KINDS``, ``STAGES``), which the result schema
and the monitor read; ``tests/test_check_kinds.py`` checks that the registry, that
vocabulary, ``config.Checks``, the JSON Schema and docs/checks.md agree. Adding a kind:
docs/checks.md, "Adding a check kind".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from probes.checks import (
    CALL_REASONS,
    NENA_REASONS,
    SETUP_REASONS,
    STATUS_REASONS,
    invite_check,
    options_check,
)
from probes.config import CheckSettings, InviteCheck, OptionsCheck, RegisterCheck, Target
from probes.outcome import IDENTITY_REASONS, STAGES, CheckOutcome
from probes.register import REGISTER_REASONS, register_check
from probes.scheduler import SCHEDULER_REASONS
from probes.sip import SipEngine

S = TypeVar("S", bound=CheckSettings)


@dataclass(frozen=True, slots=True)
class CheckKind(Generic[S]):
    """One check kind. ``run`` never raises for a failed path (an exception is a bug)."""

    name: str  # the wire name: a result's ``check``, the ``checks:`` key, a metric label
    settings: type[S]  # its ``checks.<name>`` model; ``settings()`` gives the defaults
    run: Callable[[SipEngine, Target, S], Awaitable[CheckOutcome]]
    stages: tuple[str, ...]  # what it times and fails at, in order (a subset of STAGES)
    reasons: tuple[str, ...]  # every reason it fails with (bounded, documented)
    call: bool  # a test call: its results decide reachability; False for a ping

    def settings_of(self, target: Target) -> S:
        """The target's settings for this kind, or the defaults when it has none."""
        found: S | None = getattr(target.checks, self.name)
        return found if found is not None else self.settings()


def _registry(*kinds: CheckKind[Any]) -> Mapping[str, CheckKind[Any]]:
    return MappingProxyType({kind.name: kind for kind in kinds})


REGISTRY: Final[Mapping[str, CheckKind[Any]]] = _registry(
    CheckKind(
        name="invite",
        settings=InviteCheck,
        run=invite_check,
        stages=STAGES,
        reasons=(*SETUP_REASONS, *STATUS_REASONS, *NENA_REASONS, *IDENTITY_REASONS, *CALL_REASONS),
        call=True,
    ),
    CheckKind(
        name="options",
        settings=OptionsCheck,
        run=options_check,
        stages=("transport", "answer"),
        reasons=(*SETUP_REASONS, *STATUS_REASONS),
        call=False,
    ),
    CheckKind(
        name="register",
        settings=RegisterCheck,
        run=register_check,
        stages=("transport", "trying", "answer"),
        reasons=(*SETUP_REASONS, *STATUS_REASONS, *REGISTER_REASONS),
        call=False,
    ),
)

# Every reason a result may carry: the kinds' own, then the scheduler's around a check
REASONS: Final[tuple[str, ...]] = tuple(
    dict.fromkeys([*(reason for kind in REGISTRY.values() for reason in kind.reasons), *SCHEDULER_REASONS])
)


async def run_check(engine: SipEngine, target: Target, kind: str) -> CheckOutcome:
    """The agent's runner for the scheduler: ``REGISTRY[kind]`` with the target's settings."""
    entry = REGISTRY[kind]
    return await entry.run(engine, target, entry.settings_of(target))


__all__ = ["REASONS", "REGISTRY", "CheckKind", "run_check"]
