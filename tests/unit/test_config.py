"""Configuration loading: defaults, every validation error names file and key, PSK file lookup."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from mn_secd.config import (
    SECTION_KEYS,
    AeConfig,
    Config,
    ControlConfig,
    GbaConfig,
    LogConfig,
    check_modem_port,
    load_config,
)
from mn_secd.errors import ConfigError
from mn_secd.gba.planner import BootstrapTiming, Span
from mn_secd.naf_keys import GbaPolicy
from mn_secd.uicc.options import ModemConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "mn-secd" / "mn-secd.toml"

MINIMAL = """
[modem]
port = "/dev/null"

[[ae]]
identity = "ae1"
psk_file = "ae1.psk"
naf = ["naf.example.org"]
"""


def write_psk(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(os.urandom(16))
    path.chmod(mode)
    return path


@pytest.fixture
def cfg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    write_psk(tmp_path / "ae1.psk")
    return tmp_path


def load_text(cfg_dir: Path, text: str) -> Config:
    path = cfg_dir / "mn-secd.toml"
    path.write_text(text)
    return load_config(path)


def test_minimal_config_gets_the_contract_defaults(cfg_dir: Path) -> None:
    config = load_text(cfg_dir, MINIMAL)
    assert config == load_config(cfg_dir / "mn-secd.toml")
    assert config.modem == ModemConfig(port="/dev/null")
    assert config.gba == GbaConfig()
    assert config.gba.timing() == BootstrapTiming()  # the daemon runs on the planner's (simulated) defaults
    assert config.gba.mode is GbaPolicy.AUTO
    assert config.control == ControlConfig()
    assert config.control.addresses == ("127.0.0.1", "::1")
    assert config.log == LogConfig(level="info")
    assert config.aes == (AeConfig("ae1", cfg_dir / "ae1.psk", ("naf.example.org",), ("dtls-psk",), False),)


def test_every_value_is_read(cfg_dir: Path) -> None:
    write_psk(cfg_dir / "ae2.psk")
    config = load_config(
        _write(
            cfg_dir,
            """
[modem]
port = "/dev/null"
baud = 9600
transport = "CGLA"
application = "usim"
command_timeout = 2

[gba]
mode = "gba-u"
bsf_url = "https://bsf.example.net:8443/"
refresh_margin = 10
refresh_jitter = 0
retry_interval = "20%"
max_retry_interval = 900
min_forced_interval = 1.5
http_timeout = 3
retries = 0
require_rspauth = true
start_jitter = 120
persist_session = true
state_directory = "/var/lib/mn-secd-test"

[control]
addresses = ["127.0.0.1"]
port = 15684
max_peers = 8
idle_timeout = 30
max_handshakes = 16
max_observations = 2

[log]
level = "debug"

[[ae]]
identity = "ae1"
psk_file = "ae1.psk"
naf = ["NAF.Example.org.", "*.IoT.example.net"]
ua = ["010001c0a8", "tls-psk"]
may_force_bootstrap = true

[[ae]]
identity = "ae2"
psk_file = "ae2.psk"
naf = ["x.example.org"]
""",
        )
    )
    assert config.modem == ModemConfig("/dev/null", 9600, "cgla", "usim", 2.0)
    assert config.gba == GbaConfig(
        mode=GbaPolicy.GBA_U_ONLY,
        bsf_url="https://bsf.example.net:8443/",
        refresh_margin=Span(seconds=10.0),
        refresh_jitter=Span(seconds=0.0),
        retry_interval=Span(share=0.2),
        max_retry_interval=900.0,
        min_forced_interval=1.5,
        http_timeout=3.0,
        retries=0,
        require_rspauth=True,
        start_jitter=120.0,
        persist_session=True,
        state_directory=Path("/var/lib/mn-secd-test"),
    )
    timing = config.gba.timing()
    assert (timing.refresh_margin, timing.retry_interval, timing.min_forced_interval, timing.start_jitter) == (
        Span(seconds=10.0),
        Span(share=0.2),
        1.5,
        120.0,
    )
    assert config.control == ControlConfig(("127.0.0.1",), 15684, 8, 30.0, 16, 2)
    assert config.log.level == "debug"
    assert config.aes[0].naf == ("naf.example.org", "*.iot.example.net")
    assert config.aes[0].ua == ("010001c0a8", "tls-psk")
    assert config.aes[0].may_force_bootstrap is True
    assert [ae.identity for ae in config.aes] == ["ae1", "ae2"]


def _write(cfg_dir: Path, text: str) -> Path:
    path = cfg_dir / "mn-secd.toml"
    path.write_text(text)
    return path


def test_the_documented_http_timeout_message(cfg_dir: Path) -> None:
    path = _write(cfg_dir, MINIMAL + '\n[gba]\nhttp_timeout = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f'{path}: gba.http_timeout: expected a number, got "soon"'
    assert info.value.key == "gba.http_timeout"
    assert info.value.file == str(path)


def test_timing_spans_are_seconds_or_shares_of_the_lifetime(cfg_dir: Path) -> None:
    path = _write(
        cfg_dir, MINIMAL + '\n[gba]\nrefresh_margin = "25 %"\nrefresh_jitter = 90\nretry_interval = "12.5%"\n'
    )
    gba = load_config(path).gba
    assert gba.refresh_margin == Span(share=0.25) and gba.refresh_jitter == Span(seconds=90.0)
    assert gba.retry_interval == Span(share=0.125)
    assert gba.retry_interval.of(3600.0) == 450.0 and str(gba.refresh_margin) == "25%"


BAD = [
    ("[modem]\nport = '/dev/null'\nspeed = 9600\n", "modem.speed", "unknown key"),
    ("[modem]\nport = '/dev/null'\n[gba]\nrefresh_margn = 3\n", "gba.refresh_margn", 'did you mean "refresh_margin"'),
    ("[modem]\nport = '/dev/null'\n[extra]\n", "extra", "unknown key"),
    ("[modem]\nport = 5\n", "modem.port", "expected a string, got 5"),
    ("[modem]\nbaud = 9600\n", "modem.port", "missing"),
    ("[gba]\nmode = 'auto'\n", "modem", "missing section [modem]"),
    ("modem = 'x'\n", "modem", "expected a table"),
    ("[modem]\nport = '/dev/null'\nbaud = true\n", "modem.baud", "expected an integer, got true"),
    ("[modem]\nport = '/dev/null'\nbaud = 0\n", "modem.baud", "at least 1"),
    ("[modem]\nport = '/dev/null'\ntransport = 'qmi'\n", "modem.transport", 'got "qmi"'),
    ("[modem]\nport = '/dev/null'\ncommand_timeout = 0\n", "modem.command_timeout", "greater than 0"),
    ("[modem]\nport = '/dev/null'\ncommand_timeout = nan\n", "modem.command_timeout", "finite"),
    ("[modem]\nport = '/dev/null'\n[gba]\nmode = 'gba-x'\n", "gba.mode", "expected one of"),
    ("[modem]\nport = '/dev/null'\n[gba]\nbsf_url = 'bsf.example.net'\n", "gba.bsf_url", "http://"),
    ("[modem]\nport = '/dev/null'\n[gba]\nrefresh_jitter = -1\n", "gba.refresh_jitter", "negative"),
    ("[modem]\nport = '/dev/null'\n[gba]\nretries = 1.5\n", "gba.retries", "expected an integer"),
    ("[modem]\nport = '/dev/null'\n[gba]\nrefresh_margin = 'soon'\n", "gba.refresh_margin", 'such as "33%"'),
    ("[modem]\nport = '/dev/null'\n[gba]\nrefresh_margin = '-5%'\n", "gba.refresh_margin", 'such as "33%"'),
    ("[modem]\nport = '/dev/null'\n[gba]\nretry_interval = '150%'\n", "gba.retry_interval", "exceed 100%"),
    ("[modem]\nport = '/dev/null'\n[gba]\nretry_interval = -1\n", "gba.retry_interval", "negative"),
    ("[modem]\nport = '/dev/null'\n[gba]\nmax_retry_interval = 0\n", "gba.max_retry_interval", "greater than 0"),
    ("[modem]\nport = '/dev/null'\n[gba]\nrequire_rspauth = 'yes'\n", "gba.require_rspauth", "true or false"),
    ("[modem]\nport = '/dev/null'\n[gba]\nstart_jitter = -1\n", "gba.start_jitter", "negative"),
    ("[modem]\nport = '/dev/null'\n[gba]\npersist_session = 'yes'\n", "gba.persist_session", "true or false"),
    # systemd-creds' key choice belongs to `mn-secd setup-sealing --with-key` now, not to the daemon
    ("[modem]\nport = '/dev/null'\n[gba]\nseal_key = 'tpm2'\n", "gba.seal_key", "unknown key"),
    ("[modem]\nport = '/dev/null'\n[gba]\nstate_directory = 'state'\n", "gba.state_directory", "absolute path"),
    ("[modem]\nport = '/dev/null'\n[control]\naddresses = 'lo'\n", "control.addresses", "list of strings"),
    ("[modem]\nport = '/dev/null'\n[control]\naddresses = []\n", "control.addresses", "at least one"),
    ("[modem]\nport = '/dev/null'\n[control]\naddresses = ['localhost']\n", "control.addresses[0]", "IP address"),
    ("[modem]\nport = '/dev/null'\n[control]\naddresses = ['::1', '::1']\n", "control.addresses", "twice"),
    ("[modem]\nport = '/dev/null'\n[control]\nport = 70000\n", "control.port", "between 1 and 65535"),
    ("[modem]\nport = '/dev/null'\n[log]\nlevel = 'loud'\n", "log.level", "expected one of"),
    ("[modem]\nport = '/dev/null'\nae = 3\n", "modem.ae", "unknown key"),
    ("ae = 3\n[modem]\nport = '/dev/null'\n", "ae", "expected [[ae]] entries"),
    # a card in a PC/SC reader: a reader instead of a port, never both
    ("[modem]\ntransport = 'pcsc'\n", "modem.reader", "missing (a part of the PC/SC reader's name"),
    ("[modem]\ntransport = 'pcsc'\nreader = '  '\n", "modem.reader", "must not be empty"),
    ("[modem]\ntransport = 'pcsc'\nreader = 'uTrust'\nport = '/dev/null'\n", "modem.port", "not used with"),
    ("[modem]\ntransport = 'pcsc'\nreader = 'uTrust'\nbaud = 9600\n", "modem.baud", "not used with"),
    ("[modem]\nport = '/dev/null'\nreader = 'uTrust'\n", "modem.reader", 'only used with transport = "pcsc"'),
    ("[modem]\nreader = 'uTrust'\n", "modem.port", "missing"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BAD)
def test_bad_values_name_the_key(cfg_dir: Path, text: str, key: str, fragment: str) -> None:
    path = _write(cfg_dir, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert fragment in info.value.problem
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(info.value)


AE_HEAD = "[modem]\nport = '/dev/null'\n[[ae]]\nidentity = 'ae1'\npsk_file = 'ae1.psk'\nnaf = ['n.example']\n"
BAD_AE = [
    (AE_HEAD + "colour = 'red'\n", "ae[0].colour", "unknown key"),
    (AE_HEAD + "ua = ['carrier-pigeon']\n", "ae[0].ua[0]", "not a Ua security protocol id"),
    (AE_HEAD + "ua = []\n", "ae[0].ua", "at least one"),
    (AE_HEAD + "may_force_bootstrap = 'yes'\n", "ae[0].may_force_bootstrap", 'expected true or false, got "yes"'),
    (AE_HEAD + "[[ae]]\nidentity = 'ae1'\npsk_file = 'ae1.psk'\nnaf = ['n.example']\n", "ae[1].identity", "ae[0]"),
    (AE_HEAD.replace("['n.example']", "['bad_name!']"), "ae[0].naf[0]", "host name"),
    (AE_HEAD.replace("['n.example']", "[]"), "ae[0].naf", "at least one"),
    (AE_HEAD.replace("naf = ['n.example']\n", ""), "ae[0].naf", "missing"),
    (AE_HEAD.replace("identity = 'ae1'\n", ""), "ae[0].identity", "missing"),
    (AE_HEAD.replace("'ae1.psk'", "'nope.psk'"), "ae[0].psk_file", "no such file"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BAD_AE)
def test_bad_ae_entries_name_the_key(cfg_dir: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(cfg_dir, text))
    assert (info.value.key, fragment in info.value.problem) == (key, True), str(info.value)


def test_syntax_errors_and_unreadable_files(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(cfg_dir, "[modem\nport = 1\n"))
    assert info.value.key == "(syntax)"
    assert "line 1" in info.value.problem
    with pytest.raises(ConfigError) as info:
        load_config(cfg_dir / "absent.toml")
    assert info.value.key == "(file)"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_psk_file_accessible_by_others_is_refused(cfg_dir: Path, mode: int) -> None:
    (cfg_dir / "ae1.psk").chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_config(_write(cfg_dir, MINIMAL))
    assert info.value.key == "ae[0].psk_file"
    assert f"{mode:04o}" in info.value.problem
    assert "group or others" in info.value.problem


def test_empty_psk_file_is_refused(cfg_dir: Path) -> None:
    (cfg_dir / "ae1.psk").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"ae\[0\]\.psk_file: .* is empty"):
        load_config(_write(cfg_dir, MINIMAL))


def test_psk_file_is_found_relative_to_the_config_not_the_cwd(
    cfg_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(_write(cfg_dir, MINIMAL))
    assert config.aes[0].psk_file == cfg_dir / "ae1.psk"
    assert config.aes[0].psk_file.is_absolute()


def test_credentials_directory_comes_first(
    cfg_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path_factory.mktemp("creds")
    write_psk(creds / "ae1.psk", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_config(_write(cfg_dir, MINIMAL)).aes[0].psk_file == creds / "ae1.psk"
    # a name only next to the config file is still found when the credentials directory lacks it
    (creds / "ae1.psk").unlink()
    assert load_config(_write(cfg_dir, MINIMAL)).aes[0].psk_file == cfg_dir / "ae1.psk"
    # and the error lists both places
    (cfg_dir / "ae1.psk").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(_write(cfg_dir, MINIMAL))
    assert str(creds / "ae1.psk") in info.value.problem
    assert str(cfg_dir / "ae1.psk") in info.value.problem


def test_check_modem_port(cfg_dir: Path) -> None:
    config = load_text(cfg_dir, MINIMAL)
    check_modem_port(config)  # /dev/null is a character device
    for port, problem in [(cfg_dir / "ttyUSB9", "no such device"), (cfg_dir / "ae1.psk", "not a character")]:
        config = load_text(cfg_dir, MINIMAL.replace("/dev/null", str(port)))
        with pytest.raises(ConfigError) as info:
            check_modem_port(config)
        assert info.value.key == "modem.port"
        assert problem in info.value.problem


def test_a_card_in_a_pcsc_reader(cfg_dir: Path) -> None:
    text = MINIMAL.replace('port = "/dev/null"', 'transport = "PCSC"\nreader = " uTrust 3700 "\ncommand_timeout = 3')
    config = load_text(cfg_dir, text)
    assert config.modem == ModemConfig(transport="pcsc", reader="uTrust 3700", command_timeout=3.0)
    assert config.modem.port is None and config.modem.uses_reader
    assert config.modem.where == "the PC/SC reader 'uTrust 3700'"
    check_modem_port(config)  # pyscard is installed here: no port to check
    assert not load_text(cfg_dir, MINIMAL).modem.uses_reader


def test_a_reader_without_pyscard_is_a_config_error_naming_the_fix(
    cfg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_text(cfg_dir, MINIMAL.replace('port = "/dev/null"', 'transport = "pcsc"\nreader = "x"'))
    monkeypatch.setitem(sys.modules, "smartcard", None)
    monkeypatch.setitem(sys.modules, "smartcard.scard", None)
    with pytest.raises(ConfigError) as info:
        check_modem_port(config)
    assert info.value.key == "modem.transport"
    assert "pip install 'mn-secd[pcsc]'" in info.value.problem and "python3-pyscard" in info.value.problem


def test_the_shipped_example_documents_every_key_and_loads(cfg_dir: Path) -> None:
    target = cfg_dir / "mn-secd.toml"
    shutil.copy(EXAMPLE, target)
    write_psk(cfg_dir / "ae-metering.psk")
    write_psk(cfg_dir / "ae-telemetry.psk")
    config = load_config(target)
    assert [ae.identity for ae in config.aes] == ["ae-metering", "ae-telemetry"]
    assert config.gba.timing() == BootstrapTiming()  # the example shows the defaults
    text = EXAMPLE.read_text()
    for section, keys in SECTION_KEYS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text, f"{section}.{key} is not documented in the example"


def test_sessions_are_kept_in_the_configured_directory_else_in_systemds_state_directory() -> None:
    assert GbaConfig(state_directory=Path("/srv/state")).state_path({"STATE_DIRECTORY": "/var/lib/x"}) == Path(
        "/srv/state"
    )
    assert GbaConfig().state_path({"STATE_DIRECTORY": "/var/lib/mn-secd:/var/lib/other"}) == Path("/var/lib/mn-secd")
    assert GbaConfig().state_path({}) is None  # outside systemd and unconfigured: nothing is kept
