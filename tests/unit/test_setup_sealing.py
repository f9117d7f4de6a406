"""``mn-secd setup-sealing`` with the real ``systemd-creds``, sealing with a host secret of the test's own
(the ``host_secret`` fixture), into a credstore directory of the test's own.

That systemd hands the key to the unit (``LoadCredentialEncrypted=``) is proved under the real
systemd 252 in tests/system/; here: the file, its protection, that it opens under its name to a
key of 32 octets, keep or replace, and the refusals.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from mn_secd.cli import main
from mn_secd.gba.sealing import SESSION_KEY_CREDENTIAL

pytestmark = pytest.mark.skipif(shutil.which("systemd-creds") is None, reason="systemd-creds is not installed")


def decrypt(path: Path, name: str = SESSION_KEY_CREDENTIAL) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["systemd-creds", "decrypt", f"--name={name}", str(path), "-"], capture_output=True)


def setup(store: Path, *args: str, config: Path | None = None) -> int:
    return main(["setup-sealing", "--credstore", str(store), "--with-key", "host", *args, "--config", str(config)])


def test_a_new_key_is_sealed_by_systemd_creds_under_its_name_and_kept_private(
    tmp_path: Path, host_secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credstore.encrypted"
    assert setup(store, config=tmp_path / "none.toml") == 0
    path = store / SESSION_KEY_CREDENTIAL
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(store) == [SESSION_KEY_CREDENTIAL]  # no temporary file left
    opened = decrypt(path)
    assert opened.returncode == 0 and len(opened.stdout) == 32
    assert opened.stdout not in path.read_bytes()  # sealed, not in the clear
    refused = decrypt(path, "another-name")  # systemd refuses it under any other credential name
    assert refused.returncode != 0 and b"does not match" in refused.stderr
    out = capsys.readouterr().out
    assert f"{path}: a new 256-bit session-sealing key" in out
    assert "systemctl daemon-reload && systemctl restart mn-secd" in out
    assert opened.stdout.hex() not in out


def test_an_existing_key_is_kept_unless_forced_and_the_hint_follows_the_configuration(
    tmp_path: Path, host_secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credstore.encrypted"
    config = tmp_path / "mn-secd.toml"
    ae = '[[ae]]\nidentity = "ae-one"\npsk_file = "ae-one.psk"\nnaf = ["x.example.net"]\n'  # a unit's credential
    config.write_text(f'[modem]\nport = "/dev/null"\n[gba]\npersist_session = false\n{ae}')
    assert setup(store, config=config) == 0
    first = decrypt(store / SESSION_KEY_CREDENTIAL).stdout
    capsys.readouterr()
    assert setup(store, config=config) == 0
    assert decrypt(store / SESSION_KEY_CREDENTIAL).stdout == first
    out = capsys.readouterr().out
    assert "systemd-creds opens it; kept" in out
    assert f"set [gba] persist_session = true in {config}" in out
    assert setup(store, "--force", config=config) == 0
    assert decrypt(store / SESSION_KEY_CREDENTIAL).stdout not in (first, b"")


def test_a_key_systemd_creds_cannot_open_is_reported_and_replaced_only_when_forced(
    tmp_path: Path, host_secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credstore.encrypted"
    assert setup(store, config=tmp_path / "none.toml") == 0
    path = store / SESSION_KEY_CREDENTIAL
    path.write_bytes(path.read_bytes()[:-8])  # damaged
    capsys.readouterr()
    assert setup(store, config=tmp_path / "none.toml") == 1
    err = capsys.readouterr().err
    assert err.startswith("mn-secd setup-sealing: sealing-unavailable: systemd-creds decrypt failed: ")
    assert err.count("\n") == 1
    assert setup(store, "--force", config=tmp_path / "none.toml") == 0
    assert len(decrypt(path).stdout) == 32


def test_without_a_usable_host_key_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(tmp_path / "a-file" / "credential.secret"))
    store = tmp_path / "credstore.encrypted"
    assert setup(store, config=tmp_path / "none.toml") == 1
    err = capsys.readouterr().err
    assert "systemd-creds encrypt failed: Failed to determine local credential host secret" in err
    assert not (store / SESSION_KEY_CREDENTIAL).exists()


def test_without_systemd_creds_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup(tmp_path / "store", config=tmp_path / "none.toml") == 1
    assert "systemd-creds is not installed" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
