"""How the AT port starts on modems that are not yet, or not quite, talking: over a real pty.

A modem whose stored profile says ``ATV0`` answers in V.250 numeric codes until the port's
``ATV1``; a modem in its first seconds after power-up ignores the port, and the command-line tools
wait for it a bounded while (the AT sync), sending nothing but ``ATV1`` meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import PtyModem, open_test_card
from lab_card_profiles import ISIM_CARD

from mn_secd.errors import PortGoneError
from mn_secd.sim.modem import Quirks
from mn_secd.uicc import at
from mn_secd.uicc.card import Card
from mn_secd.uicc.serial import AtPort

INS_AUTHENTICATE = 0x88


def mn_secd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "mn_secd", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def fields(stdout: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in stdout.splitlines())}


def raw_answer(path: str, line: str, timeout: float = 3.0) -> bytes:
    """The bytes a modem sends back to one command line, read until it has been quiet a moment."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, line.encode() + b"\r")
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.3 if buf else max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            buf += os.read(fd, 4096)
    finally:
        os.close(fd)
    return buf


# --- a modem whose profile stores ATV0 --------------------------------------------------------------------


def test_the_emulated_v0_modem_answers_in_numeric_codes_until_atv1(make_modem: Callable[..., PtyModem]) -> None:
    world = make_modem(quirks=Quirks(numeric_results=True))
    assert raw_answer(world.path, "ATE0") == b"0\r"
    assert raw_answer(world.path, "AT+NOSUCH") == b"4\r"
    assert raw_answer(world.path, "AT+CPIN?") == b"+CPIN: READY\r\n0\r"  # no leading <CR><LF>
    assert raw_answer(world.path, "ATV1") == b"\r\nOK\r\n"
    assert raw_answer(world.path, "ATE0") == b"\r\nOK\r\n"
    assert raw_answer(world.path, "ATZ") == b"0\r"  # the stored profile again


async def test_the_card_comes_up_on_a_v0_modem_with_echo(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(numeric_results=True, echo=True))
    card = await open_test_card(cards, world.path, command_timeout=2.0)
    identity = await card.identity()
    assert identity.imsi == ISIM_CARD.imsi
    log = world.modem.log
    assert log[:3] == ["ATV1", "ATE0", "AT+CMEE=1"]
    assert not any("&W" in line.upper() for line in log)  # nothing is stored on the modem


async def test_uicc_info_works_on_a_v0_modem(make_modem: Callable[..., PtyModem]) -> None:
    world = make_modem(quirks=Quirks(numeric_results=True))
    proc = await asyncio.to_thread(mn_secd, "uicc", "info", "--port", world.path)
    assert proc.returncode == 0, proc.stderr
    out = fields(proc.stdout)
    assert out["IMSI"] == ISIM_CARD.imsi and out["transport"] == "cgla"


async def test_a_bare_0_after_init_is_not_an_ok(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    """The modem falls back to V0 behind our back (ATZ typed by another program): a bare ``0`` is then
    not taken for the OK of a command, which times out instead of being answered by a digit."""
    world = make_modem(quirks=Quirks(ccho_style="bare"))  # Fibocom: the channel as a bare number
    port = AtPort(world.path, command_timeout=1.0)
    await port.open()
    try:
        world.modem.set_quirks(numeric_results=True)  # as if the profile's V0 had just been loaded
        with pytest.raises(Exception, match="no final result code"):
            await port.command(at.plain("ATE0"))
        with pytest.raises(Exception, match="no final result code"):
            await port.command(at.ccho(bytes.fromhex("A0000000871004")))
    finally:
        await port.close()
        world.modem.set_quirks(numeric_results=False)
    assert world.modem.count("AT+CCHO") == 1


# --- a modem in its first seconds after power-up --------------------------------------------------------


async def test_uicc_info_waits_out_a_modem_that_is_still_booting(make_modem: Callable[..., PtyModem]) -> None:
    world = make_modem(quirks=Quirks(boot_silent=3.0))
    start = time.monotonic()
    proc = await asyncio.to_thread(mn_secd, "uicc", "info", "--port", world.path)
    assert proc.returncode == 0, proc.stderr
    assert fields(proc.stdout)["IMSI"] == ISIM_CARD.imsi
    assert time.monotonic() - start >= 2.5  # it did wait for the modem
    log = world.modem.log
    first_other = next(i for i, line in enumerate(log) if line != "ATV1")
    assert log[first_other] == "ATE0" and first_other >= 1  # the sync sent nothing but ATV1
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 0


async def test_the_at_sync_is_bounded_and_named(make_modem: Callable[..., PtyModem]) -> None:
    world = make_modem(quirks=Quirks(boot_silent=30.0))
    port = AtPort(world.path, command_timeout=5.0, sync_for=1.5)
    start = time.monotonic()
    with pytest.raises(PortGoneError, match=r"does not answer ATV1.*1\.5 s"):
        await port.open()
    assert time.monotonic() - start < 3.0
    assert not port.connected


async def test_without_the_sync_a_silent_modem_fails_after_one_command_timeout(
    make_modem: Callable[..., PtyModem],
) -> None:
    """The daemon's way (no sync: it reopens with back-off), unchanged."""
    world = make_modem(quirks=Quirks(boot_silent=30.0))
    port = AtPort(world.path, command_timeout=0.5)
    with pytest.raises(PortGoneError, match="does not answer ATV1"):
        await port.open()


def test_the_emulators_help_lists_the_start_up_quirks() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    shown = subprocess.run(
        [sys.executable, "-m", "mn_secd", "sim", "modem", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    text = " ".join(shown.split())
    for flag, words in [("--numeric-results", "profile stores ATV0"), ("--boot-silent", "still booting")]:
        assert flag in text and words in text.rpartition(flag)[2][:300], flag
