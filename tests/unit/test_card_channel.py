"""The card's identity, AUTHENTICATE and EF_GBABP over an APDU transport, with no I/O.

The transport here hands each APDU straight to the software UICC (the simulated world's card, with
its own file system, logical channels and T=0 behaviour), so what is tested is the channel's APDU
logic against a card model rather than against canned answers; the pty tests run the same logic
through the modem emulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from lab_card_profiles import ISIM_CARD, MNC3_CARD, OPC, RAND, K, challenge

from mn_secd.aka import AkaMacFailure, AkaSuccess, AuthContext
from mn_secd.card_identity import Application, CardIdentity
from mn_secd.errors import (
    ApplicationNotFound,
    AuthenticateOutcomeUnknown,
    AuthenticateRefused,
    CardStatusError,
    MnSecdError,
    OperationTimeout,
    UiccAbsent,
    UiccError,
)
from mn_secd.gba.kdf import ks_naf
from mn_secd.sim.milenage import Milenage
from mn_secd.sim.profile import CardProfile
from mn_secd.sim.usim import SoftUicc
from mn_secd.uicc import files
from mn_secd.uicc.apdu import Apdu, parse_response
from mn_secd.uicc.channel import CardChannel
from mn_secd.uicc.options import ApplicationChoice

INS_SELECT, INS_READ_RECORD, INS_AUTHENTICATE = 0xA4, 0xB2, 0x88
USIM_PREFIX, ISIM_PREFIX = files.USIM_AID_PREFIX, files.ISIM_AID_PREFIX


class Failure(MnSecdError):
    """What a transport raises in these tests when told to fail a command."""


class SoftTransport:
    """An :class:`~mn_secd.uicc.transport.ApduTransport` straight into a software UICC.

    ``answer`` may rewrite the card's answer to a command (a card with other contents); ``fail``
    may raise instead of answering. Every command sent is kept in ``sent``.
    """

    name = "soft"

    def __init__(self, card: SoftUicc, *, logical: bool = True) -> None:
        self.card = card
        self._channel = 0
        self.sent: list[Apdu] = []
        self.answer: Callable[[Apdu, bytes], bytes] = lambda apdu, raw: raw
        self.fail: Callable[[Apdu], MnSecdError | None] = lambda apdu: None
        self.judged: list[tuple[MnSecdError, str]] = []
        if logical:
            opened = parse_response(card.process_apdu(bytes.fromhex("0070000001")))
            assert opened.sw == 0x9000
            self._channel = opened.data[0]

    @property
    def channel(self) -> int:
        return self._channel

    @property
    def basic_channel(self) -> bool:
        return self._channel == 0

    async def transmit(self, apdu: Apdu, *, timeout: float | None = None) -> bytes:
        await asyncio.sleep(0)
        self.sent.append(apdu)
        failure = self.fail(apdu)
        if failure is not None:
            raise failure
        return self.answer(apdu, self.card.process_apdu(apdu.on_channel(self._channel).encode()))

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        self.judged.append((exc, what))
        if isinstance(exc, OperationTimeout):
            return AuthenticateOutcomeUnknown(f"{what}: {exc}")
        return AuthenticateRefused(f"{what}: {exc}")

    async def close(self) -> None:
        pass

    def count(self, ins: int) -> int:
        return sum(1 for apdu in self.sent if apdu.ins == ins)


def channel(profile: CardProfile = ISIM_CARD, *, logical: bool = True) -> tuple[CardChannel, SoftTransport]:
    transport = SoftTransport(SoftUicc(profile), logical=logical)
    return CardChannel(transport), transport


async def read(
    profile: CardProfile = ISIM_CARD, preference: ApplicationChoice = ApplicationChoice.AUTO
) -> tuple[CardIdentity, CardChannel, SoftTransport]:
    ch, transport = channel(profile)
    return await ch.read_identity(preference), ch, transport


def without_usim_in_ef_dir(apdu: Apdu, raw: bytes) -> bytes:
    """The card's EF_DIR with the USIM's record left unused (``FF``): an ISIM-only card."""
    if apdu.ins == INS_READ_RECORD and USIM_PREFIX.hex().upper() in raw.hex().upper():
        return b"\xff" * (len(raw) - 2) + raw[-2:]
    return raw


# --- identity -------------------------------------------------------------------------------------------


async def test_isim_card_identity() -> None:
    identity, _, transport = await read()
    assert (identity.iccid, identity.imsi, identity.mnc_length) == ("89882110000000000018", "001010000000001", 2)
    assert identity.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"  # EF_IMPI
    assert identity.application is Application.ISIM and identity.aid.startswith(ISIM_PREFIX)
    assert identity.gba_u  # IST service 2
    assert [app for app, _ in identity.applications] == [Application.USIM, Application.ISIM]
    assert identity.transport == "soft"
    assert transport.count(INS_AUTHENTICATE) == 0


async def test_usim_only_card_with_a_three_digit_mnc() -> None:
    identity, _, _ = await read(MNC3_CARD)
    assert identity.application is Application.USIM and not identity.gba_u
    assert (identity.mcc, identity.mnc, identity.mnc_length) == ("310", "150", 3)
    assert identity.impi == "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"  # derived: TS 23.003 13.3


async def test_usim_preference_on_a_card_with_an_isim() -> None:
    identity, _, _ = await read(preference=ApplicationChoice.USIM)
    assert identity.application is Application.USIM and identity.aid.startswith(USIM_PREFIX)
    assert identity.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert identity.gba_u  # UST service 68


async def test_a_preference_the_card_cannot_meet() -> None:
    ch, _ = channel(MNC3_CARD)
    with pytest.raises(ApplicationNotFound, match="ISIM"):
        await ch.read_identity(ApplicationChoice.ISIM)


async def test_isim_only_card_takes_the_imsi_from_whoever_carries_it() -> None:
    ch, transport = channel()
    transport.answer = without_usim_in_ef_dir
    asked: list[str] = []

    async def imsi() -> str:
        asked.append("imsi")
        return "001010000000001"

    identity = await ch.read_identity(imsi_source=imsi)
    assert asked == ["imsi"] and identity.imsi == "001010000000001"
    assert identity.applications == ((Application.ISIM, identity.aid),)
    assert identity.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert identity.mnc_length == 2  # from the ISIM's EF_AD

    ch, transport = channel()
    transport.answer = without_usim_in_ef_dir
    with pytest.raises(ApplicationNotFound, match="ISIM-only"):
        await ch.read_identity()  # a reader without a modem has nobody to ask


async def test_a_broken_ef_dir_record_does_not_hide_the_others() -> None:
    def garble_isim_record(apdu: Apdu, raw: bytes) -> bytes:
        if apdu.ins == INS_READ_RECORD and ISIM_PREFIX.hex().upper() in raw.hex().upper():
            return b"\x61\x03\x4f\x01\x00" + b"\xff" * (len(raw) - 7) + raw[-2:]  # an AID of one octet
        return raw

    ch, transport = channel()
    transport.answer = garble_isim_record
    identity = await ch.read_identity()
    assert identity.application is Application.USIM  # the ISIM's record was skipped, not fatal


async def test_a_missing_ef_ad_falls_back_to_the_mcc_table() -> None:
    def no_ef_ad(apdu: Apdu, raw: bytes) -> bytes:
        if apdu.ins == INS_SELECT and apdu.data == files.FID_EF_AD.to_bytes(2, "big"):
            return b"\x6a\x82"
        return raw

    ch, transport = channel(MNC3_CARD)
    transport.answer = no_ef_ad
    identity = await ch.read_identity()
    assert identity.mnc_length == 3  # MCC 310 uses three-digit MNCs


async def test_a_card_that_went_away_is_reported_as_absent() -> None:
    ch, transport = channel()
    transport.fail = lambda apdu: UiccAbsent("no SIM")
    with pytest.raises(UiccAbsent):
        await ch.read_identity()


# --- AUTHENTICATE ---------------------------------------------------------------------------------------


async def test_authenticate_on_a_logical_channel_needs_no_select() -> None:
    identity, ch, transport = await read()
    selects = transport.count(INS_SELECT)
    result = await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    res, ck, ik, _ = Milenage(K, OPC).f2345(RAND)
    assert isinstance(result, AkaSuccess) and (result.res, result.ck, result.ik) == (res, ck, ik)
    assert transport.count(INS_AUTHENTICATE) == 1 and transport.count(INS_SELECT) == selects
    assert all(apdu.channel == transport.channel for apdu in transport.sent)


async def test_authenticate_on_the_basic_channel_selects_the_application_again() -> None:
    transport = SoftTransport(SoftUicc(ISIM_CARD), logical=False)
    ch = CardChannel(transport)
    identity = await ch.read_identity()
    selects = transport.count(INS_SELECT)
    result = await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess)
    reselect = [apdu for apdu in transport.sent[-3:] if apdu.ins == INS_SELECT]
    assert transport.count(INS_SELECT) == selects + 1 and reselect[0].data == identity.aid
    assert reselect[0].p2 == 0x0C  # no FCP asked for: one command, no GET RESPONSE


async def test_a_mac_failure_is_a_value() -> None:
    identity, ch, _ = await read()
    bad = bytearray(challenge(ISIM_CARD, 1))
    bad[-1] ^= 1
    assert isinstance(await ch.authenticate(identity, RAND, bytes(bad), AuthContext.UMTS), AkaMacFailure)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(OperationTimeout("silence"), AuthenticateOutcomeUnknown), (Failure("refused"), AuthenticateRefused)],
)
async def test_a_failed_authenticate_is_judged_by_the_transport_and_never_resent(
    failure: MnSecdError, expected: type[MnSecdError]
) -> None:
    identity, ch, transport = await read()
    transport.fail = lambda apdu: failure if apdu.ins == INS_AUTHENTICATE else None
    with pytest.raises(expected) as info:
        await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert info.value.__cause__ is failure
    assert transport.judged == [(failure, "AUTHENTICATE")]
    assert transport.count(INS_AUTHENTICATE) == 1


async def test_an_absent_card_during_authenticate_stays_absent() -> None:
    identity, ch, transport = await read()
    transport.fail = lambda apdu: UiccAbsent("no SIM")
    with pytest.raises(UiccAbsent):
        await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert transport.judged == []  # nothing to judge: the card is not there


async def test_a_refusing_card_is_not_a_transport_failure() -> None:
    identity, ch, transport = await read()
    transport.answer = lambda apdu, raw: b"\x69\x85" if apdu.ins == INS_AUTHENTICATE else raw
    with pytest.raises(AuthenticateRefused, match="6985"):
        await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.UMTS)
    assert transport.judged == []


# --- GBA_U ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("application", [ApplicationChoice.ISIM, ApplicationChoice.USIM])
async def test_gba_u_bootstrap_naf_derivation_and_ef_gbabp(application: ApplicationChoice) -> None:
    identity, ch, _ = await read(preference=application)
    result = await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.GBA)
    assert isinstance(result, AkaSuccess) and result.ck is None
    btid, lifetime = "I1U8vpY3qJ0hiuZNrke/NQ==@bsf.mnc001.mcc001.pub.3gppnetwork.org", "2030-01-01T00:00:00Z"
    await ch.write_gba_bootstrap_params(identity, btid, lifetime)
    naf_id = b"in-cse.example.org" + bytes.fromhex("010001c0a8")
    _, ck, ik, _ = Milenage(K, OPC).f2345(RAND)
    assert await ch.gba_naf_derivation(identity, naf_id, identity.impi) == ks_naf(ck + ik, RAND, identity.impi, naf_id)

    content = await ch.read_gba_bootstrap_params(identity)
    assert (content.rand, content.btid, content.lifetime) == (RAND, btid, lifetime)  # the card's RAND kept
    fid = files.FID_EF_GBABP_ISIM if application is ApplicationChoice.ISIM else files.FID_EF_GBABP_USIM
    fcp = await ch.select_file(fid)
    assert fcp is not None and fcp.file_size is not None
    assert files.decode_gbabp(await ch._read_binary(fcp.file_size)) == content  # the file of this application


async def test_ef_gbabp_falls_back_to_the_usim_and_reselects_the_isim() -> None:
    def isim_without_gbabp(apdu: Apdu, raw: bytes) -> bytes:
        if apdu.ins == INS_SELECT and apdu.data == files.FID_EF_GBABP_ISIM.to_bytes(2, "big"):
            return b"\x6a\x82"
        return raw

    identity, ch, transport = await read()
    transport.answer = isim_without_gbabp
    await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.GBA)
    await ch.write_gba_bootstrap_params(identity, "b@bsf.example", "2030-01-01T00:00:00Z")
    aids = [apdu.data for apdu in transport.sent if apdu.ins == INS_SELECT and apdu.p1 == 0x04]
    usim = next(aid for app, aid in identity.applications if app is Application.USIM)
    assert aids[-2:] == [usim, identity.aid]  # written under the USIM, the ISIM selected again
    result = await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 2), AuthContext.UMTS)
    assert isinstance(result, AkaSuccess)  # in the ISIM, as before
    content = await ch.read_gba_bootstrap_params(identity)  # read back from the same USIM file ...
    assert content.btid == "b@bsf.example"
    aids = [apdu.data for apdu in transport.sent if apdu.ins == INS_SELECT and apdu.p1 == 0x04]
    assert aids[-2:] == [usim, identity.aid]  # ... and the ISIM selected again


async def test_a_b_tid_too_long_for_ef_gbabp_is_refused_before_writing() -> None:
    identity, ch, transport = await read()
    await ch.authenticate(identity, RAND, challenge(ISIM_CARD, 1), AuthContext.GBA)
    with pytest.raises(UiccError, match="EF_GBABP holds"):
        await ch.write_gba_bootstrap_params(identity, "x" * 180 + "@bsf.example", "2030-01-01T00:00:00Z")
    assert transport.count(0xD6) == 0  # no UPDATE BINARY


async def test_a_card_status_error_names_the_operation() -> None:
    identity, ch, transport = await read()
    transport.answer = lambda apdu, raw: b"\x6f\x00" if apdu.ins == 0xB0 else raw
    with pytest.raises(CardStatusError, match="READ BINARY"):
        await ch.write_gba_bootstrap_params(identity, "b@bsf.example", "2030-01-01T00:00:00Z")
