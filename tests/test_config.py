"""Config validation: every example validates; every bad file fails with its exact message.

Each file in tests/testdata/ breaks one rule and says, in its first line
(``# expect: LINE: key: reason``), the one error ``ecpm check-config`` must print (the
rest of a file may be any bytes: invalid UTF-8, control characters, an alias, 5,000
levels of nesting). Hostile files that cannot carry a UTF-8 first line (UTF-16, too
large) and the fuzzing are in tests/test_config_hostile.py.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from ecpm.check_config import load_any
from ecpm.configfile import format_duration, parse_duration
from ecpm.errors import ConfigError
from monitor.config import Http, MonitorConfig
from probes.config import ProbeConfig, ResponderConfig

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path("tests/testdata")
BAD_FILES = sorted(p.name for p in (ROOT / TESTDATA).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ECPM_TESTDATA_UNSET", raising=False)
    monkeypatch.delenv("ECPM_PROBE_KEY", raising=False)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("probe.example.yaml", ProbeConfig),
        ("monitor.example.yaml", MonitorConfig),
        ("responder.example.yaml", ResponderConfig),
    ],
)
def test_examples_validate(name: str, model: type) -> None:
    assert isinstance(load_any(ROOT / "config" / name), model)


def test_example_defaults_are_explicit() -> None:
    # the example spells out every default: validating it gives the same as the model defaults
    probe = load_any(ROOT / "config" / "probe.example.yaml")
    assert probe.sip.max_calls == 4
    assert probe.targets[0].checks.invite.first_response_timeout == 3.0
    assert probe.schedule.backoff_after_busy == 300.0
    assert probe.probe.secret.get_secret_value() == "example-key-change-me"


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_fails_with_its_message(name: str) -> None:
    path = TESTDATA / name
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")  # the rest may be any bytes
    assert first.startswith("# expect: "), f"{name} must start with '# expect: LINE: key: reason'"
    expected = f"{path}:{first.removeprefix('# expect: ')}"
    with pytest.raises(ConfigError) as caught:
        load_any(path)
    assert caught.value.problems == [expected]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "two.yaml"
    bad.write_text("kind: responder\nmode: silence\nfault: x\ncolour: red\n")
    with pytest.raises(ConfigError) as caught:
        load_any(bad)
    assert [p.split(": ")[1] for p in caught.value.problems] == ["mode", "fault", "colour"]


def test_secret_file_is_read_and_never_shown(tmp_path: Path) -> None:
    key = tmp_path / "probe.key"
    key.write_text("s3cret-value\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "kind: probe\n"
        f"probe: {{id: p1, region: GB, key_file: {key}}}\n"
        'targets: [{id: t1, uri: "sip:ecpm-test@127.0.0.1:5090", test_endpoint: true}]\n'
    )
    probe = load_any(cfg)
    assert probe.probe.secret.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(probe)
    assert "s3cret-value" not in str(probe.model_dump())


def test_store_url_is_a_secret_and_names_the_store(tmp_path: Path) -> None:
    url = tmp_path / "store.url"
    url.write_text("postgresql://ecpm:s3cret-value@127.0.0.1:5432/ecpm\n")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"kind: monitor\nstore: {{backend: postgres, url_file: {url}}}\n"
        "probes: [{id: p1, key: k}]\ntargets: [{id: t1}]\n"
    )
    monitor = load_any(cfg)
    assert monitor.store.where == "postgresql://ecpm:s3cret-value@127.0.0.1:5432/ecpm"
    assert "s3cret-value" not in repr(monitor) and "s3cret-value" not in str(monitor.model_dump())
    assert load_any(ROOT / "config" / "monitor.example.yaml").store.where == "ecpm-monitor.db"


def test_env_interpolation_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("kind: responder\nanswering_point: ${ECPM_AP:-fallback} / ${ECPM_AP2}\n")
    monkeypatch.setenv("ECPM_AP2", "two")
    monkeypatch.delenv("ECPM_AP", raising=False)
    assert load_any(cfg).answering_point == "fallback / two"


def test_unreadable_file_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_any("config/does-not-exist.yaml")
    assert caught.value.problems == ["config/does-not-exist.yaml: cannot read: No such file or directory"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("2h", 7200.0),
        ("1d", 86400.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "30", "s", "30 s", "-5s", "5sec", "1m 30s", "1e3s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _field_names(model: type[BaseModel]) -> set[str]:
    """Every key a config file of this model can hold, at any depth."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for arg in typing.get_args(field.annotation) or (field.annotation,):
            for inner in typing.get_args(arg) or (arg,):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    names |= _field_names(inner)
    return names


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("probe.example.yaml", ProbeConfig),
        ("monitor.example.yaml", MonitorConfig),
        ("responder.example.yaml", ResponderConfig),
    ],
)
def test_examples_document_every_option(name: str, model: type[BaseModel]) -> None:
    text = (ROOT / "config" / name).read_text()
    missing = sorted(n for n in _field_names(model) if not re.search(rf"(^|[\s{{,]){n}:", text, re.MULTILINE))
    assert missing == [], f"config/{name} does not document: {missing}"


@pytest.mark.parametrize(
    ("http", "link"),
    [
        ({"listen": "127.0.0.1:9470"}, "http://127.0.0.1:9470/"),
        ({"listen": "[::1]:9470"}, "http://[::1]:9470/"),
        ({"listen": "0.0.0.0:9470"}, None),
        ({"listen": "[::]:9470"}, None),
        ({"listen": "0.0.0.0:9470", "public_url": "https://ecpm.example.net"}, "https://ecpm.example.net/"),
        ({"public_url": "https://ecpm.example.net/status/"}, "https://ecpm.example.net/status/"),
    ],
)
def test_status_link_in_pages_is_one_people_can_open(http: dict[str, str], link: str | None) -> None:
    assert Http.model_validate(http).status_url == link


def test_public_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="public_url"):
        Http.model_validate({"public_url": "ftp://x"})
