"""`mn-secd run` as a real subprocess against the simulated world running in this test process.

The software UICC sits behind the AT modem emulator on a real pty, the reference BSF serves Ub on
loopback HTTP, the test listens on its own NOTIFY_SOCKET (AF_UNIX datagrams, as systemd does), and
AEs talk to the daemon over DTLS-PSK with :class:`mn_secd.client.KeyServiceClient`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mn_secd.client.keys import KeyServiceClient
from mn_secd.errors import KeyServiceRejected
from mn_secd.naf_keys import NafKey
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.launcher import DaemonProcess as Daemon
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import free_udp_port, lab_cards

MN_SECD = str(Path(sys.executable).parent / "mn-secd")
NAF = "in-cse.example.net"
#: The daemon's process, wrapped to forbid W+X memory first (what the unit's MemoryDenyWriteExecute=
#: enforces, here through prctl(PR_SET_MDWE)) and to write its sys.modules at exit.
WRAPPER = """
import atexit, ctypes, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux 6.3+
mdwe = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0
modules_file = sys.argv.pop(1)
atexit.register(lambda: open(modules_file, "w").write(f"mdwe={mdwe}\\n" + "\\n".join(sorted(sys.modules))))
from mn_secd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def lab_profile(iccid: str = "89882110000000000018", imsi: str = "001010000000001") -> CardProfile:
    """The world's first lab card (TS 35.208 test set 1 keys), under another ICCID/IMSI if asked."""
    return dataclasses.replace(lab_cards()[0], iccid=iccid, imsi=imsi, impi=None, impu=(), domain=None)


@dataclass
class World:
    profile: CardProfile
    modem: ModemEmulator
    port: str
    bsf: ReferenceBsf
    bsf_url: str
    dir: Path
    control_port: int = field(default_factory=free_udp_port)
    psks: dict[str, bytes] = field(default_factory=dict)

    def add_ae(self, identity: str, naf: str = NAF) -> str:
        psk = os.urandom(16)
        path = self.dir / f"{identity}.psk"
        path.write_bytes(psk)
        path.chmod(0o600)
        self.psks[identity] = psk
        return f'[[ae]]\nidentity = "{identity}"\npsk_file = "{identity}.psk"\nnaf = ["{naf}"]\n'

    def write_config(self, aes: str, *, port: str | None = None) -> Path:
        path = self.dir / "mn-secd.toml"
        path.write_text(
            f'[modem]\nport = "{port or self.port}"\ncommand_timeout = 3.0\n\n'
            f'[gba]\nbsf_url = "{self.bsf_url}"\n\n'
            f'[control]\naddresses = ["127.0.0.1"]\nport = {self.control_port}\n\n'
            f'[log]\nlevel = "debug"\n\n{aes}'
        )
        return path

    async def get_key(self, identity: str) -> NafKey:
        async with KeyServiceClient(identity, self.psks[identity], "127.0.0.1", self.control_port) as client:
            return await client.get_key(NAF)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    profile = lab_profile()
    modem = ModemEmulator(SoftUicc(profile))
    port = modem.start()
    bsf = ReferenceBsf([profile])
    url = await bsf.start("127.0.0.1", 0)
    try:
        yield World(profile, modem, port, bsf, url, tmp_path)
    finally:
        await bsf.stop()
        modem.stop()


async def test_lifecycle_ready_status_watchdog_reload_and_stop(world: World) -> None:
    config = world.write_config(world.add_ae("ae-one"))
    daemon = await Daemon.start(config)
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        messages = daemon.notify.messages
        before_ready = [m for m in messages[:ready] if m.startswith("STATUS=")]
        assert any("waiting for the modem" in m for m in before_ready), messages
        assert any("card found: 001010" in m for m in before_ready), messages
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready]), messages
        assert "001010000000001" not in "".join(messages)  # the IMPI is masked

        first = await world.get_key("ae-one")
        assert first.btid == world.bsf.last_btid
        assert len(first.key) == 32
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "))
        watchdog = await daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", after=ready)
        assert world.bsf.successes == 1

        # SIGHUP: a second AE appears, the session (and every key) stays.
        config = world.write_config(world.add_ae("ae-one") + world.add_ae("ae-two"))
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_log("AE registry reloaded")
        second = await world.get_key("ae-two")
        assert second.btid == first.btid
        assert second.key == first.key  # same NAF_Id, same session: the cached key, not a new one
        assert world.bsf.successes == 1
        # ae-one's PSK changed with the rewrite: its new PSK works, the session is the same
        again = await world.get_key("ae-one")
        assert (again.btid, again.key) == (first.btid, first.key)

        # A broken file on SIGHUP changes nothing: the running registry stays, and the log says why.
        config.write_text(config.read_text() + "\n[gba]\nrefresh_margin = -1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_log("reload refused")
        assert (await world.get_key("ae-two")).btid == first.btid

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
    for psk in world.psks.values():
        assert psk.hex() not in log


async def test_daemon_is_lean_and_runs_without_writable_executable_memory(world: World, tmp_path: Path) -> None:
    """No simulated world, no aiohttp in the daemon process; DTLS and AKA work under MDWE."""
    modules_file = tmp_path / "modules.txt"
    config = world.write_config(world.add_ae("ae-one"))
    daemon = await Daemon.start(config, argv=[sys.executable, "-c", WRAPPER, str(modules_file)])
    try:
        await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        answer = await world.get_key("ae-one")
        assert answer.btid == world.bsf.last_btid
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0, daemon.stderr
    mdwe, *modules = modules_file.read_text().split()
    assert "mn_secd.daemon" in modules and "mn_secd.uicc.card" in modules and "aiocoap" in modules
    assert [m for m in modules if m == "mn_secd.sim" or m.startswith(("mn_secd.sim.", "aiohttp"))] == []
    if mdwe != "mdwe=True":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3): ran without the W^X check")


async def test_modem_without_a_card_degrades_then_recovers(world: World) -> None:
    """No SIM at start: READY after --modem-wait with STATUS=degraded, 5.03 for AEs, keys once a SIM is in."""
    world.modem.remove_sim()
    config = world.write_config(world.add_ae("ae-one"))
    daemon = await Daemon.start(config, "--modem-wait", "0.5")
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        assert "STATUS=degraded: " in daemon.notify.messages[ready]
        with pytest.raises(KeyServiceRejected) as info:
            await world.get_key("ae-one")
        assert info.value.code.startswith("5.03")
        assert info.value.kind == "uicc-absent"
        world.modem.insert_sim(SoftUicc(world.profile))
        await daemon.notify.wait_for(lambda m: "STATUS=card found" in m, after=ready)
        answer = await world.get_key("ae-one")
        assert answer.btid == world.bsf.last_btid
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0


async def test_card_swap_shows_in_status_and_bootstraps_the_new_card(world: World) -> None:
    other = lab_profile(iccid="89882110000000000026", imsi="001010000000002")
    bsf = ReferenceBsf([world.profile, other])
    world.bsf_url = await bsf.start("127.0.0.1", 0)
    config = world.write_config(world.add_ae("ae-one"))
    daemon = await Daemon.start(config)
    try:
        ready = await daemon.notify.wait_for(lambda m: m.startswith("READY=1"))
        first = await world.get_key("ae-one")
        world.modem.remove_sim()
        removed = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=degraded: card removed"), after=ready)
        world.modem.insert_sim(SoftUicc(other))
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=card found: "), after=removed)
        await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), after=removed)
        second = await world.get_key("ae-one")
        assert second.btid != first.btid
        assert second.btid == bsf.last_btid
        assert bsf.bootstraps[second.btid].impi == other.effective_impi
        code = await daemon.stop()
    finally:
        await daemon.kill()
        await bsf.stop()
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


async def test_check_config_accepts_a_good_file(world: World) -> None:
    config = world.write_config(world.add_ae("ae-one") + world.add_ae("ae-two"))
    proc = await asyncio.create_subprocess_exec(
        MN_SECD, "check-config", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert (proc.returncode, err) == (0, b"")
    assert out.decode().count("\n") == 1
    assert "OK" in out.decode() and "2 AEs" in out.decode() and world.port in out.decode()
