"""The demo of the whole chain: it succeeds, tells every step, and leaks no secret anywhere."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from mn_secd.commands.demo import Demo

STEPS = ("[1] start the simulated world", "[2] start the daemon", "[5] AE registers at the IN-CSE", "[7] swap the SIM")


def forms(secret: bytes) -> list[str]:
    """The ways a key could show up in text: hex either case, base64 (padded or not)."""
    b64 = base64.b64encode(secret).decode()
    return [secret.hex(), secret.hex().upper(), b64, b64.rstrip("=")]


async def test_demo_runs_the_chain_and_leaks_no_key(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    demo = Demo(tmp_path)
    assert await demo.run() == 0
    out, err = capfd.readouterr()
    for step in STEPS:
        assert step in out
    assert "SIGTERM -> keys wiped, STOPPING=1 sent, exit code 0" in out
    assert "gba-u" in out and "gba-me" in out  # the swap went from a GBA_U card to a USIM-only one

    secrets_in_play = demo.secrets()
    assert len(demo.answers) == 3 and len(secrets_in_play) >= 4
    texts = {"stdout": out, "stderr": err}
    for path in tmp_path.rglob("*"):
        # The lab card profiles (K/OPc) and the AE's PSK file hold secrets by design.
        if path.is_file() and path.suffix not in (".toml", ".psk"):
            texts[str(path)] = path.read_text(errors="replace")
    assert any("mn-secd.log" in name for name in texts), "the daemon's log was not written"
    for secret in secrets_in_play:
        for form in forms(secret):
            for name, text in texts.items():
                assert form not in text, f"key material in {name}"


def test_demo_command_reveals_keys_only_when_asked(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mn_secd", "demo", "--workdir", str(tmp_path / "w"), "--reveal-keys"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "(--reveal-keys)" in run.stdout
    assert "done in" in run.stdout
