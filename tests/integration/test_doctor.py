"""``mn-secd doctor`` as an operator runs it: a subprocess against the modem emulator on a pty and
the reference BSF on loopback, with one failure switched on at a time.

Every run also proves what the doctor never does: no AUTHENTICATE (unless --with-aka), no PIN, no
write to the card -- read from the emulator's own log.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from harness import LocalAes, reader_holds_card

from mn_secd.sim.launcher import DaemonProcess, mn_secd_command
from mn_secd.sim.modem import ModemEmulator, Quirks
from mn_secd.sim.pcscd import PrivatePcscd, missing_tools
from mn_secd.sim.world import SimulatedWorld, free_udp_port, lab_cards

MakeWorld = Callable[..., Awaitable[SimulatedWorld]]
StartDaemon = Callable[..., Awaitable[DaemonProcess]]
REPO = Path(__file__).resolve().parents[2]
INS_AUTHENTICATE, INS_UPDATE_BINARY = 0x88, 0xD6
ORDER = ["config", "port", "access", "systemd", "holders", "modem", "sim", "transport", "card"]
ORDER += ["bsf-dns", "bsf", "clock", "control", "session"]


def modem(world: SimulatedWorld) -> ModemEmulator:
    assert world.modem is not None
    return world.modem


def for_the_service_user(world: SimulatedWorld) -> None:
    """What the udev rule does on a gateway: the port in group dialout, mode 0660."""
    tty = os.path.realpath(world.modem_link)
    os.chown(tty, 0, grp.getgrnam("dialout").gr_gid)
    os.chmod(tty, 0o660)


def doctor(*args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    """Run ``mn-secd doctor --json``; (exit status, checks by name, stderr). A name seen twice keeps the first."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "mn_secd", "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    report = json.loads(done.stdout)
    checks: dict[str, dict[str, str]] = {}
    for check in report["checks"]:
        checks.setdefault(check["check"], check)
    assert report["ok"] is (done.returncode == 0)
    assert [c["check"] for c in report["checks"] if c["check"] in ORDER] == sorted(
        [c["check"] for c in report["checks"] if c["check"] in ORDER], key=ORDER.index
    )
    return done.returncode, checks, done.stderr


async def run_doctor(*args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    return await asyncio.to_thread(doctor, *args)


def status(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def config_for(world: SimulatedWorld, **options: object) -> Path:
    aes = LocalAes(world)
    aes.add("ae-one")
    return aes.write_config(**options)


def untouched(world: SimulatedWorld) -> None:
    """No AUTHENTICATE, no update, no PIN: the doctor only looked."""
    assert modem(world).apdu_count(INS_AUTHENTICATE) == 0
    assert modem(world).apdu_count(INS_UPDATE_BINARY) == 0
    assert modem(world).count("AT+CPIN=") == 0


async def test_a_healthy_gateway_is_all_ok(world: SimulatedWorld, tmp_path: Path) -> None:
    for_the_service_user(world)
    code, checks, err = await run_doctor("--config", str(config_for(world, state_directory=tmp_path / "state")))
    assert code == 0, (checks, err)
    assert status(checks) == {
        "config": "ok",
        "port": "ok",
        "access": "ok",
        "systemd": "skip",  # no systemd as PID 1 in this test environment
        "holders": "ok",
        "modem": "ok",
        "sim": "ok",
        "transport": "ok",
        "card": "ok",
        "bsf-dns": "ok",
        "bsf": "ok",
        "clock": "ok",
        "control": "ok",
        "session": "ok",
    }
    assert "AT+CGLA: works" in checks["transport"]["detail"] and "would use cgla" in checks["transport"]["detail"]
    assert "001010*********@ims" in checks["card"]["detail"] and "GBA_U yes" in checks["card"]["detail"]
    assert "001010000000001" not in json.dumps(checks)  # the IMPI is masked
    assert "AKAv1-MD5" in checks["bsf"]["detail"]
    untouched(world)


async def test_a_bad_config_fails_and_the_port_is_still_checked(world: SimulatedWorld) -> None:
    config = config_for(world)
    config.write_text(config.read_text().replace("refresh_margin", "refresh_margn"))
    code, checks, _ = await run_doctor("--config", str(config), "--port", str(world.modem_link))
    assert code == 1
    assert checks["config"]["status"] == "fail" and "gba.refresh_margn" in checks["config"]["detail"]
    assert checks["modem"]["status"] == "ok"


async def test_a_missing_port_fails_and_the_modem_checks_are_skipped(tmp_path: Path) -> None:
    code, checks, _ = await run_doctor("--port", str(tmp_path / "ttyUSB7"), "--bsf", "http://127.0.0.1:9/")
    assert code == 1
    assert checks["port"]["status"] == "fail" and "by-id" in checks["port"]["fix"]
    assert {checks[n]["status"] for n in ("holders", "modem", "sim", "transport", "card")} == {"skip"}


async def test_a_port_the_service_user_cannot_open(world: SimulatedWorld) -> None:
    tty = os.path.realpath(world.modem_link)
    os.chmod(tty, 0o600)
    code, checks, _ = await run_doctor("--config", str(config_for(world)))
    assert code == 1
    assert checks["access"]["status"] == "fail" and 'GROUP="dialout"' in checks["access"]["fix"]


async def test_another_program_on_the_port_is_named_and_the_modem_left_alone(
    world: SimulatedWorld, holder: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    for_the_service_user(world)
    other = holder(str(world.modem_link))
    log_before = len(modem(world).log)
    code, checks, _ = await run_doctor("--config", str(config_for(world)))
    assert code == 1
    assert checks["holders"]["status"] == "fail" and f"pid {other.pid}" in checks["holders"]["detail"]
    assert "udev" in checks["holders"]["fix"]
    assert checks["modem"]["status"] == "skip"
    assert len(modem(world).log) == log_before  # not one command while another program is on the port


async def test_the_running_daemon_is_recognised_on_the_port_and_the_control_socket(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    local_aes.add("ae-one")
    config = local_aes.write_config()
    daemon = await start_daemon(config)
    try:
        await daemon.wait_ready()
        for_the_service_user(world)
        code, checks, _ = await run_doctor("--config", str(config))
        assert checks["holders"]["status"] == "warn", checks["holders"]
        assert "mn-secd runs on this port" in checks["holders"]["detail"]
        assert checks["modem"]["status"] == "skip"
        assert checks["control"]["status"] == "ok" and "mn-secd answers there" in checks["control"]["detail"]
        assert code == 0
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()


async def test_a_silent_modem(tmp_path: Path) -> None:
    master, slave = os.openpty()  # a tty nobody answers on: the wrong port of a modem, or a hung one
    try:
        path = os.ttyname(slave)
        code, checks, _ = await run_doctor("--port", path, "--bsf", "http://127.0.0.1:9/")
    finally:
        os.close(master)
        os.close(slave)
    assert code == 1
    assert checks["modem"]["status"] == "fail" and "AT port" in checks["modem"]["fix"]
    assert checks["sim"]["status"] == "skip"


@pytest.mark.parametrize(
    ("situation", "verdict", "text"),
    [
        ("pin", "fail", "SIM PIN"),
        ("absent", "fail", "SIM not inserted"),
        ("busy", "warn", "SIM busy"),
    ],
)
async def test_sim_states(make_world: MakeWorld, situation: str, verdict: str, text: str) -> None:
    first, second = lab_cards()
    if situation == "pin":
        world = await make_world(cards=[replace(first, pin="2580"), second])
    elif situation == "busy":
        world = await make_world(quirks=Quirks(boot_sim_busy=60.0))
    else:
        world = await make_world()
        modem(world).remove_sim()
    code, checks, _ = await run_doctor("--config", str(config_for(world)))
    assert code == 1 or verdict == "warn"
    assert checks["sim"]["status"] == verdict and text in checks["sim"]["detail"], checks["sim"]
    assert checks["transport"]["status"] == "skip"
    if situation == "pin":
        assert "3 PIN attempts left" in checks["sim"]["detail"] and "pin_file" in checks["sim"]["fix"]
    untouched(world)


async def test_a_locked_sim_with_a_pin_file_is_a_warning(make_world: MakeWorld) -> None:
    first, second = lab_cards()
    world = await make_world(cards=[replace(first, pin="2580"), second])
    _, checks, _ = await run_doctor("--config", str(config_for(world, sim_pin="2580")))
    assert checks["sim"]["status"] == "warn" and "will enter the PIN from pin_file once" in checks["sim"]["detail"]
    assert modem(world).count("AT+CPIN=") == 0  # the doctor itself never does


async def test_a_modem_that_cannot_run_gba_over_at(make_world: MakeWorld) -> None:
    world = await make_world(quirks=Quirks(csim_restricted=True, no_logical_channels=True))
    code, checks, _ = await run_doctor("--config", str(config_for(world)))
    assert code == 1
    detail = checks["transport"]["detail"]
    assert checks["transport"]["status"] == "fail" and "cannot run GBA over AT" in detail
    assert "+CME ERROR: 4" in detail and "GET RESPONSE refused (+CME ERROR: 3)" in detail
    assert checks["card"]["status"] == "skip"
    untouched(world)


async def test_a_bsf_name_that_does_not_resolve(world: SimulatedWorld) -> None:
    code, checks, _ = await run_doctor("--port", str(world.modem_link), "--bsf", "http://bsf.mn-secd.invalid/")
    assert code == 1
    assert checks["bsf-dns"]["status"] == "fail" and "does not resolve" in checks["bsf-dns"]["detail"]
    assert checks["bsf"]["status"] == "skip"


async def test_a_bsf_that_does_not_answer(world: SimulatedWorld) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        code, checks, _ = await run_doctor("--port", str(world.modem_link), "--bsf", f"http://127.0.0.1:{port}/")
    assert code == 1
    assert checks["bsf-dns"]["status"] == "ok"
    assert checks["bsf"]["status"] == "fail" and "ConnectError" in checks["bsf"]["detail"]


async def test_a_control_port_taken_by_another_program(world: SimulatedWorld) -> None:
    port = free_udp_port()
    aes = LocalAes(world, control_port=port)
    aes.add("ae-one")
    config = aes.write_config()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        code, checks, _ = await run_doctor("--config", str(config))
    assert code == 1
    assert checks["control"]["status"] == "fail" and "taken by something else" in checks["control"]["detail"]
    assert f"pid {os.getpid()}" in checks["control"]["detail"]


async def test_with_aka_runs_exactly_one_authenticate(world: SimulatedWorld) -> None:
    for_the_service_user(world)
    code, checks, err = await run_doctor("--config", str(config_for(world)), "--with-aka")
    assert code == 0, (checks, err)
    assert checks["aka"]["status"] == "ok" and "gba-me" in checks["aka"]["detail"]
    assert modem(world).apdu_count(INS_AUTHENTICATE) == 1
    assert modem(world).apdu_count(INS_UPDATE_BINARY) == 0  # GBA_ME: nothing written to the card
    assert world.bsf is not None and world.bsf.successes == 1


async def test_the_text_report_is_one_line_per_check(world: SimulatedWorld) -> None:
    for_the_service_user(world)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mn_secd", "doctor", "--port", str(world.modem_link), "--bsf", world.bsf_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines][:9] == ORDER[:9]
    assert all(line.split()[0] in ("ok", "warn", "fail", "skip") for line in lines)
    assert all(" -- fix: " in line for line in lines if line.startswith("fail"))


# --- the card in a PC/SC reader ------------------------------------------------------------------------


@pytest.mark.skipif(bool(missing_tools()), reason="PC/SC tools not installed: " + ", ".join(missing_tools()))
async def test_a_reader_instead_of_a_modem(world: SimulatedWorld, pcscd: PrivatePcscd) -> None:
    """``transport = "pcsc"``: the reader's lines take the modem's place; empty reader first, then a card."""
    if not pcscd.running:
        pcscd.start()
    await reader_holds_card("mn-secd vicc 00 00", False)
    aes = LocalAes(world)
    aes.add("ae-one")
    config = aes.write_config(reader="vicc 00 00", gba_mode="gba-me")
    code, checks, _ = await run_doctor("--config", str(config))
    assert code == 1 and "port" not in checks and "modem" not in checks, checks
    assert checks["reader"]["status"] == "fail" and "no card" in checks["reader"]["detail"]
    assert checks["card"]["status"] == "skip"

    vicc = await asyncio.create_subprocess_exec(
        *mn_secd_command(),
        *("sim", "vicc", "--card", str(world.card_paths[0]), "--vpcd", f"127.0.0.1:{pcscd.port}"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert vicc.stdout is not None
        assert (await asyncio.wait_for(vicc.stdout.readline(), 20)).startswith(b"vicc connected to vpcd")
        await reader_holds_card("mn-secd vicc 00 00", True)
        code, checks, err = await run_doctor("--config", str(config))
        assert code == 0, (checks, err)
        assert checks["reader"]["status"] == "ok" and "holds a card (ATR 3B" in checks["reader"]["detail"]
        assert checks["card"]["status"] == "ok" and "001010*********@ims" in checks["card"]["detail"]
        assert checks["bsf"]["status"] == "ok"
    finally:
        vicc.terminate()
        await vicc.wait()
