"""`mn-secd run` start-up when the card waits for a person: READY=1 at once, not after ``modem_wait``.

The daemon runs as a subprocess with its own NOTIFY_SOCKET (systemd's view), over the modem
emulator on a pty and the reference BSF; ``--modem-wait 60`` stands in for the two minutes a
gateway would otherwise hold ``systemctl start``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from harness import LocalAes

from mn_secd.errors import KeyServiceRejected
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.world import SimulatedWorld, lab_cards

StartDaemon = Callable[..., Awaitable[DaemonProcess]]
MakeWorld = Callable[..., Awaitable[SimulatedWorld]]
PIN = "97531864"
MODEM_WAIT = "60"
#: READY=1 must come far under MODEM_WAIT: the daemon's start-up plus one look at the card.
PROMPT = 8.0


def modem(world: SimulatedWorld) -> ModemEmulator:
    assert world.modem is not None
    return world.modem


async def ready_status(daemon: DaemonProcess) -> tuple[str, float]:
    """The datagram carrying READY=1 (with its STATUS=) and the seconds it took from now."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await daemon.wait_ready(timeout=PROMPT)
    index = await daemon.notify.wait_for(lambda m: "READY=1" in m.split("\n"))
    return daemon.notify.messages[index], loop.time() - started


async def key_refused(aes: LocalAes) -> KeyServiceRejected:
    with pytest.raises(KeyServiceRejected) as info:
        await aes.get_key("ae-one")
    return info.value


@pytest.mark.parametrize(
    ("sim_pin", "pin_attempts", "expected", "entries"),
    [
        (None, 3, ["SIM locked (SIM PIN)", "no [modem] pin_file is set", "PIN lock off"], 0),
        ("11112222", 3, ["SIM locked (SIM PIN)", "refused the PIN from pin_file", "2 attempts left"], 1),
        (PIN, 0, ["SIM locked (SIM PUK)", "never enters a PUK"], 0),
    ],
    ids=["no-pin-file", "wrong-pin", "puk-blocked"],
)
async def test_a_card_waiting_for_a_person_is_ready_at_once_and_degraded(
    make_world: MakeWorld,
    start_daemon: StartDaemon,
    sim_pin: str | None,
    pin_attempts: int,
    expected: list[str],
    entries: int,
) -> None:
    first, second = lab_cards()
    world = await make_world(cards=[replace(first, pin=PIN, pin_attempts=pin_attempts), second])
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(sim_pin=sim_pin), "--modem-wait", MODEM_WAIT)
    try:
        message, took = await ready_status(daemon)
        assert took < PROMPT, took
        status = next(line for line in message.split("\n") if line.startswith("STATUS="))
        assert status.startswith("STATUS=degraded: the card waits for an operator: uicc-"), status
        for text in expected:
            assert text in status, (text, status)
        refused = await key_refused(aes)
        assert refused.code.startswith("5.03") and refused.kind.startswith("uicc-"), refused
        assert refused.kind in ("uicc-locked", "uicc-pin-rejected")
        # The daemon keeps looking at the card (1 s, 2 s, ... back-off), under the same rules.
        seen = len(daemon.notify.messages) - 1
        await daemon.notify.wait_for(lambda m: "the card waits for an operator" in m, after=seen, timeout=10)
        assert modem(world).count("AT+CPIN=") == entries  # at most once, and never a PUK
        assert world.profile(0).pin_attempts == max(0, pin_attempts - entries)
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    assert PIN not in "\n".join(daemon.stderr + daemon.notify.messages)


async def test_a_sim_swapped_after_a_degraded_ready_is_taken(make_world: MakeWorld, start_daemon: StartDaemon) -> None:
    """READY=1 came degraded (a locked SIM, no PIN); the operator puts an unlocked SIM in: the daemon,
    still looking, finds it and serves keys, without ever having entered a PIN."""
    first, second = lab_cards()
    world = await make_world(cards=[replace(first, pin=PIN), second])
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(), "--modem-wait", MODEM_WAIT)
    try:
        message, _ = await ready_status(daemon)
        assert "the card waits for an operator" in message
        world.swap_card()
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=card found"), timeout=40)
        assert world.bsf is not None and (await aes.get_key("ae-one")).btid == world.bsf.last_btid
        assert modem(world).count("AT+CPIN=") == 0
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


async def test_a_busy_sim_is_still_waited_for_before_ready(make_world: MakeWorld, start_daemon: StartDaemon) -> None:
    """A transient state keeps today's wait: READY=1 comes with the card, not degraded before it."""
    world = await make_world(quirks=Quirks(boot_no_sim=0.5, boot_sim_busy=2.5))
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(), "--modem-wait", MODEM_WAIT)
    try:
        message, _ = await ready_status(daemon)
        statuses = daemon.notify.statuses()
        assert any("SIM busy" in s for s in statuses), statuses
        assert "STATUS=card found" in message or "STATUS=bootstrap" in message, message
        assert "waits for an operator" not in "\n".join(statuses)
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
