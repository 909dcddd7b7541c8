"""ecpm — synthetic emergency-call path monitor.

Three packages: ``probes`` (probe agent, SIP engine, responder, live-number guard),
``monitor`` (ingest, store, state, metrics, pages, reports) and this one, which
holds only what both share: the command line, config-file plumbing and errors.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ecpm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
