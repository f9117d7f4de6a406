"""After "keys wiped", no live object in the daemon holds a key it served (issue 14, item 2).

The daemon runs in this process (the :class:`~mn_secd.daemon.Daemon` that ``mn-secd run`` runs,
from a generated configuration, in front of the simulated world: software UICC behind the modem
emulator on a pty, reference BSF over HTTP) so that its memory can be scanned from inside: every
object the garbage collector tracks and what each refers to (tests/key_copies.py). The AE is
another process (tests/ae_key_holder.py) that asks for keys over DTLS in every form the key service
answers (GET and FETCH, CBOR and JSON) and holds an Observe on ``key``; it reports each key masked,
so this process holds none of them itself. The simulated world in this process holds Ks (card and
BSF) but never a NAF key: the card computes Ks_ext_NAF when asked and keeps no copy.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from harness import LocalAes
from key_copies import find_copies

from mn_secd.config import load_config
from mn_secd.daemon import Daemon
from mn_secd.naf_keys import KeyEvent, KeyEventKind
from mn_secd.notify import Notifier
from mn_secd.sim.world import DEFAULT_NAF_FQDN, SimulatedWorld

AE_SCRIPT = Path(__file__).resolve().parents[1] / "ae_key_holder.py"
NAFS = (DEFAULT_NAF_FQDN, "meter.iot.example", "cam.iot.example")
#: How long after a wipe no copy may remain.
GRACE = 2.0


class InProcessDaemon:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.events: list[KeyEvent] = []
        daemon.keys.subscribe(self.events.append)

    async def wait_bootstrapped(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not (self.daemon.ready and self.daemon.keys.status().bootstrapped):
                await asyncio.sleep(0.05)

    async def wait_event(self, kind: KeyEventKind, after: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(e.kind is kind for e in self.events[after:]):
                await asyncio.sleep(0.01)


@pytest.fixture
async def daemon(world: SimulatedWorld, local_aes: LocalAes) -> AsyncIterator[InProcessDaemon]:
    local_aes.add("ae-scan", naf=NAFS)
    config = load_config(local_aes.write_config(log_level="debug"))
    running = Daemon(config, Notifier(environ={}), modem_wait=30.0)
    task = asyncio.create_task(running.run())
    try:
        yield InProcessDaemon(running)
    finally:
        running.stop()
        await asyncio.wait_for(task, 20)


class Ae:
    """The AE process; ``keys`` are the masked keys it reported, ``lines`` everything it said."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    @property
    def keys(self) -> list[bytes]:
        return [bytes.fromhex(line["key"]) for line in self.lines if line["event"] == "key"]

    async def read_until(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    err = await self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(f"the AE ended: {err.decode(errors='replace')}")
                line = json.loads(raw)
                self.lines.append(line)
                if line["event"] == event:
                    return line


@pytest.fixture
async def ae(daemon: InProcessDaemon, local_aes: LocalAes) -> AsyncIterator[Ae]:
    await daemon.wait_bootstrapped()
    psk_file = local_aes.world.workdir / "etc" / "ae-scan.psk"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(AE_SCRIPT), str(local_aes.control_port), "ae-scan", str(psk_file), NAFS[0], *NAFS,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    holder = Ae(proc)
    try:
        yield holder
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("wipe", ["card-removed", "card-swapped", "daemon-stopped"])
async def test_no_live_object_holds_a_served_key_after_a_wipe(
    wipe: str, world: SimulatedWorld, daemon: InProcessDaemon, ae: Ae
) -> None:
    await ae.read_until("observing")
    served = sorted(set(ae.keys))
    assert len(served) == len(NAFS)  # three NAFs, each asked for four times: one key each
    before = find_copies(served)
    # While the keys are valid the daemon holds them (its cache, answers kept for duplicates, the
    # observation's first answer): the scan sees them.
    assert before.count >= len(NAFS), str(before)
    # ... and every such copy is in a buffer that a wipe zeroes in place: no bytes, no str.
    assert set(before.by_type) == {"bytearray"}, str(find_copies(served, explain=True))

    assert world.modem is not None
    seen = len(daemon.events)
    if wipe == "card-removed":
        world.modem.remove_sim()
    elif wipe == "card-swapped":
        world.swap_card()
    else:
        daemon.daemon.stop()  # what SIGTERM does
    await daemon.wait_event(KeyEventKind.WIPED, seen)
    if wipe != "daemon-stopped":
        await ae.read_until("ended")  # the observation ends with the card (5.03)
    if wipe == "card-swapped":  # the new card is bootstrapped: keys again, none of the old ones
        await daemon.wait_event(KeyEventKind.REFRESHED, seen)
    await asyncio.sleep(GRACE)

    after = find_copies(served, explain=True)
    assert after.count == 0, str(after)
