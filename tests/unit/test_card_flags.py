"""The command line's way to the card: ``--port`` or ``--reader`` for ``uicc`` and ``bootstrap``, and
how they combine with a configuration file (no card is opened here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mn_secd.cli import build_parser
from mn_secd.commands import bootstrap, uicc
from mn_secd.errors import ConfigError
from mn_secd.uicc.options import ApplicationChoice, ModemConfig, TransportChoice


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(argv[0]).parse_args(argv)


def config_file(tmp_path: Path, modem: str) -> str:
    path = tmp_path / "mn-secd.toml"
    path.write_text(f"[modem]\n{modem}\ncommand_timeout = 2.0\n")
    return str(path)


def test_uicc_takes_a_port_or_a_reader() -> None:
    assert uicc.modem_config(parse("uicc", "info", "--reader", "uTrust")) == ModemConfig(
        transport="pcsc", reader="uTrust"
    )
    assert uicc.modem_config(parse("uicc", "auth", "--reader", "x", "--transport", "pcsc", *RAND_AUTN)).uses_reader
    assert uicc.modem_config(parse("uicc", "info", "--port", "/dev/ttyUSB2", "--baud", "9600")) == ModemConfig(
        "/dev/ttyUSB2", baud=9600
    )


RAND_AUTN = ("--rand", "00" * 16, "--autn", "00" * 16)


@pytest.mark.parametrize(
    "argv",
    [
        ("uicc", "info"),  # neither
        ("uicc", "info", "--port", "/dev/ttyUSB2", "--reader", "x"),  # both
    ],
)
def test_uicc_needs_exactly_one_way_to_the_card(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("--reader", "x", "--transport", "csim"), "a reader is always reached over pcsc"),
        (("--reader", "x", "--baud", "9600"), "a reader is always reached over pcsc"),
        (("--port", "/dev/ttyUSB2", "--transport", "pcsc"), "--transport pcsc goes with --reader"),
    ],
)
def test_uicc_options_that_do_not_fit_are_usage_errors(
    argv: tuple[str, ...], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        uicc.modem_config(parse("uicc", "info", *argv))
    assert info.value.code == 2
    assert problem in capsys.readouterr().err


def test_bootstrap_from_flags_alone() -> None:
    modem, _ = bootstrap.settings(parse("bootstrap", "--reader", "vicc", "--bsf", "http://127.0.0.1:1"))
    assert modem == ModemConfig(transport="pcsc", reader="vicc")
    modem, _ = bootstrap.settings(parse("bootstrap", "--port", "/dev/ttyUSB2"))
    assert modem == ModemConfig("/dev/ttyUSB2")
    with pytest.raises(ConfigError, match="--reader NAME"):
        bootstrap.settings(parse("bootstrap"))


def test_bootstrap_flags_replace_the_files_way_to_the_card(tmp_path: Path) -> None:
    at_file = config_file(tmp_path, 'port = "/dev/null"\ntransport = "cgla"')
    modem, _ = bootstrap.settings(parse("bootstrap", "--config", at_file, "--reader", "vicc"))
    assert (modem.port, modem.reader, modem.transport, modem.command_timeout) == (None, "vicc", "pcsc", 2.0)

    reader_file = config_file(tmp_path, 'transport = "pcsc"\nreader = "vicc"')
    modem, _ = bootstrap.settings(parse("bootstrap", "--config", reader_file, "--port", "/dev/ttyUSB2"))
    assert (modem.port, modem.reader, modem.transport) == ("/dev/ttyUSB2", None, TransportChoice.AUTO)
    modem, _ = bootstrap.settings(parse("bootstrap", "--config", reader_file, "--application", "usim"))
    assert (modem.reader, modem.application) == ("vicc", ApplicationChoice.USIM)

    with pytest.raises(ConfigError) as info:
        bootstrap.settings(parse("bootstrap", "--config", reader_file, "--transport", "csim"))
    assert info.value.key == "--transport" and "needs the modem's AT port" in info.value.problem
    with pytest.raises(ConfigError, match="a reader is always reached over pcsc"):
        bootstrap.settings(parse("bootstrap", "--reader", "vicc", "--transport", "cgla"))
    with pytest.raises(ConfigError, match='"pcsc" goes with --reader NAME'):
        bootstrap.settings(parse("bootstrap", "--config", reader_file, "--port", "/dev/null", "--transport", "pcsc"))
