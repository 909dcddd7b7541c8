"""The machine-readable result of a bench script: one JSON line, printed last.

``bench/run.py`` (``make bench``) reads the last line of a script's output that parses as
``{"bench": NAME, "figures": {KEY: NUMBER, ...}}``: each figure of ecpm and of its peer
measured in the same run, under the keys the runner's table names (bench/run.py
``BENCHES``). A script that prints no such line is read from its text output instead.
"""

from __future__ import annotations

import json


def emit(bench: str, **figures: float) -> None:
    """Print the result line: ``figures`` rounded to 6 significant digits."""
    print(json.dumps({"bench": bench, "figures": {k: float(f"{v:.6g}") for k, v in figures.items()}}))
