"""mn-secd-generator: the drop-in that ties the unit's device access to the configured modem port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mn_secd import systemd_generator as gen

ESCAPE = shutil.which("systemd-escape")


@pytest.mark.parametrize(
    "path",
    [
        "/dev/mn-secd-modem",
        "/dev/serial/by-id/usb-Quectel_EG25-G_0123-if02-port0",
        "/dev/serial/by-path/pci-0000:00:14.0-usb-0:3:1.2-port0",
        "/dev/ttyUSB2",
        "//dev//ttyACM0/",
        "/dev/.hidden",
        "/dev/modem ü",
    ],
)
@pytest.mark.skipif(ESCAPE is None, reason="systemd-escape is not installed")
def test_escape_path_matches_systemd_escape(path: str) -> None:
    assert ESCAPE is not None
    expected = subprocess.run([ESCAPE, "--path", path], capture_output=True, text=True, check=True).stdout.strip()
    assert gen.escape_path(path) == expected


def config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mn-secd.toml"
    path.write_text(body)
    return path


def test_a_udev_port_gets_bindsto_after_and_a_path_deviceallow(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[modem]\nport = "/dev/mn-secd-modem"\n')
    out = tmp_path / "gen"
    assert gen.generate(out, config=cfg, enabled_link=tmp_path / "absent") == "/dev/mn-secd-modem"
    text = (out / "mn-secd.service.d" / "50-modem-port.conf").read_text()
    assert "BindsTo=dev-mn\\x2dsecd\\x2dmodem.device\n" in text
    assert "After=dev-mn\\x2dsecd\\x2dmodem.device\n" in text
    assert "DeviceAllow=/dev/mn-secd-modem rw\n" in text
    assert "char-" not in text
    assert not (out / "dev-mn\\x2dsecd\\x2dmodem.device.wants").exists()  # not enabled: nothing starts it


def test_an_enabled_service_is_wanted_by_its_port(tmp_path: Path) -> None:
    """A modem that comes back (USB reset) brings the daemon BindsTo= stopped back."""
    cfg = config(tmp_path, '[modem]\nport = "/dev/serial/by-id/usb-X-if02-port0"\n')
    enabled = tmp_path / "multi-user.target.wants" / "mn-secd.service"
    enabled.parent.mkdir()
    enabled.symlink_to("/lib/systemd/system/mn-secd.service")
    out = tmp_path / "gen"
    gen.generate(out, config=cfg, enabled_link=enabled)
    link = out / "dev-serial-by\\x2did-usb\\x2dX\\x2dif02\\x2dport0.device.wants" / "mn-secd.service"
    assert link.is_symlink() and str(link.readlink()) == "/lib/systemd/system/mn-secd.service"
    gen.generate(out, config=cfg, enabled_link=enabled)  # a second daemon-reload finds the link there


def test_a_pty_port_gets_only_deviceallow(tmp_path: Path) -> None:
    """udev announces no device unit for a pty (a lab modem emulator): BindsTo= would never be met."""
    cfg = config(tmp_path, '[modem]\nport = "/dev/pts/3"\n')
    out = tmp_path / "gen"
    gen.generate(out, config=cfg, enabled_link=tmp_path / "absent")
    text = (out / "mn-secd.service.d" / "50-modem-port.conf").read_text()
    assert "DeviceAllow=/dev/pts/3 rw\n" in text
    assert "BindsTo=" not in text and "After=" not in text


@pytest.mark.parametrize(
    "body",
    [
        "",  # no [modem]
        "[modem]\nbaud = 9600\n",  # no port
        '[modem]\nport = "ttyUSB2"\n',  # not a path under /dev
        '[modem]\nport = "/etc/passwd"\n',
        '[modem]\nport = "/dev/x\\nDeviceAllow=/dev/sda rw"\n',  # no line injection into the drop-in
        "[modem\nport = ",  # not TOML
        "modem = 3\n",
    ],
)
def test_no_usable_port_writes_no_dropin(tmp_path: Path, body: str) -> None:
    cfg = config(tmp_path, body)
    out = tmp_path / "gen"
    assert gen.generate(out, config=cfg, enabled_link=tmp_path / "absent") is None
    assert not out.exists()


def test_a_missing_config_writes_nothing_and_main_never_fails(tmp_path: Path) -> None:
    assert gen.generate(tmp_path / "gen", config=tmp_path / "absent.toml") is None
    assert gen.main([str(tmp_path / "gen"), str(tmp_path / "early"), str(tmp_path / "late")]) == 0
    assert gen.main([]) == 2


def credstore(tmp_path: Path, *, key: bool = True) -> Path:
    store = tmp_path / "credstore.encrypted"
    store.mkdir(mode=0o700)
    if key:
        (store / "mn-secd-session-key").write_bytes(b"as systemd-creds encrypt wrote it")
    return store


def test_persist_session_with_the_key_made_hands_it_to_the_daemon(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[modem]\nport = "/dev/pts/3"\n[gba]\npersist_session = true\n')
    out = tmp_path / "gen"
    gen.generate(out, config=cfg, enabled_link=tmp_path / "absent", credstore=credstore(tmp_path))
    text = (out / "mn-secd.service.d" / "50-session-key.conf").read_text()
    # the form without a path: systemd searches its credential store, and skips a file gone since
    assert "[Service]\nLoadCredentialEncrypted=mn-secd-session-key\n" in text
    assert (out / "mn-secd.service.d" / "50-modem-port.conf").exists()


def test_a_reader_configuration_gets_the_session_key_and_no_port(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[modem]\ntransport = "pcsc"\nreader = "vpcd"\n[gba]\npersist_session = true\n')
    out = tmp_path / "gen"
    assert gen.generate(out, config=cfg, enabled_link=tmp_path / "absent", credstore=credstore(tmp_path)) is None
    assert sorted(p.name for p in (out / "mn-secd.service.d").iterdir()) == ["50-session-key.conf"]


@pytest.mark.parametrize(
    ("gba", "key"),
    [
        ("persist_session = true\n", False),  # setup-sealing not run: no line, or the unit would ask for nothing
        ("persist_session = false\n", True),  # a key made, persistence off: the daemon does not get it
        ('persist_session = "true"\n', True),  # not a boolean: `mn-secd run` refuses the file itself
        ("", True),
    ],
)
def test_no_session_key_unless_persist_session_is_on_and_the_key_exists(tmp_path: Path, gba: str, key: bool) -> None:
    cfg = config(tmp_path, f'[modem]\nport = "/dev/pts/3"\n[gba]\n{gba}')
    out = tmp_path / "gen"
    gen.generate(out, config=cfg, enabled_link=tmp_path / "absent", credstore=credstore(tmp_path, key=key))
    assert not (out / "mn-secd.service.d" / "50-session-key.conf").exists()


def test_the_generator_names_the_key_as_the_daemon_and_setup_sealing_do() -> None:
    from mn_secd.gba import sealing

    assert (gen.SESSION_KEY_CREDENTIAL, gen.CREDSTORE) == (sealing.SESSION_KEY_CREDENTIAL, sealing.CREDSTORE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_dropin_is_valid_systemd_syntax(tmp_path: Path) -> None:
    """The shipped unit plus the generated drop-ins pass `systemd-analyze verify`."""
    cfg = config(
        tmp_path, '[modem]\nport = "/dev/serial/by-id/usb-Quectel_EG25-if02-port0"\n[gba]\npersist_session = true\n'
    )
    units = tmp_path / "units"
    gen.generate(units, config=cfg, enabled_link=tmp_path / "absent", credstore=credstore(tmp_path))
    assert (units / "mn-secd.service.d" / "50-session-key.conf").exists()
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "mn-secd.service").read_text()
    (units / "mn-secd.service").write_text(unit.replace("/opt/mn-secd/bin/mn-secd", "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(units / "mn-secd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Invalid" not in result.stderr, result.stderr
