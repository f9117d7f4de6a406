"""The doctor's session line from real facts: a state directory on disk and a session-sealing key made
by ``mn-secd setup-sealing`` with the real ``systemd-creds`` (a host secret of the test's own).

No systemd runs here, so the unit's side (StateDirectory=, the generator's drop-in) is left out; under
the real systemd 252 the line is checked in tests/system/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mn_secd.cli import main
from mn_secd.commands.doctor import Doctor, Settings, check_session
from mn_secd.commands.doctor_rules import Verdict
from mn_secd.config import load_config
from mn_secd.gba.session_store import RECORD_FILE


async def session_line(tmp_path: Path, gba: str, credstore: Path) -> tuple[Verdict, str, str]:
    path = tmp_path / "mn-secd.toml"
    path.write_text(f'[modem]\nport = "/dev/null"\n[gba]\n{gba}\n')
    config = load_config(path)
    doc = Doctor(Settings(str(path), None, None, False, config=config, gba=config.gba, credstore=credstore))
    await check_session(doc)
    (check,) = doc.checks
    assert check.name == "session"
    return check.verdict, check.detail, check.fix


async def test_a_state_directory_and_what_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    state = tmp_path / "state"
    store = tmp_path / "credstore.encrypted"
    verdict, detail, _ = await session_line(tmp_path, f'state_directory = "{state}"', store)
    assert verdict is Verdict.OK and "holds nothing yet (the daemon makes it, mode 0700)" in detail
    state.mkdir(mode=0o700)
    (state / RECORD_FILE).write_text("{}")
    verdict, detail, _ = await session_line(tmp_path, f'state_directory = "{state}"', store)
    assert verdict is Verdict.OK and f"{state} ([gba] state_directory) holds a GBA_U session record" in detail
    state.chmod(0o777)
    verdict, detail, _ = await session_line(tmp_path, f'state_directory = "{state}"', store)
    assert verdict is Verdict.FAIL and "writable by group or others (mode 0777)" in detail
    verdict, detail, _ = await session_line(tmp_path, "", store)  # neither systemd nor a configured directory
    assert verdict is Verdict.WARN and "nothing is kept" in detail


@pytest.mark.skipif(shutil.which("systemd-creds") is None, reason="systemd-creds is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the doctor opens the key only as root")
async def test_persist_session_and_the_session_sealing_key(tmp_path: Path, host_secret: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = tmp_path / "credstore.encrypted"
    gba = f'state_directory = "{state}"\npersist_session = true'
    verdict, detail, fix = await session_line(tmp_path, gba, store)
    assert verdict is Verdict.WARN and "no session-sealing key" in detail and "mn-secd setup-sealing" in fix

    assert main(["setup-sealing", "--credstore", str(store), "--with-key", "host", "--config", "/nonexistent"]) == 0
    verdict, detail, fix = await session_line(tmp_path, gba, store)
    assert verdict is Verdict.OK and "GBA_ME sessions are sealed under the session-sealing key" in detail, detail

    key = store / "mn-secd-session-key"
    key.write_bytes(key.read_bytes()[:-4])  # damaged: systemd could not hand it over
    verdict, detail, fix = await session_line(tmp_path, gba, store)
    assert verdict is Verdict.FAIL and "does not open (systemd-creds decrypt failed" in detail and "--force" in fix
