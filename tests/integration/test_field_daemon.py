"""`mn-secd run` with the field's SIMs and modems: what STATUS= and the journal say, and what the
daemon does (and never does) on the wire, over the pty emulator and the reference BSF."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from harness import LocalAes

from mn_secd.errors import KeyServiceRejected
from mn_secd.sim.launcher import DaemonProcess, mn_secd_command
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.world import SimulatedWorld, lab_cards

StartDaemon = Callable[..., Awaitable[DaemonProcess]]
MakeWorld = Callable[..., Awaitable[SimulatedWorld]]
PIN = "97531864"


def modem(world: SimulatedWorld) -> ModemEmulator:
    assert world.modem is not None
    return world.modem


async def locked_world(make_world: MakeWorld, **options: object) -> SimulatedWorld:
    first, second = lab_cards()
    return await make_world(cards=[replace(first, pin=PIN), second], **options)


def everything_said(daemon: DaemonProcess) -> str:
    return "\n".join(daemon.stderr + daemon.notify.messages)


async def test_a_locked_sim_without_pin_file_is_degraded_with_the_state_and_the_remedy(
    make_world: MakeWorld, start_daemon: StartDaemon
) -> None:
    world = await locked_world(make_world)
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(), "--modem-wait", "0.5")
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        status = daemon.notify.messages[ready]
        assert "STATUS=degraded: " in status and "SIM locked (SIM PIN)" in status, status
        assert "no [modem] pin_file is set" in status and "PIN lock off" in status  # the state and the remedy
        with pytest.raises(KeyServiceRejected) as info:
            await aes.get_key("ae-one")
        assert info.value.code.startswith("5.03") and info.value.kind == "uicc-locked"
        assert modem(world).count("AT+CPIN=") == 0
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


async def test_the_pin_file_unlocks_the_sim_once_and_the_pin_is_never_shown(
    make_world: MakeWorld, start_daemon: StartDaemon
) -> None:
    world = await locked_world(make_world)
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(sim_pin=PIN))
    try:
        await daemon.wait_ready()
        answer = await aes.get_key("ae-one")
        assert world.bsf is not None and answer.btid == world.bsf.last_btid
        async with aes.client("ae-one") as client:
            status = await client.status()
        assert status.last_error is None or PIN not in status.last_error
        assert modem(world).count("AT+CPIN=") == 1
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    assert PIN not in everything_said(daemon)
    assert any("entering the SIM PIN from pin_file" in line for line in daemon.stderr)


async def test_a_wrong_pin_is_entered_once_and_reported_with_the_attempts_left(
    make_world: MakeWorld, start_daemon: StartDaemon
) -> None:
    world = await locked_world(make_world)
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config(sim_pin="11112222"), "--modem-wait", "0.5")
    try:
        first = await daemon.notify.wait_for(lambda m: "refused the PIN from pin_file" in m)
        assert "2 attempts left" in daemon.notify.messages[first]
        # The daemon keeps looking (1 s, 2 s, ... back-off) but never enters the PIN again.
        await daemon.notify.wait_for(lambda m: "refused the PIN from pin_file" in m, after=first, timeout=10)
        assert modem(world).count("AT+CPIN=") == 1
        assert world.profile(0).pin_attempts == 2
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    assert "11112222" not in everything_said(daemon)


async def test_sim_busy_at_power_up_is_named_and_waited_out(make_world: MakeWorld, start_daemon: StartDaemon) -> None:
    world = await make_world(quirks=Quirks(boot_no_sim=0.5, boot_sim_busy=2.5))
    aes = LocalAes(world)
    aes.add("ae-one")
    daemon = await start_daemon(aes.write_config())
    try:
        await daemon.wait_ready()
        statuses = daemon.notify.statuses()
        busy = [s for s in statuses if "SIM busy (+CME ERROR: 14)" in s]
        assert busy, statuses
        assert any(s.startswith("card found") for s in statuses[statuses.index(busy[0]) :])
        # Busy is asked about again within seconds, not after the 30 s cap of an absent modem.
        assert all("retrying in 30 s" not in s for s in busy)
        assert (await aes.get_key("ae-one")).btid
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


async def test_another_program_holding_the_port_is_named_in_status_and_journal(
    world: SimulatedWorld,
    local_aes: LocalAes,
    start_daemon: StartDaemon,
    holder: Callable[..., subprocess.Popen[bytes]],
) -> None:
    other = holder(str(world.modem_link))
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config())
    try:
        await daemon.wait_ready()
        index = await daemon.notify.wait_for(lambda m: f"pid {other.pid}" in m)
        status = daemon.notify.messages[index]
        assert "warning: " in status and "udev/90-mn-secd-modem.rules" in status
        await daemon.wait_log(f"pid {other.pid}")
        assert (await local_aes.get_key("ae-one")).btid  # the daemon goes on working
        later = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped"), after=-1)
        assert f"pid {other.pid}" in daemon.notify.messages[later]  # every STATUS= keeps saying it
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


async def test_answers_to_commands_never_sent_are_named_in_status(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config())
    try:
        await daemon.wait_ready()
        modem(world).set_quirks(foreign_answers=0.3)
        index = await daemon.notify.wait_for(lambda m: "never sent" in m)
        assert "cannot see" in daemon.notify.messages[index] and "ModemManager" in daemon.notify.messages[index]
        await daemon.wait_log("another program uses the port")
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_a_pin_file_without_a_pin_is_one_line_naming_the_key(world: SimulatedWorld, command: str) -> None:
    config = LocalAes(world).write_config(sim_pin="12a4x")
    proc = await asyncio.create_subprocess_exec(
        *mn_secd_command(), command, "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "modem.pin_file: must hold the SIM PIN: 4 to 8 digits" in lines[0], lines
    assert "12a4x" not in lines[0]
