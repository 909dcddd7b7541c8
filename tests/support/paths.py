"""Where the repository's files are, for tests that run its code or read its deploy files."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIPP_DIR = REPO / "tests" / "sipp"
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "ecpm.rules.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
