"""The daemon's UICC layer over a real pseudo-terminal: modem emulator in front of the software UICC.

Nothing of our own is mocked: bytes go through the pty, the emulator's AT parser and quirks, and the
software card's APDU handling; RES/CK/IK are checked against Milenage computed here.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import threading
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import PtyModem, open_test_card
from lab_card_profiles import ISIM_CARD, MNC3_CARD, OPC, RAND, K, challenge

from mn_secd.aka import AkaMacFailure, AkaSuccess, AkaSyncFailure, AuthContext
from mn_secd.card_identity import Application, CardEvent, CardEventKind
from mn_secd.errors import (
    AuthenticateOutcomeUnknown,
    AuthenticateRefused,
    GetResponseLoop,
    PortGoneError,
    TransportUnavailable,
    UiccAbsent,
)
from mn_secd.gba.kdf import ks_naf
from mn_secd.sim.milenage import Milenage, verify_auts
from mn_secd.sim.modem import Quirks
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import SoftUicc
from mn_secd.uicc.card import Card, open_card
from mn_secd.uicc.files import parse_fcp
from mn_secd.uicc.options import ModemConfig

INS_AUTHENTICATE, INS_SELECT = 0x88, 0xA4
FAST = {"command_timeout": 2.0, "presence_poll": 0.2, "reopen_max": 0.4}


def expected_keys(profile: CardProfile, rand: bytes = RAND) -> tuple[bytes, bytes, bytes]:
    res, ck, ik, _ = Milenage(profile.k, profile.opc).f2345(rand)
    return res, ck, ik


async def opened(cards: list[Card], path: str, **kwargs: Any) -> Card:
    return await open_test_card(cards, path, **{**FAST, **kwargs})


class Events:
    def __init__(self, card: Card) -> None:
        self.queue: asyncio.Queue[CardEvent] = asyncio.Queue()
        card.subscribe(self.queue.put_nowait)

    async def next(self, timeout: float = 10.0) -> CardEvent:
        return await asyncio.wait_for(self.queue.get(), timeout)


# --- identity and AKA through every quirk ---------------------------------------------------------------

QUIRK_SETS: dict[str, Quirks] = {
    "none": Quirks(),
    "echo": Quirks(echo=True),
    "urcs-between": Quirks(urcs_between=True),
    "urcs-inside": Quirks(urcs_inside=True),
    "split-writes": Quirks(split_writes=True, split_size=7, split_delay=0.001),
    "lowercase-hex-refused": Quirks(reject_lowercase_hex=True),
    "no-space-after-colon": Quirks(no_space_after_colon=True),
    "ccho-session-handle": Quirks(ccho_style="session_handle"),
    "ccho-bare-number": Quirks(ccho_style="bare"),
    "no-test-commands": Quirks(no_test_commands=True),
    "modem-fetches-61xx": Quirks(internal_get_response=True),
    "latency": Quirks(latency=0.02),
    # +CPIN: READY unsolicited (Quectel, SIMCom, u-blox once the SIM is read) inside every answer,
    # the answer to AT+CPIN? included, where it looks like a second answer line.
    "cpin-urc-inside": Quirks(urcs_inside=True, urc_lines=("+CPIN: READY",)),
    "all-together": Quirks(
        echo=True,
        urcs_between=True,
        urcs_inside=True,
        split_writes=True,
        split_size=7,
        split_delay=0.001,
        reject_lowercase_hex=True,
        no_space_after_colon=True,
        ccho_style="session_handle",
        no_test_commands=True,
        latency=0.01,
    ),
    "all-together-bare-ccho-modem-fetches": Quirks(
        echo=True,
        urcs_between=True,
        urcs_inside=True,
        reject_lowercase_hex=True,
        no_space_after_colon=True,
        ccho_style="bare",
        no_test_commands=True,
        internal_get_response=True,
    ),
}


@pytest.mark.parametrize("transport", ["csim", "cgla"])
@pytest.mark.parametrize("quirk", list(QUIRK_SETS))
async def test_identity_and_aka_with_each_quirk(
    make_modem: Callable[..., PtyModem], cards: list[Card], transport: str, quirk: str
) -> None:
    world = make_modem(quirks=QUIRK_SETS[quirk])
    card = await opened(cards, world.path, transport=transport)
    identity = await card.identity()
    assert (identity.iccid, identity.imsi, identity.mnc_length) == ("89882110000000000018", "001010000000001", 2)
    assert identity.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert identity.application is Application.ISIM and identity.gba_u
    assert [app for app, _ in identity.applications] == [Application.USIM, Application.ISIM]
    assert identity.transport == transport == card.transport_name

    selects = world.modem.apdu_count(INS_SELECT)
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess)
    assert (result.res, result.ck, result.ik) == expected_keys(ISIM_CARD)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1
    assert world.modem.apdu_count(INS_SELECT) == selects  # selected once at start-up, never again


async def test_auto_prefers_cgla_and_falls_back_to_csim_without_logical_channels(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    assert (await (await opened(cards, make_modem().path)).identity()).transport == "cgla"
    world = make_modem(quirks=Quirks(no_logical_channels=True))
    card = await opened(cards, world.path, transport="auto")
    assert card.transport_name == "csim"
    selects = world.modem.apdu_count(INS_SELECT)
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and result.res == expected_keys(ISIM_CARD)[0]
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1
    # On the shared basic channel the application is re-selected (no data) before each AUTHENTICATE.
    assert world.modem.apdu_count(INS_SELECT) == selects + 1


async def test_cgla_only_without_logical_channels_is_a_typed_error(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(no_logical_channels=True))
    with pytest.raises(TransportUnavailable):
        await opened(cards, world.path, transport="cgla")


@pytest.mark.parametrize("transport", ["csim", "cgla"])
async def test_three_digit_mnc_usim_only_card(
    make_modem: Callable[..., PtyModem], cards: list[Card], transport: str
) -> None:
    world = make_modem(MNC3_CARD)
    card = await opened(cards, world.path, transport=transport)
    identity = await card.identity()
    assert identity.mnc_length == 3 and identity.mnc == "150" and identity.mcc == "310"
    assert identity.impi == "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"
    assert identity.application is Application.USIM and not identity.gba_u
    result = await card.authenticate(RAND, challenge(MNC3_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and (result.res, result.ck, result.ik) == expected_keys(MNC3_CARD)
    assert result.kc is not None  # a USIM with GSM access appends Kc


async def test_usim_preference_on_a_card_with_isim(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    card = await opened(cards, make_modem().path, application="usim")
    identity = await card.identity()
    assert identity.application is Application.USIM
    assert identity.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"  # derived, TS 23.003
    assert identity.gba_u  # UST service 68


# --- AKA outcomes -------------------------------------------------------------------------------------


async def test_mac_failure_and_resync(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    card = await opened(cards, make_modem().path)
    bad = bytearray(challenge(ISIM_CARD, 3))
    bad[-1] ^= 0x01
    assert isinstance(await card.authenticate(RAND, bytes(bad), AuthContext.UMTS), AkaMacFailure)
    assert isinstance(await card.authenticate(RAND, challenge(ISIM_CARD, 3), AuthContext.UMTS), AkaSuccess)
    stale = await card.authenticate(RAND, challenge(ISIM_CARD, 2), AuthContext.UMTS)
    assert isinstance(stale, AkaSyncFailure)
    sqn_ms = verify_auts(Milenage(K, OPC), RAND, stale.auts)
    assert sqn_ms == (3 << 5).to_bytes(6, "big")


@pytest.mark.parametrize(("application", "transport"), [("isim", "cgla"), ("usim", "csim")])
async def test_gba_u_bootstrap_naf_derivation_and_gbabp(
    make_modem: Callable[..., PtyModem], cards: list[Card], application: str, transport: str
) -> None:
    world = make_modem()
    card = await opened(cards, world.path, application=application, transport=transport)
    identity = await card.identity()
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.GBA)
    assert isinstance(result, AkaSuccess) and result.ck is None
    assert result.res == expected_keys(ISIM_CARD)[0]
    btid, lifetime = "I1U8vpY3qJ0hiuZNrke/NQ==@bsf.mnc001.mcc001.pub.3gppnetwork.org", "2030-01-01T00:00:00Z"
    await card.write_gba_bootstrap_params(btid, lifetime)
    naf_id = b"in-cse.example.org" + bytes.fromhex("010001c0a8")
    ks_ext_naf = await card.gba_naf_derivation(naf_id, identity.impi)
    _, ck, ik = expected_keys(ISIM_CARD)
    assert ks_ext_naf == ks_naf(ck + ik, RAND, identity.impi, naf_id)
    await card.close()  # nothing else talks to the card now: read EF_GBABP back on the basic channel
    content = read_ef(world.card, identity.aid, "6FD5" if application == "isim" else "6FD6")
    assert content.startswith(b"\x10" + RAND + bytes([len(btid)]) + btid.encode() + bytes([len(lifetime)]))


def read_ef(card: SoftUicc, aid: bytes, fid: str) -> bytes:
    assert card.process_apdu(bytes.fromhex("00A4040C10") + aid)[-2:] == b"\x90\x00"
    answer = card.process_apdu(bytes.fromhex("00A4000402" + fid))
    assert answer[-2] == 0x61
    size = parse_fcp(card.process_apdu(bytes.fromhex("00C00000") + answer[-1:])[:-2]).file_size
    assert size is not None
    return card.process_apdu(bytes.fromhex("00B00000") + bytes([min(size, 256) & 0xFF]))[:-2]  # the first 256


# --- the modem's breakage --------------------------------------------------------------------------------


async def test_timeout_during_authenticate_is_never_resent(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(auth_latency=2.5, internal_get_response=True))
    card = await opened(cards, world.path, command_timeout=1.0)
    with pytest.raises(AuthenticateOutcomeUnknown):
        await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    await asyncio.sleep(2.0)  # the late answer arrives; nobody may have sent the command again
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1
    assert sum("00880081" in line.upper() for line in world.modem.log) == 1
    # The late answer is swallowed, not taken for the answer to what comes next.
    world.modem.set_quirks(auth_latency=0.0)
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 2), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and result.res == expected_keys(ISIM_CARD)[0]
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 2


async def test_port_vanishing_during_authenticate_gives_an_unknown_outcome(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(auth_latency=2.0), link=True)
    card = await opened(cards, world.path)
    task = asyncio.create_task(card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS))
    async with asyncio.timeout(5):
        while world.modem.apdu_count(INS_AUTHENTICATE) == 0:  # the card is running it now
            await asyncio.sleep(0.01)
    await asyncio.to_thread(world.modem.vanish)
    with pytest.raises(AuthenticateOutcomeUnknown):
        await asyncio.wait_for(task, 5)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1


async def test_authenticate_refused_by_the_modem(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(quirks=Quirks(refuse_authenticate=True))
    card = await opened(cards, world.path)
    with pytest.raises(AuthenticateRefused):
        await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)


class _CglaRefusesAuthenticate:
    """A small pty peer in front of the emulator: ``AT+CGLA`` carrying AUTHENTICATE is answered
    ``ERROR`` and never reaches the card (as a modem with a shorter AT+CGLA line than AT+CSIM would);
    everything else passes through both ways unchanged."""

    def __init__(self, modem_path: str) -> None:
        self._master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._keep = slave  # our side stays open: the host's close is not an end of file here
        self._modem = os.open(modem_path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._modem)
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        line = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master, self._modem], [], [], 0.05)
            if self._modem in ready:
                os.write(self._master, os.read(self._modem, 4096))
            if self._master in ready:
                line += os.read(self._master, 4096)
                while b"\r" in line:
                    command, _, line = line.partition(b"\r")
                    apdu = command.partition(b',"')[2]
                    if command.upper().startswith(b"AT+CGLA=") and apdu[2:4] == b"88":
                        self.refused += 1
                        os.write(self._master, b"\r\nERROR\r\n")
                    else:
                        os.write(self._modem, command + b"\r")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self._master, self._keep, self._modem):
            os.close(fd)


async def test_a_path_that_refuses_authenticate_is_left_for_another_one(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    """AT+CGLA refusing AUTHENTICATE (``ERROR``) while AT+CSIM carries it: the refused challenge is
    not sent again, on any path; the next one goes through AT+CSIM and succeeds."""
    world = make_modem()
    peer = _CglaRefusesAuthenticate(world.path)
    try:
        card = await opened(cards, peer.path)
        assert card.transport_name == "cgla"
        with pytest.raises(AuthenticateRefused):
            await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
        assert peer.refused == 1 and world.modem.apdu_count(INS_AUTHENTICATE) == 0
        assert card.transport_name == "csim"  # switched before the next challenge
        result = await card.authenticate(RAND, challenge(ISIM_CARD, 2), AuthContext.UMTS)
        assert isinstance(result, AkaSuccess) and result.res == expected_keys(ISIM_CARD)[0]
        assert peer.refused == 1 and world.modem.apdu_count(INS_AUTHENTICATE) == 1
    finally:
        await asyncio.gather(*(c.close() for c in cards))
        peer.close()


async def test_get_response_looping_forever_is_capped(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(quirks=Quirks(get_response_loop=True))
    with pytest.raises(GetResponseLoop):
        await asyncio.wait_for(opened(cards, world.path), 10)
    assert world.modem.apdu_count(0xC0) <= 10


async def test_garbage_on_the_line_is_survived(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem()
    card = await opened(cards, world.path)
    world.modem.post_urc("\x01\x02\xfe garbage")
    world.modem.post_urc("+CREG: 5")
    await asyncio.sleep(0.1)
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess)


# --- card and port events ------------------------------------------------------------------------------


async def test_sim_removed_inserted_and_changed(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem()
    card = await opened(cards, world.path)
    events = Events(card)
    first = await card.identity()

    world.modem.remove_sim()
    assert (await events.next()).kind is CardEventKind.REMOVED
    with pytest.raises(UiccAbsent):
        await card.identity()
    with pytest.raises(UiccAbsent):
        await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 0

    world.modem.insert_sim(world.card)
    event = await events.next()
    assert event.kind is CardEventKind.INSERTED and event.identity == first
    assert await card.identity() == first
    assert isinstance(await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS), AkaSuccess)

    world.modem.remove_sim()
    assert (await events.next()).kind is CardEventKind.REMOVED
    world.modem.insert_sim(SoftUicc(MNC3_CARD))
    event = await events.next()
    assert event.kind is CardEventKind.CHANGED and event.identity is not None
    assert event.identity.iccid == MNC3_CARD.iccid and (await card.identity()).imsi == MNC3_CARD.imsi
    assert events.queue.empty()


@pytest.mark.parametrize("urc", ["+CPIN: SIM REMOVED", "+CPIN: NOT INSERTED", "+SIMCARD: NOT AVAILABLE"])
async def test_a_removal_urc_alone_is_noticed(make_modem: Callable[..., PtyModem], cards: list[Card], urc: str) -> None:
    """A modem that says the SIM went in one URC only (no command fails until the card is used)."""
    world = make_modem()
    card = await opened(cards, world.path)
    events = Events(card)
    await card.identity()
    world.modem.remove_sim(urcs=[urc])
    assert (await events.next()).kind is CardEventKind.REMOVED
    with pytest.raises(UiccAbsent):
        await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 0
    world.modem.insert_sim(world.card)
    assert (await events.next()).kind is CardEventKind.INSERTED


async def test_no_sim_at_start_is_a_typed_error_and_nothing_stays_open(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem()
    world.modem.remove_sim()
    with pytest.raises(UiccAbsent):
        await opened(cards, world.path)
    world.modem.insert_sim(world.card)
    card = await opened(cards, world.path)  # the port was released: it opens again at once
    assert (await card.identity()).iccid == ISIM_CARD.iccid


async def test_port_vanishes_and_comes_back(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(link=True)
    card = await opened(cards, world.path)
    events = Events(card)
    first = await card.identity()

    await asyncio.to_thread(world.modem.vanish)
    assert (await events.next()).kind is CardEventKind.REMOVED
    with pytest.raises(PortGoneError):
        await card.identity()
    with pytest.raises(PortGoneError):
        await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    await asyncio.sleep(0.5)  # a few reopen attempts fail while the port is away

    await asyncio.to_thread(world.modem.restore)
    event = await events.next()
    assert event.kind is CardEventKind.INSERTED and event.identity == first
    result = await card.authenticate(RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and result.res == expected_keys(ISIM_CARD)[0]


async def test_missing_port_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(PortGoneError):
        await open_card(ModemConfig(str(tmp_path / "no-such-tty"), command_timeout=1.0))


# --- the diagnostics CLI, as a subprocess -----------------------------------------------------------------


def mn_secd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "mn_secd", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def fields(stdout: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in stdout.splitlines())}


@pytest.mark.parametrize("transport", ["auto", "csim"])
async def test_cli_info(make_modem: Callable[..., PtyModem], transport: str) -> None:
    world = make_modem(quirks=Quirks(echo=True, urcs_inside=True))
    proc = await asyncio.to_thread(mn_secd, "uicc", "info", "--port", world.path, "--transport", transport)
    assert proc.returncode == 0, proc.stderr
    out = fields(proc.stdout)
    assert out["ICCID"] == ISIM_CARD.iccid and out["IMSI"] == ISIM_CARD.imsi
    assert out["IMPI"] == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert out["transport"] == ("cgla" if transport == "auto" else "csim")
    assert out["GBA_U"] == "yes"
    assert out["applications"].startswith("usim A0000000871002") and "isim A0000000871004" in out["applications"]
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 0


async def test_cli_auth_success_sync_failure_and_mac_failure(make_modem: Callable[..., PtyModem]) -> None:
    world = make_modem()
    auth = ("uicc", "auth", "--port", world.path, "--rand", RAND.hex())
    proc = await asyncio.to_thread(mn_secd, *auth, "--autn", challenge(ISIM_CARD, 2).hex())
    assert proc.returncode == 0, proc.stderr
    res, ck, ik = expected_keys(ISIM_CARD)
    out = fields(proc.stdout)
    assert (out["RES"], out["CK"], out["IK"]) == (res.hex().upper(), ck.hex().upper(), ik.hex().upper())
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1

    proc = await asyncio.to_thread(mn_secd, *auth, "--autn", challenge(ISIM_CARD, 1).hex())
    assert proc.returncode == 0, proc.stderr
    auts = bytes.fromhex(fields(proc.stdout)["AUTS"])
    assert verify_auts(Milenage(K, OPC), RAND, auts) == (2 << 5).to_bytes(6, "big")

    bad = bytearray(challenge(ISIM_CARD, 3))
    bad[0] ^= 0xFF
    proc = await asyncio.to_thread(mn_secd, *auth, "--autn", bytes(bad).hex())
    assert proc.returncode == 3
    assert "MAC failure" in proc.stdout and "RES" not in proc.stdout
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 3  # one per run, never a retry


async def test_cli_errors_are_one_typed_line(make_modem: Callable[..., PtyModem], tmp_path: Path) -> None:
    world = make_modem()
    world.modem.remove_sim()
    proc = await asyncio.to_thread(mn_secd, "uicc", "info", "--port", world.path)
    assert proc.returncode == 1 and "uicc-absent" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = await asyncio.to_thread(mn_secd, "uicc", "info", "--port", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "port-gone" in proc.stderr
    proc = await asyncio.to_thread(mn_secd, "uicc", "auth", "--port", world.path, "--rand", "00", "--autn", "00")
    assert proc.returncode == 2 and "16 octets" in proc.stderr
