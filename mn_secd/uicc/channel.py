"""The card's files and AUTHENTICATE over one APDU transport, whatever carries the APDUs.

Everything here is APDUs on one :class:`~mn_secd.uicc.transport.ApduTransport` (one logical
channel): SELECT, READ BINARY/RECORD, UPDATE BINARY, AUTHENTICATE. So the identity read, the GBA
runs and EF_GBABP work the same over a modem's AT port and over a PC/SC reader, and can be tested
with an in-memory transport and no I/O at all. What belongs to one kind of access -- the AT port's
URCs, ``AT+CPIN?``, ``AT+CIMI``, reopening a vanished port -- stays with that access
(:mod:`mn_secd.uicc.card` for the AT port).

Start-up reads EF_DIR and EF_ICCID; the USIM's EF_IMSI, EF_AD and EF_UST; the ISIM's EF_IMPI and
EF_IST when the ISIM is the application in use (TS 102 221, TS 31.102, TS 31.103). That
application is left selected on the channel, so an AUTHENTICATE afterwards is one command (two with
GET RESPONSE) and never a re-SELECT -- except on the basic channel, where the modem may have
selected something else in between.

An AUTHENTICATE is never sent twice: the T=0 procedure does not resend it on ``6Cxx``, and a failure
after sending is handed to the transport to say what it means (:meth:`ApduTransport.one_shot_error`:
refused, or an outcome nobody knows).

A channel is not safe for concurrent use: its owner runs one operation at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.card_identity import Application, CardIdentity, GbaBootstrapParams
from mn_secd.errors import ApduParseError, ApplicationNotFound, CardStatusError, MnSecdError, UiccAbsent, UiccError
from mn_secd.nai import impi_from_imsi
from mn_secd.uicc import files
from mn_secd.uicc.apdu import Apdu, Response, parse_apdu
from mn_secd.uicc.auth import (
    build_authenticate,
    build_gba_naf_derivation,
    parse_authenticate_response,
    parse_naf_derivation_response,
)
from mn_secd.uicc.options import ApplicationChoice
from mn_secd.uicc.transport import ApduTransport, exchange

logger = logging.getLogger(__name__)

SW_OK = 0x9000
SW_FILE_NOT_FOUND = 0x6A82

#: Where the IMSI comes from on a card without a USIM (the modem knows it: ``AT+CIMI``).
ImsiSource = Callable[[], Awaitable[str]]


class CardChannel:
    """The UICC's files and AUTHENTICATE over ``transport``."""

    def __init__(self, transport: ApduTransport) -> None:
        self.transport = transport

    # --- identity --------------------------------------------------------------------------------

    async def read_identity(
        self, preference: ApplicationChoice = ApplicationChoice.AUTO, *, imsi_source: ImsiSource | None = None
    ) -> CardIdentity:
        """Find the application, read ICCID, IMSI, IMPI and GBA_U support; leave the application selected.

        ``imsi_source`` gives the IMSI of an ISIM-only card (which has no EF_IMSI); without one such
        a card raises :class:`~mn_secd.errors.ApplicationNotFound`.
        """
        apps = files.applications(await self._read_dir())
        app, aid = files.choose_application(apps, preference)
        iccid_raw = await self._read_transparent(files.FID_EF_ICCID, from_mf=True)
        assert iccid_raw is not None
        iccid = files.decode_iccid(iccid_raw)
        usim = next((a for kind, a in apps if kind is Application.USIM), None)
        ust: bytes | None = None
        if usim is not None:
            await self.select_aid(usim)
            imsi_raw = await self._read_transparent(files.FID_EF_IMSI)
            assert imsi_raw is not None
            imsi = files.decode_imsi(imsi_raw)
            ad = await self._read_transparent(files.FID_EF_AD, optional=True)
            ust = await self._read_transparent(files.FID_EF_UST, optional=True)
        elif imsi_source is not None:  # an ISIM-only card: whoever carries the card may know the IMSI
            imsi = await imsi_source()
            ad = None
        else:
            raise ApplicationNotFound("an ISIM-only card: its IMSI needs a USIM, and nothing else can tell it")
        if app is Application.ISIM:
            await self.select_aid(aid)
            impi_raw = await self._read_transparent(files.FID_EF_IMPI)
            assert impi_raw is not None
            impi = files.decode_nai(impi_raw)
            if ad is None:
                ad = await self._read_transparent(files.FID_EF_AD, optional=True)
            ist = await self._read_transparent(files.FID_EF_IST, optional=True)
            gba_u = ist is not None and files.has_service(ist, files.IST_SERVICE_GBA)
            mnc_length = files.mnc_length(ad, imsi)
        else:
            mnc_length = files.mnc_length(ad, imsi)
            impi = impi_from_imsi(imsi, mnc_length)
            gba_u = ust is not None and files.has_service(ust, files.UST_SERVICE_GBA)
        return CardIdentity(
            iccid=iccid,
            imsi=imsi,
            mnc_length=mnc_length,
            impi=impi,
            application=app,
            aid=aid,
            gba_u=gba_u,
            transport=self.transport.name,
            applications=apps,
        )

    async def _read_dir(self) -> list[files.DirEntry]:
        fcp = await self.select_file(files.FID_EF_DIR, from_mf=True)
        assert fcp is not None
        if fcp.record_length is None or fcp.record_count is None:
            raise ApduParseError("EF_DIR is not a record file")
        entries: list[files.DirEntry] = []
        for number in range(1, fcp.record_count + 1):
            response = await exchange(self.transport, Apdu(0x00, 0xB2, number, 0x04, le=fcp.record_length))
            if response.sw != SW_OK:
                raise CardStatusError(f"READ RECORD {number} of EF_DIR", response.sw)
            try:
                entry = files.parse_dir_record(response.data)
            except ApduParseError as exc:  # one odd template must not hide the others
                logger.warning("EF_DIR record %d skipped: %s", number, exc, extra={"event": "uicc.bad_dir_record"})
                continue
            if entry is not None:
                entries.append(entry)
        return entries

    # --- AUTHENTICATE ----------------------------------------------------------------------------

    async def authenticate(self, identity: CardIdentity, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        """Exactly one AUTHENTICATE (3G context or GBA bootstrapping mode) in ``identity``'s application."""
        command = parse_apdu(build_authenticate(rand, autn, context))
        await self._reselect_on_basic_channel(identity)
        response = await self._run_once(command, "AUTHENTICATE")
        return parse_authenticate_response(response.data, response.sw, context)

    async def gba_naf_derivation(self, identity: CardIdentity, naf_id: bytes, impi: str) -> bytes:
        """GBA_U NAF derivation (``DE``): Ks_ext_NAF; the card must hold a Ks from a GBA bootstrap."""
        command = parse_apdu(build_gba_naf_derivation(naf_id, impi))
        await self._reselect_on_basic_channel(identity)
        response = await self._run_once(command, "AUTHENTICATE (NAF derivation)")
        return parse_naf_derivation_response(response.data, response.sw)

    async def _reselect_on_basic_channel(self, identity: CardIdentity) -> None:
        if self.transport.basic_channel:  # the modem may have selected another file on channel 0
            await self.select_aid(identity.aid, fcp=False)

    async def _run_once(self, command: Apdu, what: str) -> Response:
        """Never resent (no T=0 resend on ``6Cxx`` either); the transport says what a failure means."""
        try:
            return await exchange(self.transport, command, may_resend=False)
        except UiccAbsent:
            raise
        except MnSecdError as exc:
            judged = self.transport.one_shot_error(exc, what)
            if judged is exc:
                raise
            raise judged from exc

    # --- EF_GBABP --------------------------------------------------------------------------------

    async def read_gba_bootstrap_params(self, identity: CardIdentity) -> GbaBootstrapParams:
        """EF_GBABP as the card holds it (TS 31.102 4.2.79): what a GBA_U session resumed at start-up
        is checked against. The same file :meth:`write_gba_bootstrap_params` writes."""
        async with self._gbabp(identity) as fcp:
            return files.decode_gbabp(await self._read_binary(_gbabp_size(fcp)))

    async def write_gba_bootstrap_params(self, identity: CardIdentity, btid: str, lifetime: str) -> None:
        """B-TID and lifetime into EF_GBABP (TS 31.102 4.2.79), keeping the RAND the card wrote there."""
        async with self._gbabp(identity) as fcp:
            size = _gbabp_size(fcp)
            current = files.decode_gbabp(await self._read_binary(size))
            new = files.encode_gbabp(replace(current, btid=btid, lifetime=lifetime))
            if len(new) > size:
                raise UiccError(f"EF_GBABP holds {size} octets, B-TID and lifetime need {len(new)}")
            await self._update_binary(new + b"\xff" * (size - len(new)))

    @contextlib.asynccontextmanager
    async def _gbabp(self, identity: CardIdentity) -> AsyncIterator[files.Fcp]:
        """EF_GBABP selected: the ISIM's when the ISIM is in use and has one, else the USIM's; the
        application in use is selected again afterwards."""
        if identity.application is Application.ISIM:
            fcp = await self.select_file(files.FID_EF_GBABP_ISIM, optional=True)
            if fcp is not None:
                yield fcp
                return
        usim = next((aid for app, aid in identity.applications if app is Application.USIM), None)
        if usim is None:
            raise ApplicationNotFound("no EF_GBABP: the card has no USIM and its ISIM has none")
        if usim != identity.aid:
            await self.select_aid(usim)
        try:
            fcp = await self.select_file(files.FID_EF_GBABP_USIM)
            assert fcp is not None
            yield fcp
        finally:
            if usim != identity.aid:
                await self.select_aid(identity.aid)

    # --- files -----------------------------------------------------------------------------------

    async def select_aid(self, aid: bytes, *, fcp: bool = True) -> None:
        """SELECT an application; ``fcp=False`` asks for no data (P2 0C): one command, no GET RESPONSE."""
        command = Apdu(0x00, 0xA4, 0x04, 0x04, aid, le=256) if fcp else Apdu(0x00, 0xA4, 0x04, 0x0C, aid)
        response = await exchange(self.transport, command)
        if response.sw == SW_FILE_NOT_FOUND:
            raise ApplicationNotFound(f"SELECT of application {aid[:7].hex().upper()}... failed (6A82)")
        if response.sw != SW_OK:
            raise CardStatusError("SELECT application", response.sw)

    async def select_file(self, fid: int, *, from_mf: bool = False, optional: bool = False) -> files.Fcp | None:
        """SELECT by FID under the current ADF/DF, or by path from the MF; None if optional and absent."""
        p1 = 0x08 if from_mf else 0x00
        response = await exchange(self.transport, Apdu(0x00, 0xA4, p1, 0x04, fid.to_bytes(2, "big"), le=256))
        if response.sw == SW_FILE_NOT_FOUND and optional:
            return None
        if response.sw != SW_OK:
            raise CardStatusError(f"SELECT {fid:04X}", response.sw)
        return files.parse_fcp(response.data)

    async def _read_binary(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = min(size - len(data), 256)
            offset = len(data)
            response = await exchange(self.transport, Apdu(0x00, 0xB0, offset >> 8, offset & 0xFF, le=chunk))
            if response.sw != SW_OK or not response.data:
                raise CardStatusError("READ BINARY", response.sw)
            data += response.data
        return data[:size]

    async def _read_transparent(self, fid: int, *, from_mf: bool = False, optional: bool = False) -> bytes | None:
        fcp = await self.select_file(fid, from_mf=from_mf, optional=optional)
        if fcp is None:
            return None
        if fcp.file_size is None:
            raise ApduParseError(f"FCP of {fid:04X} has no file size")
        return await self._read_binary(fcp.file_size)

    async def _update_binary(self, data: bytes) -> None:
        for offset in range(0, len(data), 255):
            chunk = data[offset : offset + 255]
            response = await exchange(self.transport, Apdu(0x00, 0xD6, offset >> 8, offset & 0xFF, chunk))
            if response.sw != SW_OK:
                raise CardStatusError("UPDATE BINARY", response.sw)


def _gbabp_size(fcp: files.Fcp) -> int:
    if fcp.file_size is None:
        raise ApduParseError("FCP of EF_GBABP has no file size")
    return fcp.file_size
