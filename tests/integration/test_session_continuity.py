"""Session continuity across daemon restarts, and the start jitter, with ``mn-secd run`` as a subprocess.

The software UICC sits behind the AT modem emulator on a real pty (power-cycled between runs, the
card's Ks and EF_GBABP kept in its profile as a real card keeps them), the reference BSF serves Ub
and Zn over loopback HTTP, AEs ask over DTLS-PSK, and a GBA_ME session is sealed under a
session-sealing key handed over in ``$CREDENTIALS_DIRECTORY``, as systemd's
``LoadCredentialEncrypted=`` does (that part under the real systemd: tests/system/). AUTHENTICATE
commands are counted from the emulator's command log, BSF requests from its counters.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from harness import LocalAes, zn

from mn_secd.client.association import NafAssociation, register_ae
from mn_secd.errors import KeyServiceError, KeyServiceRejected
from mn_secd.naf_keys import GbaMode
from mn_secd.sim.bsf import ReferenceBsf
from mn_secd.sim.in_cse import ReferenceInCse
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.modem import ModemEmulator
from mn_secd.sim.usim import SoftUicc
from mn_secd.sim.world import DEFAULT_NAF_FQDN, SimulatedWorld
from mn_secd.ua import UaId

StartDaemon = Callable[..., Awaitable[DaemonProcess]]
MN_SECD = str(Path(sys.executable).parent / "mn-secd")
RECORD, SEALED = "gba-session.json", "gba-session.cred"
_APDU = re.compile(r'"([0-9A-Fa-f]+)"')


def bsf(world: SimulatedWorld) -> ReferenceBsf:
    assert world.bsf is not None
    return world.bsf


def modem(world: SimulatedWorld) -> ModemEmulator:
    assert world.modem is not None
    return world.modem


def bootstrap_authenticates(world: SimulatedWorld) -> int:
    """AUTHENTICATEs that run AKA (3G context, or GBA bootstrapping ``DD``), not NAF derivations (``DE``)."""
    count = 0
    for line in modem(world).log:
        found = _APDU.search(line) if line.upper().startswith(("AT+CSIM", "AT+CGLA")) else None
        apdu = bytes.fromhex(found.group(1)) if found else b""
        if len(apdu) > 5 and apdu[1] == 0x88 and (apdu[3] == 0x81 or (apdu[3] == 0x84 and apdu[5] == 0xDD)):
            count += 1
    return count


def power_cycle(world: SimulatedWorld) -> None:
    """Modem and card off and on again: a new emulator on the same port path, the card from its profile."""
    modem(world).stop()
    card = SoftUicc.from_file(world.card_paths[world.current_card])
    world.modem = ModemEmulator(card, world.quirks, link=str(world.modem_link))
    world.modem.start()
    bsf(world).reset_counters()


async def wait_for_file(path: Path, present: bool = True, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while path.exists() != present:
            await asyncio.sleep(0.05)


async def run_until_keyed(start_daemon: StartDaemon, config: Path, credentials: Path | None = None) -> DaemonProcess:
    daemon = await start_daemon(config, credentials=credentials)
    await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), timeout=20.0)
    return daemon


# --- GBA_U: the card keeps Ks -----------------------------------------------------------------------------


async def test_a_restart_resumes_the_gba_u_session_with_no_authenticate_and_no_bsf_request(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    local_aes.add("ae-one")
    config = local_aes.write_config(state_directory=state, min_forced_interval=0.0)
    daemon = await run_until_keyed(start_daemon, config)
    before = await local_aes.get_key("ae-one")
    assert before.gba_mode is GbaMode.GBA_U
    await wait_for_file(state / RECORD)
    assert await daemon.stop() == 0

    power_cycle(world)  # a power cut: modem, card and daemon all start again
    daemon = await start_daemon(config)
    await daemon.notify.wait_for(lambda m: "resumed from the last run" in m, timeout=20.0)
    after = await local_aes.get_key("ae-one")
    assert (after.btid, after.key, after.expires) == (before.btid, before.key, before.expires)
    assert bootstrap_authenticates(world) == 0 and bsf(world).requests == 0
    assert modem(world).apdu_count(0x88) == 1  # one NAF derivation (DE) on the card, nothing else
    # The card's Ks_ext_NAF after the restart is the key the NAF gets over Zn.
    answer = await zn(world.bsf_url, after.btid, DEFAULT_NAF_FQDN, UaId.dtls_psk(), gba_u_aware=True)
    assert answer["meKeyMaterial"] == after.key.hex()

    # A NAF that refuses the resumed B-TID (the BSF lost it) leads to one forced re-bootstrap.
    bsf(world).forget(after.btid)
    cse = ReferenceInCse(DEFAULT_NAF_FQDN, world.bsf_url)
    await cse.start("127.0.0.1", 0)
    try:
        async with local_aes.client("ae-one") as keys:
            host, port = cse.address
            async with NafAssociation(keys, DEFAULT_NAF_FQDN, host=host, port=port, timeout=2.0) as association:
                registration = await register_ae(association, "meter-7")
                assert association.btid is not None and association.btid != after.btid
        assert registration.created
        assert (association.refusals, association.forced_bootstraps) == (1, 1)
        assert bsf(world).successes == 1 and bootstrap_authenticates(world) == 1
    finally:
        await cse.stop()
    assert await daemon.stop() == 0
    log = "\n".join(daemon.stderr)
    assert before.key.hex() not in log and after.key.hex() not in log


async def test_a_card_swapped_while_the_daemon_was_down_is_detected_and_its_session_discarded(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    local_aes.add("ae-one")
    config = local_aes.write_config(state_directory=state)
    daemon = await run_until_keyed(start_daemon, config)
    before = await local_aes.get_key("ae-one")
    await wait_for_file(state / RECORD)
    assert await daemon.stop() == 0

    other = world.swap_card()  # the USIM-only lab card: another ICCID (and GBA_ME)
    bsf(world).reset_counters()
    modem(world).clear_log()
    daemon = await run_until_keyed(start_daemon, config)
    await daemon.wait_log("belongs to another card (ICCID)")
    after = await local_aes.get_key("ae-one")
    assert after.btid != before.btid and after.gba_mode is GbaMode.GBA_ME
    assert bsf(world).bootstraps[after.btid].impi == other.effective_impi
    assert bsf(world).successes == 1 and bootstrap_authenticates(world) == 1
    assert not any("resumed from the last run" in m for m in daemon.notify.messages)
    assert os.listdir(state) == []  # the old card's record is gone; a GBA_ME session is not kept
    assert await daemon.stop() == 0


async def test_a_bootstrap_killed_after_the_cards_authenticate_is_not_resumed(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The card's AUTHENTICATE replaced Ks and wrote its RAND into EF_GBABP; the daemon died before the
    BSF's 200 OK, so EF_GBABP still names the old B-TID. The next start must not resume it."""
    state = tmp_path / "state"
    local_aes.add("ae-one")
    config = local_aes.write_config(state_directory=state, min_forced_interval=0.0)
    daemon = await run_until_keyed(start_daemon, config)
    first = await local_aes.get_key("ae-one")
    await wait_for_file(state / RECORD)
    assert await daemon.stop() == 0

    bsf(world).success_delay = 60.0  # the BSF hangs after the card has answered the challenge
    daemon = await start_daemon(config)
    await daemon.notify.wait_for(lambda m: "resumed from the last run" in m, timeout=20.0)
    modem(world).clear_log()
    forced = asyncio.create_task(_forced_key(local_aes))
    async with asyncio.timeout(15):
        while bootstrap_authenticates(world) == 0:
            await asyncio.sleep(0.02)
    daemon.proc.kill()  # power cut / watchdog: between the AUTHENTICATE and the 200 OK
    await daemon.proc.wait()
    [unanswered] = await asyncio.gather(forced, return_exceptions=True)  # the AE's request timed out
    assert isinstance(unanswered, KeyServiceError), unanswered

    bsf(world).success_delay = 0.0
    power_cycle(world)
    daemon = await run_until_keyed(start_daemon, config)
    await daemon.wait_log("the card's RAND is not the stored session's")
    assert not any("resumed from the last run" in m for m in daemon.notify.messages)
    assert bsf(world).successes == 1 and bootstrap_authenticates(world) == 1  # exactly one fresh bootstrap
    key = await local_aes.get_key("ae-one")
    assert key.btid == bsf(world).last_btid != first.btid
    answer = await zn(world.bsf_url, key.btid, DEFAULT_NAF_FQDN, UaId.dtls_psk(), gba_u_aware=True)
    assert answer["meKeyMaterial"] == key.key.hex()
    assert await daemon.stop() == 0


async def _forced_key(local_aes: LocalAes) -> None:
    async with local_aes.client("ae-one", timeout=4.0) as client:
        await client.get_key(DEFAULT_NAF_FQDN, force=True)


# --- GBA_ME: Ks sealed under the session-sealing key -----------------------------------------------------


async def test_a_sealed_gba_me_session_is_resumed_then_forgotten_while_the_daemon_runs(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    local_aes.add("ae-one")
    config = local_aes.write_config(gba_mode="gba-me", state_directory=state, persist_session=True)
    credentials = world.write_session_key()
    sealing_key = (credentials / "mn-secd-session-key").read_bytes()
    daemon = await run_until_keyed(start_daemon, config, credentials=credentials)
    before = await local_aes.get_key("ae-one")
    assert before.gba_mode is GbaMode.GBA_ME
    await wait_for_file(state / SEALED)
    sealed = (state / SEALED).read_bytes()
    ks = bsf(world).bootstraps[before.btid].ks
    for secret in (ks, before.key, sealing_key):
        assert secret not in sealed and secret.hex().encode() not in sealed
    assert before.btid.encode() not in sealed and os.listdir(state) == [SEALED]
    assert await daemon.stop() == 0

    power_cycle(world)
    daemon = await start_daemon(config, credentials=credentials)
    await daemon.notify.wait_for(lambda m: "resumed from the last run" in m, timeout=20.0)
    after = await local_aes.get_key("ae-one")
    assert (after.btid, after.key, after.gba_mode) == (before.btid, before.key, GbaMode.GBA_ME)
    assert bootstrap_authenticates(world) == 0 and bsf(world).requests == 0

    forget = await asyncio.create_subprocess_exec(
        MN_SECD, "forget", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(forget.communicate(), 30)
    assert (forget.returncode, err) == (0, b""), err
    assert "removed a sealed GBA_ME session" in out.decode()
    assert os.listdir(state) == []
    assert (await local_aes.get_key("ae-one")).key == before.key  # the running daemon keeps its session
    assert await daemon.stop() == 0
    assert os.listdir(state) == []  # and a stop does not write it back

    daemon = await run_until_keyed(start_daemon, config, credentials=credentials)
    assert not any("resumed from the last run" in m for m in daemon.notify.messages)
    assert bsf(world).successes == 1 and bootstrap_authenticates(world) == 1
    assert await daemon.stop() == 0
    assert "\n".join(daemon.stderr).count(ks.hex()) == 0


def _no_credentials(world: SimulatedWorld) -> tuple[Path | None, str]:
    return None, "$CREDENTIALS_DIRECTORY is unset"


def _no_session_key(world: SimulatedWorld) -> tuple[Path | None, str]:
    credentials = world.write_session_key()
    (credentials / "mn-secd-session-key").unlink()  # the unit loads other credentials, not this one
    return credentials, "the unit has no credential mn-secd-session-key"


def _a_short_key(world: SimulatedWorld) -> tuple[Path | None, str]:
    credentials = world.write_session_key()
    key = credentials / "mn-secd-session-key"
    key.chmod(0o600)
    key.write_bytes(os.urandom(16))
    key.chmod(0o400)
    return credentials, "is not 32 octets"


@pytest.mark.parametrize(
    "breakage", [_no_credentials, _no_session_key, _a_short_key], ids=["no-credentials", "no-key", "short-key"]
)
async def test_without_a_sealing_key_persist_session_is_refused_once_and_ks_never_written(
    world: SimulatedWorld,
    local_aes: LocalAes,
    start_daemon: StartDaemon,
    tmp_path: Path,
    breakage: Callable[[SimulatedWorld], tuple[Path | None, str]],
) -> None:
    credentials, reason = breakage(world)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / SEALED).write_bytes(b"sealed by a run that had the key")
    local_aes.add("ae-one")
    config = local_aes.write_config(gba_mode="gba-me", state_directory=state, persist_session=True)
    daemon = await run_until_keyed(start_daemon, config, credentials=credentials)
    key = await local_aes.get_key("ae-one")  # the daemon serves keys as ever, only without persistence
    assert key.gba_mode is GbaMode.GBA_ME
    assert await daemon.stop() == 0
    refusals = [line for line in daemon.stderr if "persist_session refused" in line]
    assert len(refusals) == 1 and reason in refusals[0], daemon.stderr
    assert os.listdir(state) == []  # the old sealed session went unread, and nothing new was written

    daemon = await run_until_keyed(start_daemon, config, credentials=credentials)
    assert not any("resumed from the last run" in m for m in daemon.notify.messages)
    assert bsf(world).successes == 2
    assert await daemon.stop() == 0


# --- restart storms: the start jitter ---------------------------------------------------------------------


async def test_with_nothing_to_resume_the_first_bootstrap_waits_for_the_jitter_unless_an_ae_asks(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config(start_jitter=600.0))
    waiting = await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapping in "))
    assert "start jitter" in daemon.notify.messages[waiting]
    await daemon.wait_ready()
    await asyncio.sleep(1.5)
    assert bsf(world).requests == 0 and bootstrap_authenticates(world) == 0
    key = await local_aes.get_key("ae-one")  # an AE does not wait for the jitter
    assert key.btid == bsf(world).last_btid and bsf(world).successes == 1
    assert await daemon.stop() == 0


async def test_an_ae_that_asked_before_the_card_answered_gets_the_bootstrap_at_once(
    world: SimulatedWorld, local_aes: LocalAes, start_daemon: StartDaemon
) -> None:
    modem(world).remove_sim()
    local_aes.add("ae-one")
    daemon = await start_daemon(local_aes.write_config(start_jitter=600.0), "--modem-wait", "0.5")
    await daemon.wait_ready()
    with pytest.raises(KeyServiceRejected) as refused:
        await local_aes.get_key("ae-one")
    assert refused.value.code.startswith("5.03")
    modem(world).insert_sim(SoftUicc.from_file(world.card_paths[world.current_card]))
    # No further request: the daemon knows an AE is waiting, and skips the jitter.
    await daemon.notify.wait_for(lambda m: m.startswith("STATUS=bootstrapped until "), timeout=20.0)
    assert bsf(world).successes == 1
    assert not any(m.startswith("STATUS=bootstrapping in ") for m in daemon.notify.messages)
    assert await daemon.stop() == 0
