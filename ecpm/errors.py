"""The root of every exception ecpm raises on purpose.

    EcpmError
    ├── ConfigError        a config file is wrong (file, line, key path, reason)
    ├── GuardRefusal       a dial target is, or may reach, a live emergency number (probes.guard)
    ├── UsageError         the command line is wrong
    ├── ActionError        an HTTP API action refused its request (monitor.web)
    └── ListenError        an HTTP listener cannot bind its address (monitor.web)

Foreign errors (pydantic, yaml, OSError, pjsua2, MQTT, httpx) are converted at the
edge of the module that meets them. The CLI prints an ``EcpmError`` as one line and
exits 2 (config/usage) — never a traceback for a user error.
"""

from __future__ import annotations


class EcpmError(Exception):
    """Base class for errors ecpm raises deliberately."""


class UsageError(EcpmError):
    """The command line asks for something impossible."""


class ConfigError(EcpmError):
    """One or more problems in a config file, each ``FILE:LINE: key.path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
