"""The integration tests' one harness: the modem on a pty, the simulated world, a private pcscd, and
the daemon as systemd runs it.

Everything here is real: the emulator serves a pseudo-terminal, the reference BSF listens on
loopback HTTP, the daemon is a subprocess with its own notify socket. Each fixture stops what it
started, whatever the test did, so a failing test leaves no port, pty or process behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import LocalAes, PtyModem

from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.pcscd import PrivatePcscd
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import SimulatedWorld, lab_cards
from mn_secd.uicc.card import Card

# --- a modem emulator with a software card, on a pty ---------------------------------------------------


@pytest.fixture
def make_modem(tmp_path: Path) -> Iterator[Callable[..., PtyModem]]:
    """``make_modem(profile, quirks, link=False)``: a started emulator; ``link`` keeps a stable path
    (a symlink) across the port vanishing and coming back."""
    started: list[ModemEmulator] = []

    def make(profile: CardProfile | None = None, quirks: Quirks | None = None, *, link: bool = False) -> PtyModem:
        card = SoftUicc(profile or lab_cards()[0])
        modem = ModemEmulator(card, quirks, link=str(tmp_path / f"ttyMODEM{len(started)}") if link else None)
        started.append(modem)
        return PtyModem(modem, card, modem.start())

    yield make
    for modem in started:
        modem.stop()


@pytest.fixture
async def cards() -> AsyncIterator[list[Card]]:
    """Cards opened by a test (with :func:`harness.open_test_card`), closed afterwards whatever happened."""
    opened: list[Card] = []
    yield opened
    for card in opened:
        await card.close()


# --- the simulated world --------------------------------------------------------------------------------


@pytest.fixture
async def make_world(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SimulatedWorld]]]:
    """``await make_world(**options)``: a started :class:`SimulatedWorld` of its own directory."""
    worlds: list[SimulatedWorld] = []

    async def make(**options: Any) -> SimulatedWorld:
        world = SimulatedWorld(tmp_path / f"world{len(worlds)}", **options)
        worlds.append(world)
        await world.start()
        return world

    yield make
    for world in worlds:
        await world.stop()


@pytest.fixture
async def world(make_world: Callable[..., Awaitable[SimulatedWorld]]) -> SimulatedWorld:
    """The lab cards, the modem with the first card in it, and the reference BSF."""
    return await make_world()


# --- a private pcscd with the vpcd reader --------------------------------------------------------------


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePcscd]:
    """The test process's one private pcscd (its vpcd reader holds virtual cards: mn_secd.sim.vicc).

    One per process: libpcsclite reads PCSCLITE_CSOCK_NAME once, so the socket path never changes.
    Tests that make the reader vanish stop this pcscd and start it again on the same socket.
    Subprocesses (the daemon, the CLI) find it through the same variable in their environment.
    """
    daemon = PrivatePcscd(tmp_path_factory.mktemp("pcscd"))
    saved = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ.update(daemon.env)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()
        if saved is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = saved


# --- the daemon as systemd runs it -------------------------------------------------------------------------


@pytest.fixture
def local_aes(world: SimulatedWorld) -> LocalAes:
    return LocalAes(world)


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Awaitable[DaemonProcess]]]:
    """``await start_daemon(config, *args, **options)``: ``mn-secd run`` with its own notify socket
    and watchdog (:class:`mn_secd.sim.launcher.DaemonProcess`); killed after the test if still running."""
    started: list[DaemonProcess] = []

    async def start(config: Path, *args: str, **options: Any) -> DaemonProcess:
        daemon = await DaemonProcess.start(config, *args, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.kill()


# --- another program on the modem's port ---------------------------------------------------------------------


@pytest.fixture
def holder() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """``holder(path)``: another process that holds ``path`` open (as ModemManager or a terminal
    program would) until the test ends; it has the port open when ``holder`` returns."""
    started: list[subprocess.Popen[bytes]] = []

    def hold(path: str) -> subprocess.Popen[bytes]:
        code = (
            "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY); "
            "print(flush=True); time.sleep(60)"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # the port is open now
        started.append(proc)
        return proc

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()
