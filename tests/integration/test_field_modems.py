"""The modems and SIMs of the field, over a real pseudo-terminal: each reported quirk switched on in
the modem emulator, one at a time, and the daemon's card layer surviving it or saying what it is.

What the emulator did is read from its own log (command lines and APDU counts), so "never resent"
and "entered once" are facts of the wire, not of our own bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from harness import PtyModem, open_test_card

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.errors import (
    AuthenticateOutcomeUnknown,
    CardStatusError,
    PinRejected,
    TransportUnavailable,
    UiccAbsent,
    UiccBusy,
    UiccLocked,
)
from mn_secd.secret import SecretBytes
from mn_secd.sim.milenage import Milenage, generate_autn
from mn_secd.sim.modem import Quirks
from mn_secd.sim.profile import CardProfile, load_profile, save_profile
from mn_secd.sim.world import lab_cards
from mn_secd.uicc.card import Card, PortSharing
from mn_secd.uicc.pin import PinKeeper

INS_AUTHENTICATE, INS_READ_BINARY, INS_READ_RECORD, INS_MANAGE_CHANNEL = 0x88, 0xB0, 0xB2, 0x70
PIN = "4711"
FAST = {"command_timeout": 2.0, "presence_poll": 0.2, "reopen_max": 0.4}
RAND = bytes.fromhex("23553cbe9637a89d218ae64dae47bf35")


def locked_card(**changes: object) -> CardProfile:
    return replace(lab_cards()[0], pin=PIN, **changes)  # type: ignore[arg-type]


def challenge(profile: CardProfile, seq: int) -> bytes:
    return generate_autn(Milenage(profile.k, profile.opc), RAND, (seq << 5).to_bytes(6, "big"), profile.amf)


def keeper(pin: str | None = PIN) -> PinKeeper:
    return PinKeeper(SecretBytes(pin.encode()) if pin is not None else None)


async def opened(cards: list[Card], world: PtyModem, pin: PinKeeper | None = None, **options: object) -> Card:
    return await open_test_card(cards, world.path, pin=pin, **{**FAST, **options})


def pin_entries(world: PtyModem) -> int:
    return world.modem.count("AT+CPIN=")


async def fails(cards: list[Card], world: PtyModem, pin: PinKeeper | None = None, **options: object) -> Exception:
    with pytest.raises(Exception) as raised:
        await opened(cards, world, pin, **options)
    return raised.value


# --- a PIN-locked SIM ------------------------------------------------------------------------------------


async def test_a_locked_sim_answers_6982_until_its_pin_is_verified(make_modem: Callable[..., PtyModem]) -> None:
    """The emulated card itself: EF_ICCID readable, the USIM's files and AUTHENTICATE not."""
    world = make_modem(locked_card())
    card = world.card
    assert card.process_apdu(bytes.fromhex("00A4080C022FE2"))[-2:] == b"\x90\x00"
    assert card.process_apdu(bytes.fromhex("00B000000A"))[-2:] == b"\x90\x00"  # EF_ICCID: always
    assert card.process_apdu(bytes.fromhex("00A4040C07A0000000871002"))[-2:] == b"\x90\x00"
    assert card.process_apdu(bytes.fromhex("00A4000C026F07"))[-2:] == b"\x90\x00"
    assert card.process_apdu(bytes.fromhex("00B0000009"))[-2:] == b"\x69\x82"  # EF_IMSI: PIN first
    auth = bytes.fromhex("0088008122") + b"\x10" + RAND + b"\x10" + challenge(world.card.profile, 1)
    assert card.process_apdu(auth)[-2:] == b"\x69\x82"
    assert card.process_apdu(bytes.fromhex("0020000100")) == b"\x63\xc3"  # 3 attempts, none spent
    assert card.process_apdu(bytes.fromhex("0020000108") + b"0000\xff\xff\xff\xff") == b"\x63\xc2"
    assert card.process_apdu(bytes.fromhex("0020000108") + PIN.encode() + b"\xff" * 4) == b"\x90\x00"
    assert card.profile.pin_attempts == 3  # a right PIN resets the counter
    assert card.process_apdu(bytes.fromhex("00B0000009"))[-2:] == b"\x90\x00"
    card.reset()  # a power cycle: the PIN is asked for again
    assert card.process_apdu(bytes.fromhex("0020000100")) == b"\x63\xc3"


async def test_without_a_pin_file_the_sim_stays_locked_and_the_remedy_is_named(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(locked_card())
    error = await fails(cards, world, keeper(None))
    assert isinstance(error, UiccLocked) and error.state == "SIM PIN" and error.retries == 3
    assert "pin_file" in str(error) and "PIN lock off" in str(error)
    assert pin_entries(world) == 0 and world.modem.apdu_count(INS_AUTHENTICATE) == 0


async def test_the_pin_from_the_file_is_entered_once_and_the_card_comes_up(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(locked_card())
    card = await opened(cards, world, keeper())
    assert (await card.identity()).imsi == "001010000000001"
    assert pin_entries(world) == 1
    result = await card.authenticate(RAND, challenge(world.card.profile, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess)


@pytest.mark.parametrize("style", ["cpinr", "qpinc", "cpinc", "none"])
async def test_each_way_a_modem_tells_the_attempts_left(
    make_modem: Callable[..., PtyModem], cards: list[Card], style: str
) -> None:
    """AT+CPINR, Quectel's AT+QPINC, Wavecom's AT+CPINC, or only the card's VERIFY status."""
    world = make_modem(locked_card(), quirks=Quirks(pin_counter=style))  # type: ignore[arg-type]
    await opened(cards, world, keeper())
    assert pin_entries(world) == 1


async def test_with_no_way_to_tell_the_attempts_left_the_pin_is_not_risked(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    """No counter command and VERIFY refused through AT+CSIM (Wavecom): mn-secd does not guess."""
    world = make_modem(locked_card(), quirks=Quirks(pin_counter="none", csim_restricted=True))
    error = await fails(cards, world, keeper())
    assert isinstance(error, UiccLocked) and "how many PIN attempts are left" in str(error)
    assert pin_entries(world) == 0


async def test_one_attempt_left_is_too_few(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(locked_card(pin_attempts=1))
    error = await fails(cards, world, keeper())
    assert isinstance(error, UiccLocked) and error.retries == 1 and "1 PIN attempt left" in str(error)
    assert pin_entries(world) == 0 and world.card.profile.pin_attempts == 1


async def test_a_wrong_pin_is_reported_with_the_attempts_left_and_never_retried(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(locked_card())
    pin = keeper("1234")
    error = await fails(cards, world, pin)
    assert isinstance(error, PinRejected) and error.retries == 2 and "2 attempts left" in str(error)
    assert "1234" not in str(error)
    for _ in range(3):  # the daemon's next attempts, same SIM: nothing more is spent
        again = await fails(cards, world, pin)
        assert isinstance(again, PinRejected) and again.retries == 2
    assert pin_entries(world) == 1 and world.card.profile.pin_attempts == 2


async def test_a_sim_that_wants_its_puk_is_left_alone(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(locked_card(pin_attempts=0))
    error = await fails(cards, world, keeper())
    assert isinstance(error, UiccLocked) and error.state == "SIM PUK" and error.retries == 10
    assert "never enters a PUK" in str(error)
    assert pin_entries(world) == 0 and world.card.profile.puk_attempts == 10


async def test_a_reinserted_sim_gets_its_pin_once_more(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    world = make_modem(locked_card())
    card = await opened(cards, world, keeper())
    events: asyncio.Queue[object] = asyncio.Queue()
    card.subscribe(events.put_nowait)
    world.modem.remove_sim()
    await asyncio.wait_for(events.get(), 5)
    world.card.reset()
    world.modem.insert_sim(world.card)
    await asyncio.wait_for(events.get(), 5)
    assert (await card.identity()).iccid == world.card.profile.iccid
    assert pin_entries(world) == 2  # one per insertion


async def test_the_sim_busy_after_the_pin_is_waited_out(make_modem: Callable[..., PtyModem], cards: list[Card]) -> None:
    """SIMCom SIM800 answers SIM busy right after AT+CPIN= OK while it reads the card."""
    world = make_modem(locked_card(), quirks=Quirks(boot_sim_busy=0.8))
    await asyncio.sleep(0.9)  # past the power-up phase: what is left is the busy phase after the PIN
    card = await opened(cards, world, keeper())
    assert (await card.identity()).imsi == "001010000000001"
    assert pin_entries(world) == 1 and world.modem.count("AT+CPIN?") >= 3


# --- SIM busy and not inserted at power-up -----------------------------------------------------------------


async def test_sim_not_inserted_then_busy_at_power_up_are_told_apart(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(boot_no_sim=1.0, boot_sim_busy=1.0))
    first = await fails(cards, world)
    assert isinstance(first, UiccAbsent) and "+CME ERROR: 10" in str(first)
    await asyncio.sleep(1.1)
    second = await fails(cards, world)
    assert isinstance(second, UiccBusy) and "SIM busy" in str(second)
    await asyncio.sleep(1.0)
    card = await opened(cards, world)
    assert (await card.identity()).imsi == "001010000000001"


# --- AUTHENTICATE and GET RESPONSE refused through AT+CSIM (Wavecom) -----------------------------------------


async def test_a_restricted_csim_is_avoided_when_cgla_works(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(csim_restricted=True))
    card = await opened(cards, world, transport="auto")
    assert card.transport_name == "cgla"
    result = await card.authenticate(RAND, challenge(world.card.profile, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and world.modem.apdu_count(INS_AUTHENTICATE) == 1


async def test_a_restricted_csim_is_named_when_it_is_the_only_path(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(csim_restricted=True, no_logical_channels=True))
    error = await fails(cards, world, transport="auto")
    assert isinstance(error, TransportUnavailable)
    text = str(error)
    assert "cannot run GBA over AT" in text
    assert "AT+CCHO: +CME ERROR: 4" in text and "GET RESPONSE refused (+CME ERROR: 3)" in text
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 0


async def test_a_restricted_csim_chosen_by_hand_points_at_auto(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(csim_restricted=True))
    error = await fails(cards, world, transport="csim")
    assert isinstance(error, TransportUnavailable) and 'transport = "auto"' in str(error)
    assert "GET RESPONSE refused (+CME ERROR: 3)" in str(error)


# --- the MF selected again after every AT+CSIM (Siemens, Multi-Tech) -------------------------------------------


async def test_the_modem_really_selects_the_mf_after_each_csim(make_modem: Callable[..., PtyModem]) -> None:
    """The switch itself: after an AT+CSIM, the card's basic channel is back at the MF."""
    for reselect, status in ((False, b"\x90\x00"), (True, b"\x69\x86")):
        world = make_modem(quirks=Quirks(reselect_mf=reselect))
        assert at_command(world.path, 'AT+CSIM=14,"00A4080C022FE2"')[-1] == "OK"  # SELECT EF_ICCID
        # READ BINARY on the card's basic channel: the ICCID while EF_ICCID is selected, 6986 (no EF
        # selected) once the modem has selected the MF again.
        assert world.card.process_apdu(bytes.fromhex("00B000000A"))[-2:] == status


def at_command(path: str, line: str, timeout: float = 3.0) -> list[str]:
    """One command on the pty, as any program on the port would send it; the answer's lines."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, line.encode() + b"\r")
        buf = b""
        deadline = time.monotonic() + timeout
        while not any(end in buf for end in (b"OK\r\n", b"ERROR")):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no answer to {line}: {buf!r}"
            buf += os.read(fd, 4096)
    finally:
        os.close(fd)
    return [text for text in buf.decode().replace("\r", "\n").split("\n") if text]


async def test_the_basic_channel_survives_the_mf_reselection(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(reselect_mf=True, no_logical_channels=True))
    card = await opened(cards, world, transport="csim")
    identity = await card.identity()
    assert identity.transport == "csim" and identity.imsi == "001010000000001"
    for seq in (1, 2):
        result = await card.authenticate(RAND, challenge(world.card.profile, seq), AuthContext.UMTS)
        assert isinstance(result, AkaSuccess)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 2
    gba = await card.authenticate(RAND, challenge(world.card.profile, 3), AuthContext.GBA)
    assert isinstance(gba, AkaSuccess)
    await card.write_gba_bootstrap_params("a2V5@bsf.example", "2035-01-01T00:00:00Z")


# --- answers lost: +CME ERROR: 0 and dropped +CSIM lines (Quectel EG95) ----------------------------------------


@pytest.mark.parametrize("quirk", ["cme0_every", "drop_answer_every"])
async def test_lost_answers_are_asked_again_for_harmless_commands_only(
    make_modem: Callable[..., PtyModem], cards: list[Card], quirk: str
) -> None:
    world = make_modem(quirks=Quirks(**{quirk: 3}))  # type: ignore[arg-type]
    card = await opened(cards, world)
    identity = await card.identity()
    assert identity.imsi == "001010000000001"
    assert world.modem.count("AT+CGLA") > world.modem.apdu_count(INS_AUTHENTICATE) + 10  # reads were repeated
    world.modem.set_quirks(**{quirk: 1})  # the next APDU, an AUTHENTICATE, loses its answer
    with pytest.raises(AuthenticateOutcomeUnknown):
        await card.authenticate(RAND, challenge(world.card.profile, 1), AuthContext.UMTS)
    await asyncio.sleep(0.3)
    assert world.modem.apdu_count(INS_AUTHENTICATE) == 1  # the card ran it once; nobody sent it again
    world.modem.set_quirks(**{quirk: 0})
    result = await card.authenticate(RAND, challenge(world.card.profile, 2), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess) and world.modem.apdu_count(INS_AUTHENTICATE) == 2


async def test_an_updated_binary_is_written_again_but_a_channel_is_never_opened_twice(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(no_logical_channels=False))
    card = await opened(cards, world, transport="csim")
    result = await card.authenticate(RAND, challenge(world.card.profile, 1), AuthContext.GBA)
    assert isinstance(result, AkaSuccess)
    # SELECT EF_GBABP, GET RESPONSE, READ BINARY, then the 4th command: UPDATE BINARY, its answer lost.
    world.modem.set_quirks(drop_answer_every=4)
    await card.write_gba_bootstrap_params("a2V5@bsf.example", "2035-01-01T00:00:00Z")
    assert world.modem.apdu_count(0xD6) == 2  # written again: the same bytes at the same offset

    other = make_modem(quirks=Quirks(cme0_every=1))
    error = await fails(cards, other, transport="csim")
    assert isinstance(error, TransportUnavailable)
    opens = [line for line in other.modem.log if line.upper().startswith('AT+CSIM=10,"0070000001"')]
    assert len(opens) == 1  # MANAGE CHANNEL open: its lost answer may hide a channel; never sent again


# --- 6Cxx passed to the host (Nordic nRF91) ------------------------------------------------------------------


async def test_wrong_le_is_reissued_with_the_length_the_card_names(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(wrong_le=1, internal_get_response=True))
    card = await opened(cards, world)
    assert (await card.identity()).iccid == world.card.profile.iccid
    # Every read was answered 6Cxx once and asked again once.
    assert world.modem.apdu_count(INS_READ_RECORD) % 2 == 0 and world.modem.apdu_count(INS_READ_BINARY) % 2 == 0
    assert world.modem.apdu_count(INS_READ_RECORD) > 0


async def test_a_card_that_keeps_answering_6cxx_is_given_up_on(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem(quirks=Quirks(wrong_le=5, internal_get_response=True))
    error = await fails(cards, world)
    assert isinstance(error, CardStatusError) and f"{error.sw:04X}".startswith("6C")
    assert world.modem.apdu_count(INS_READ_RECORD) == 2  # the command and one re-issue


# --- a second process on the port ------------------------------------------------------------------------------


async def test_another_process_holding_the_port_is_named(
    make_modem: Callable[..., PtyModem], cards: list[Card], holder: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    world = make_modem()
    other = holder(world.path)
    notices: list[object] = []
    card = await open_test_card(cards, world.path, notices=notices.append, **FAST)
    async with asyncio.timeout(5):
        while not notices:
            await asyncio.sleep(0.05)
    sharing = notices[0]
    assert isinstance(sharing, PortSharing) and [h.pid for h in sharing.holders] == [other.pid]
    assert f"pid {other.pid}" in sharing.describe() and "udev" in sharing.describe()
    assert (await card.identity()).imsi == "001010000000001"


async def test_answers_to_commands_never_sent_are_noticed(
    make_modem: Callable[..., PtyModem], cards: list[Card]
) -> None:
    world = make_modem()
    notices: list[object] = []
    await open_test_card(cards, world.path, notices=notices.append, **FAST)
    world.modem.set_quirks(foreign_answers=0.2)
    async with asyncio.timeout(5):
        while not notices:
            await asyncio.sleep(0.05)
    sharing = notices[0]
    assert isinstance(sharing, PortSharing) and sharing.stray_answers >= 1 and not sharing.holders
    assert "never sent" in sharing.describe()


# --- the emulator's PIN commands on the wire ----------------------------------------------------------------


def test_the_pin_commands_on_the_wire(
    make_modem: Callable[..., PtyModem], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mn_secd.sim.modem")
    world = make_modem(locked_card())
    assert at_command(world.path, "AT+CMEE=1")[-1] == "OK"
    assert at_command(world.path, "AT+CPIN?")[:2] == ["+CPIN: SIM PIN", "OK"]
    assert at_command(world.path, "AT+CIMI")[-1] == "+CME ERROR: 11"  # SIM PIN required
    assert at_command(world.path, "AT+CPINR")[:2] == ["+CPINR: SIM PIN,3,3", "+CPINR: SIM PUK,10,10"]
    for _ in range(3):
        at_command(world.path, 'AT+CPIN="0000"')
    assert at_command(world.path, "AT+CPIN?")[0] == "+CPIN: SIM PUK"
    assert world.card.profile.pin_attempts == 0
    assert at_command(world.path, 'AT+CPIN="12345678","2468"')[-1] == "OK"  # the lab card's PUK, by hand
    assert at_command(world.path, "AT+CPIN?")[0] == "+CPIN: READY"
    assert world.card.profile.pin == "2468" and world.card.profile.puk_attempts == 10
    # the emulator's log: each entry and its outcome, never the digits
    entries = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "modem.pin"]
    refused = [f"AT+CPIN: PIN refused (SW 63C{left})" for left in (2, 1, 0)]
    assert entries == [*refused, "AT+CPIN: PUK accepted"]
    assert not any(digits in caplog.text for digits in ("0000", "12345678", "2468"))

    path = tmp_path / "card.toml"
    save_profile(path, world.card.profile)
    assert load_profile(path) == world.card.profile  # PIN, PUK and counters survive a restart


@pytest.mark.parametrize(("style", "line"), [("qpinc", '+QPINC: "SC",3,10'), ("cpinc", "+CPINC: 3,3,10,10")])
def test_vendor_pin_counters_on_the_wire(make_modem: Callable[..., PtyModem], style: str, line: str) -> None:
    world = make_modem(locked_card(), quirks=Quirks(pin_counter=style))  # type: ignore[arg-type]
    command = 'AT+QPINC="SC"' if style == "qpinc" else "AT+CPINC"
    assert at_command(world.path, command)[0] == line
    assert at_command(world.path, "AT+CPINR")[-1] == "ERROR"


def test_the_emulators_help_lists_each_field_quirk_with_its_modem_family(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = [sys.executable, "-m", "mn_secd", "sim", "modem"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    text = " ".join(shown.split())
    for flag, family in [
        ("--sim-pin", "SIM PIN"),
        ("--pin-counter", "Quectel"),
        ("--boot-no-sim", "+CME ERROR: 10"),
        ("--boot-sim-busy", "u-blox SARA-R4"),
        ("--csim-restricted", "Wavecom"),
        ("--reselect-mf", "Siemens"),
        ("--cme0-every", "Quectel EG95"),
        ("--drop-answer-every", "Quectel EG95"),
        ("--wrong-le", "nRF91"),
        ("--foreign-answers", "ModemManager"),
    ]:
        assert flag in text and family in text.rpartition(flag)[2][:400], flag  # its entry, not the usage line
    profile = tmp_path / "card.toml"
    profile.write_text((Path(env["PYTHONPATH"]) / "etc" / "sim" / "card-isim.toml").read_text())
    bad = subprocess.run([*run, "--card", str(profile), "--sim-pin", "12ab"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "4 to 8 decimal digits" in bad.stderr and "12ab" not in bad.stderr
