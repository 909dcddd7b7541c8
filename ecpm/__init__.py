"""ecpm — synthetic emergency-call path monitor.

Three packages: ``probes`` (probe agent, SIP engine, responder, live-number guard),
``monitor`` (ingest, store, state, metrics, pages, reports) and this one, which
holds what both share (config-file plumbing, settings, errors) and the command line
on top of both: ``ecpm.cli``, ``ecpm.check_config`` and ``ecpm.demo`` (every piece
started on loopback). Only those three reach into ``probes`` or ``monitor``, and only
when their subcommand runs.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ecpm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
