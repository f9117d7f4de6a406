"""``[modem] pin_file``: found and checked like an AE's PSK file, read into a wipeable buffer, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from mn_secd.config import load_config, load_pin
from mn_secd.errors import ConfigError

CONFIG = """
[modem]
port = "/dev/null"
pin_file = "sim.pin"
"""


@pytest.fixture
def cfg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "mn-secd.toml").write_text(CONFIG)
    return tmp_path


def write_pin(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_no_pin_file_no_pin(tmp_path: Path) -> None:
    (tmp_path / "mn-secd.toml").write_text('[modem]\nport = "/dev/null"\n')
    config = load_config(tmp_path / "mn-secd.toml")
    assert config.pin_file is None and load_pin(config) is None


def test_the_pin_next_to_the_config_file(cfg_dir: Path) -> None:
    write_pin(cfg_dir / "sim.pin", b"4711\n")  # as `echo 4711 > sim.pin` writes it
    config = load_config(cfg_dir / "mn-secd.toml")
    assert config.pin_file == cfg_dir / "sim.pin"
    pin = load_pin(config)
    assert pin is not None and pin.get() == b"4711" and "4711" not in repr(pin)


def test_a_systemd_credential_comes_first(cfg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    write_pin(creds / "sim.pin", b"13579246")
    write_pin(cfg_dir / "sim.pin", b"0000")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(cfg_dir / "mn-secd.toml")
    assert config.pin_file == creds / "sim.pin"
    pin = load_pin(config)
    assert pin is not None and pin.get() == b"13579246"


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (b"4711", 0o640, "accessible by group or others"),
        (b"", 0o600, "is empty"),
    ],
)
def test_the_same_checks_as_a_psk_file(cfg_dir: Path, content: bytes, mode: int, problem: str) -> None:
    write_pin(cfg_dir / "sim.pin", content, mode)
    with pytest.raises(ConfigError) as info:
        load_config(cfg_dir / "mn-secd.toml")
    assert info.value.key == "modem.pin_file" and problem in info.value.problem


def test_a_missing_pin_file_names_where_it_was_looked_for(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cfg_dir / "mn-secd.toml")
    assert info.value.key == "modem.pin_file" and str(cfg_dir / "sim.pin") in info.value.problem


@pytest.mark.parametrize("content", [b"12", b"123456789", b"12a4", b"1234 5678"])
def test_a_file_that_is_not_a_pin_is_refused_without_showing_it(cfg_dir: Path, content: bytes) -> None:
    write_pin(cfg_dir / "sim.pin", content)
    config = load_config(cfg_dir / "mn-secd.toml")
    with pytest.raises(ConfigError) as info:
        load_pin(config)
    assert info.value.key == "modem.pin_file" and "4 to 8 digits" in info.value.problem
    assert content.decode() not in str(info.value)


def test_the_pin_file_is_checked_again_when_read(cfg_dir: Path) -> None:
    """Opened and checked as one step: a file made readable to others after loading is refused."""
    path = write_pin(cfg_dir / "sim.pin", b"4711")
    config = load_config(cfg_dir / "mn-secd.toml")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_pin(config)
    assert "accessible by group or others" in info.value.problem
