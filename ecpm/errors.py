"""The root of every exception ecpm raises on purpose, and the tree under it.

    EcpmError                          ecpm.errors
    ├── UsageError                     the command line asks for something impossible
    ├── ConfigError                    a config file is wrong (FILE:LINE: key.path: reason)
    ├── GuardRefusal                   probes.guard: a dial target is, or may reach, a live
    │                                  emergency number
    ├── SipError                       probes.sip: the SIP engine could not do what was asked
    │   ├── EngineClosed               the engine is not running (not started, or closed)
    │   ├── CallSetupError             pjsua2 refused to start a request (``status``: pjsip's status code)
    │   └── NoCallSlot                 no call slot became free within the wait limit
    ├── LayoutError                    probes.sip_targets: pjsip's structures are not laid out
    │                                  as expected (another build); the engine refuses to start
    ├── OutboxError                    probes.outbox: the outbox cannot be opened or written
    ├── PublisherError                 probes.mqtt: the MQTT settings cannot be used
    ├── WorkerProtocolError            probes.worker_wire: a SIP worker's frame is cut short,
    │                                  too big or not what the protocol says
    ├── StoreError                     monitor.store: the store cannot be opened as asked
    │   │                              (missing, unreachable, not a store, or too old to read)
    │   └── StoreLost                  its connection broke mid-work (PostgreSQL): reconnect
    ├── ActionError                    monitor.web: an HTTP API action refused its request
    ├── QueryError (also ValueError)   monitor.selection: a status page or API query parameter
    │                                  it cannot take (a 400 naming the parameter)
    ├── ListenError                    ecpm.http: an HTTP listener cannot bind its address
    │   └── HealthError                probes.health: the health endpoint cannot listen
    └── WireError (also ValueError)    probes.wire: a payload is not valid; ``reason`` is a
        │                              bounded code (a metric label)
        ├── ResultError                probes.result: a result payload
        ├── StatusError                probes.status: a probe status payload
        └── DeliveryError              probes.delivery: an ack or replay request

Each class lives in the module that raises it; this module holds the root and the two
the command line and the config loader share. Two exceptions stay outside the tree on
purpose, because they never leave their module: ``probes.mqtt.CommandRefused`` (a
refused command becomes a counted value, not an error) and ``probes.guard._TooComplex``
(an internal signal of the pattern expander).

Foreign errors (pydantic, yaml, OSError, pjsua2, MQTT, httpx) are converted at the
edge of the module that meets them. The CLI (``ecpm.cli.main``) prints any
``EcpmError`` that reaches it as plain lines and exits 2 (a ``ConfigError`` as its
``FILE:LINE`` lines, any other as ``ecpm COMMAND: message``) — never a traceback for
a user error. Exit 1 is a check that ran and failed, returned by the subcommand.
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
