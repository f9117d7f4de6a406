"""``mn-secd forget``: what it removes and what it says (the daemon-side half is in
tests/integration/test_session_continuity.py, with the daemon running)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mn_secd.cli import main
from mn_secd.gba.session_store import RECORD_FILE, SEALED_FILE, StateDirectory


def test_forget_removes_the_kept_session_and_says_what_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = StateDirectory.open(tmp_path / "state")
    state.replace(RECORD_FILE, b"{}")
    (state.path / "unrelated").write_text("kept")
    assert main(["forget", "--state-directory", str(state.path)]) == 0
    assert "removed a GBA_U session record" in capsys.readouterr().out
    assert sorted(p.name for p in state.path.iterdir()) == ["unrelated"]

    state.replace(SEALED_FILE, b"sealed")
    assert main(["forget", "--state-directory", str(state.path)]) == 0
    assert "removed a sealed GBA_ME session" in capsys.readouterr().out

    assert main(["forget", "--state-directory", str(state.path)]) == 0
    assert "no session is kept" in capsys.readouterr().out
    assert main(["forget", "--state-directory", str(tmp_path / "never-made")]) == 0
    assert "no such directory" in capsys.readouterr().out
    assert not (tmp_path / "never-made").exists()  # forget makes nothing


def test_forget_finds_the_directory_in_the_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = StateDirectory.open(tmp_path / "state")
    state.replace(RECORD_FILE, b"{}")
    config = tmp_path / "mn-secd.toml"
    # As root beside the unit, the AEs' PSK files are the unit's credentials: not there, and not needed.
    ae = '[[ae]]\nidentity = "ae-one"\npsk_file = "ae-one.psk"\nnaf = ["in-cse.example.net"]\n'
    config.write_text(f'[modem]\nport = "/dev/null"\n[gba]\nstate_directory = "{state.path}"\n{ae}')
    assert main(["forget", "--config", str(config)]) == 0
    assert str(state.path) in capsys.readouterr().out and not (state.path / RECORD_FILE).exists()
    config.write_text('[modem]\nport = "/dev/null"\n[gba]\nstate_directory = "state"\n')
    assert main(["forget", "--config", str(config)]) == 1  # but [gba] itself is checked
    assert "gba.state_directory: expected an absolute path" in capsys.readouterr().err
