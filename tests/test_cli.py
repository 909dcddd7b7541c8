"""The command line as a user runs it: a real subprocess, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecpm.cli import COMMANDS
from tests.support.processes import run_ecpm as ecpm

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_command() -> None:
    done = ecpm("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name: str) -> None:
    done = ecpm(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ecpm " + name)


def test_check_config_ok() -> None:
    done = ecpm("check-config", "config/probe.example.yaml", "config/monitor.example.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_check_config_error_is_one_line_and_exit_2() -> None:
    done = ecpm("check-config", "tests/testdata/probe-unknown-key.yaml")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "tests/testdata/probe-unknown-key.yaml:5: probe.colour: unknown key\n"


def test_usage_error_exit_2_without_traceback() -> None:
    done = ecpm("check-config")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "usage: ecpm check-config" in done.stderr


def test_unknown_command_exit_2() -> None:
    done = ecpm("dial", "999")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
    assert "Traceback" not in done.stderr
