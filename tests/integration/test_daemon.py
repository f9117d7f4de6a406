"""`mn-secd run` as a real subprocess against the simulated world running in this test process.

The software UICC sits behind the AT modem emulator on a real pty, the reference BSF serves Ub on
loopback HTTP, the test listens on its own NOTIFY_SOCKET (AF_UNIX datagrams, as systemd does), and
AEs talk to the daemon over DTLS-PSK with :class:`mn_secd.client.KeyServiceClient`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from harness import LocalAes

from mn_secd.errors import KeyServiceRejected
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import SimulatedWorld

MN_SECD = str(Path(sys.executable).parent / "mn-secd")
StartDaemon = Callable[..., Awaitable[DaemonProcess]]


def bsf(world: SimulatedWorld) -> ReferenceBsf:
    assert world.bsf is not None
    return world.bsf


#: The daemon's process, wrapped to write its sys.modules at exit and, with "mdwe", to forbid W+X
#: memory first (what the unit's MemoryDenyWriteExecute= enforces, here through prctl(PR_SET_MDWE)).
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1  # Linux 6.3+
WRAPPER = f"""
import atexit, ctypes, sys
modules_file, mode = sys.argv.pop(1), sys.argv.pop(1)
prctl = ctypes.CDLL(None, use_errno=True).prctl
mdwe = mode == "mdwe" and prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0
atexit.register(lambda: open(modules_file, "w").write(f"mdwe={{mdwe}}\\n" + "\\n".join(sorted(sys.modules))))
from mn_secd.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_lifecycle_ready_status_watchdog_reload_and_stop(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    local_aes.add("ae-one")
    config = local_aes.write_config()
    daemon = await start_daemon(config)
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        messages = daemon.notify.messages
        before_ready = [m for m in messages[:ready] if m.startswith("STATUS=")]
        assert any("waiting for the modem" in m for m in before_ready), messages
        assert any("card found: 001010" in m for m in before_ready), messages
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready]), messages
        assert "001010000000001" not in "".join(messages)  # the IMPI is masked

        first = await local_aes.get_key("ae-one")
        assert first.btid == bsf(world).last_btid
        assert len(first.key) == 32
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "))
        watchdog = await daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", after=ready)
        assert bsf(world).successes == 1

        # SIGHUP: a second AE appears, the session (and every key) stays.
        psks = [local_aes.known["ae-one"].psk]
        local_aes.add("ae-one")
        local_aes.add("ae-two")
        config = local_aes.write_config()
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_log("AE registry reloaded")
        second = await local_aes.get_key("ae-two")
        assert second.btid == first.btid
        assert second.key == first.key  # same NAF_Id, same session: the cached key, not a new one
        assert bsf(world).successes == 1
        # ae-one's PSK changed with the rewrite: its new PSK works, the session is the same
        again = await local_aes.get_key("ae-one")
        assert (again.btid, again.key) == (first.btid, first.key)

        # A broken file on SIGHUP changes nothing: the running registry stays, and the log says why.
        config.write_text(config.read_text() + "\n[gba]\nrefresh_margin = -1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_log("reload refused")
        assert (await local_aes.get_key("ae-two")).btid == first.btid

        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0
    messages = daemon.notify.messages
    stopping = next(i for i, m in enumerate(messages) if m.startswith("STOPPING=1"))
    assert ready < watchdog < stopping
    assert not any(m.startswith("READY=1") for m in messages[stopping:])
    assert any("keys wiped" in line for line in daemon.stderr)
    log = "\n".join(daemon.stderr + messages)
    assert first.key.hex() not in log and first.key.hex().upper() not in log
    for psk in psks + [ae.psk for ae in local_aes.known.values()]:
        assert psk.hex() not in log


async def _run_wrapped(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path, mode: str
) -> tuple[str, list[str]]:
    """The daemon under :data:`WRAPPER` serves one key and stops cleanly; (mdwe line, its modules)."""
    modules_file = tmp_path / f"modules-{mode}.txt"
    local_aes.add("ae-one")
    argv = [sys.executable, "-c", WRAPPER, str(modules_file), mode]
    daemon = await start_daemon(local_aes.write_config(), argv=argv)
    try:
        await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        answer = await local_aes.get_key("ae-one")
        assert answer.btid == bsf(world).last_btid
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0, daemon.stderr
    mdwe, *modules = modules_file.read_text().split()
    return mdwe, modules


def _kernel_forbids_wx_memory() -> bool:
    """PR_GET_MDWE answers on kernels that can refuse writable-and-executable memory (Linux 6.3+)."""
    return int(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0


async def test_daemon_is_lean(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """No simulated world, no aiohttp in the daemon process; nothing it loaded once for no use at run
    time (importlib.metadata for one version, the decimal module cbor2 loads for a datetime, PC/SC on
    an AT port), nor what only another path needs: cryptography (about 6.5 MB of RSS) seals GBA_ME
    sessions, with persist_session on; difflib suggests a key for a mistyped one; the other commands
    (doctor, forget, setup-sealing, uicc, client, bootstrap) and the NAF and client libraries."""
    _, modules = await _run_wrapped(world, local_aes, start_daemon, tmp_path, "plain")
    assert "mn_secd.daemon" in modules and "mn_secd.uicc.card" in modules and "aiocoap" in modules
    assert "mn_secd.gba.sealing" in modules and "mn_secd.gba.session_store" in modules  # loaded, but not its cipher
    assert [m for m in modules if m == "mn_secd.sim" or m.startswith(("mn_secd.sim.", "aiohttp"))] == []
    unused = ("importlib.metadata", "decimal", "mn_secd.uicc.pcsc", "mn_secd.uicc.reader", "cryptography", "difflib")
    assert [m for m in modules if m in unused] == []
    other_paths = ("mn_secd.commands", "mn_secd.naf", "mn_secd.client", "mn_secd.systemd_generator")
    daemon_commands = ("mn_secd.commands", "mn_secd.commands.run", "mn_secd.commands.check_config")
    elsewhere = [m for m in modules if m.partition(".")[0] == "mn_secd" and ".".join(m.split(".")[:2]) in other_paths]
    assert [m for m in elsewhere if m not in daemon_commands] == []


@pytest.mark.skipif(not _kernel_forbids_wx_memory(), reason="this kernel has no PR_SET_MDWE (Linux < 6.3)")
async def test_daemon_runs_without_writable_executable_memory(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """What the unit's MemoryDenyWriteExecute= enforces: DTLS and AKA work with W^X memory refused."""
    mdwe, _ = await _run_wrapped(world, local_aes, start_daemon, tmp_path, "mdwe")
    assert mdwe == "mdwe=True"


async def test_modem_without_a_card_degrades_then_recovers(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    """No SIM at start: READY after --modem-wait with STATUS=degraded, 5.03 for AEs, keys once a SIM is in."""
    modem = world.modem
    assert modem is not None
    modem.remove_sim()
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config(), "--modem-wait", "0.5")
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        assert "STATUS=degraded: " in daemon.notify.messages[ready]
        with pytest.raises(KeyServiceRejected) as info:
            await local_aes.get_key("ae-one")
        assert info.value.code.startswith("5.03")
        assert info.value.kind == "uicc-absent"
        modem.insert_sim(SoftUicc.from_file(world.card_paths[world.current_card]))
        await daemon.notify.wait_for(lambda m: "STATUS=card found" in m, after=ready)
        answer = await local_aes.get_key("ae-one")
        assert answer.btid == bsf(world).last_btid
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0


async def test_card_swap_shows_in_status_and_bootstraps_the_new_card(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config())
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        first = await local_aes.get_key("ae-one")
        modem = world.modem
        assert modem is not None
        modem.remove_sim()
        removed = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=degraded: card removed"), after=ready)
        world.current_card = 1  # the other lab card goes in
        other = world.profile()
        modem.insert_sim(SoftUicc.from_file(world.card_paths[world.current_card]))
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=card found: "), after=removed)
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), after=removed)
        second = await local_aes.get_key("ae-one")
        assert second.btid != first.btid
        assert second.btid == bsf(world).last_btid
        assert bsf(world).bootstraps[second.btid].impi == other.effective_impi
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0


@pytest.mark.parametrize("require", [False, True])
async def test_a_bsf_without_rspauth_is_a_warning_in_status_and_journal_unless_required(
    require: bool, world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    """[gba] require_rspauth over the real daemon: default accepts with a warning, true refuses."""
    bsf(world).omit_authentication_info = True
    local_aes.add("ae-one")
    config = local_aes.write_config()
    if require:
        config.write_text(config.read_text().replace("http_timeout = ", "require_rspauth = true\nhttp_timeout = "))
    daemon = await start_daemon(config)
    try:
        await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        if require:
            with pytest.raises(KeyServiceRejected) as info:
                await local_aes.get_key("ae-one")
            assert (info.value.code, info.value.kind) == ("5.02 Bad Gateway", "bsf-answer-invalid")
            assert "without rspauth" in str(info.value)
        else:
            answer = await local_aes.get_key("ae-one")
            assert answer.btid == bsf(world).last_btid
            async with local_aes.client("ae-one") as ae:
                status = await ae.status()
            assert status.bootstrapped and status.warning is not None and "rspauth" in status.warning
            await daemon.wait_log("event=ub.no_rspauth")
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0


BAD_CONFIGS = {
    "unknown key": ("[control]\nport = 5684\nbacklog = 3\n", "control.backlog"),
    "wrong type": ('[gba]\nrefresh_margin = "soon"\n', "gba.refresh_margin"),
    "missing PSK file": (
        '[[ae]]\nidentity = "ae-x"\npsk_file = "missing.psk"\nnaf = ["a.example"]\n',
        "ae[0].psk_file",
    ),
    "PSK readable by others": (
        '[[ae]]\nidentity = "ae-x"\npsk_file = "open.psk"\nnaf = ["a.example"]\n',
        "ae[0].psk_file",
    ),
    "no such serial port": ("", "modem.port"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_bad_configs_exit_with_one_line_naming_the_key(tmp_path: Path, case: str, command: str) -> None:
    body, key = BAD_CONFIGS[case]
    (tmp_path / "open.psk").write_bytes(os.urandom(16))
    (tmp_path / "open.psk").chmod(0o644)
    port = str(tmp_path / "ttyUSB-absent") if case == "no such serial port" else "/dev/null"
    config = tmp_path / "mn-secd.toml"
    config.write_text(f'[modem]\nport = "{port}"\n\n{body}')
    proc = await asyncio.create_subprocess_exec(
        MN_SECD, command, "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode != 0
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"{config}: {key}: " in lines[0]


async def test_check_config_accepts_a_good_file(world: SimulatedWorld, local_aes: LocalAes) -> None:
    local_aes.add("ae-one")
    local_aes.add("ae-two")
    config = local_aes.write_config()
    proc = await asyncio.create_subprocess_exec(
        MN_SECD, "check-config", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert (proc.returncode, err) == (0, b"")
    assert out.decode().count("\n") == 1
    assert "OK" in out.decode() and "2 AEs" in out.decode() and str(world.modem_link) in out.decode()


async def test_a_failed_start_up_bootstrap_is_retried_by_the_daemon_itself(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    """The BSF is busy when the daemon starts (every attempt of the Ub client answered 503): the
    keystore retries after its back-off on its own, and the daemon is bootstrapped before any AE asks."""
    bsf(world).busy_responses = 4  # the first request and the Ub client's three quick retries
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config())
    try:
        failed = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=degraded: bootstrap failed"), timeout=20.0)
        assert "retrying by itself" in daemon.notify.messages[failed]
        assert bsf(world).successes == 0
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), after=failed, timeout=20.0)
        assert bsf(world).busy == 4 and bsf(world).successes == 1  # no AE has asked for anything yet
        key = await local_aes.get_key("ae-one")
        assert key.btid == bsf(world).last_btid and bsf(world).successes == 1
    finally:
        await daemon.stop()
