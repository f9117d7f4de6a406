"""The card as the daemon sees it: identity, AUTHENTICATE, GBA_U operations, and card events.

Start-up (and every re-insertion or port return) runs once: ``AT+CPIN?``; a transport from the
probe (AT+CGLA, or AT+CSIM with MANAGE CHANNEL, or AT+CSIM on the basic channel); EF_DIR and
EF_ICCID; the USIM's EF_IMSI, EF_AD and EF_UST; the ISIM's EF_IMPI and EF_IST when the ISIM is the
application in use. That application is left selected on our channel, so an AUTHENTICATE afterwards
is one AT command (two with GET RESPONSE) and never a re-SELECT -- except on the basic channel,
where the modem may have selected something else in between.

An AUTHENTICATE is never sent twice: a timeout, a lost port or an unreadable answer after sending it
raise :class:`~mn_secd.errors.AuthenticateOutcomeUnknown` (the card may have consumed the SQN), and
the T=0 procedure does not resend it on ``6Cxx``.

Card events: REMOVED on a SIM-removed URC, on ``+CME ERROR: 10`` or when the port goes; then the
card is looked for again (at once on an insertion URC or when the port returns, else by polling
``AT+CPIN?``) and INSERTED or CHANGED is sent once its identity has been re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.cards import Application, CardEvent, CardEventKind, CardIdentity
from mn_secd.errors import (
    ApduParseError,
    ApplicationNotFound,
    AtCommandError,
    AtParseError,
    AuthenticateOutcomeUnknown,
    AuthenticateRefused,
    CardStatusError,
    MnSecdError,
    ModemTimeout,
    PortGoneError,
    UiccAbsent,
    UiccError,
    UiccLocked,
)
from mn_secd.nai import impi_from_imsi
from mn_secd.observers import Subscribers
from mn_secd.uicc import at, files
from mn_secd.uicc.apdu import Apdu, Response, parse_apdu
from mn_secd.uicc.auth import (
    build_authenticate,
    build_gba_naf_derivation,
    parse_authenticate_response,
    parse_naf_derivation_response,
)
from mn_secd.uicc.serial import AtPort
from mn_secd.uicc.transport import TRANSPORTS, ApduTransport, check_absent, exchange, open_transport

logger = logging.getLogger(__name__)

APPLICATIONS = ("auto", "isim", "usim")
SW_FILE_NOT_FOUND = 0x6A82
#: ``+CME ERROR`` codes on AUTHENTICATE that mean "this modem will not pass it" (Moxa, old Siemens).
_REFUSING_CME = frozenset({at.CME_NOT_ALLOWED, at.CME_NOT_SUPPORTED})
_FID_EF_GBABP_ISIM = 0x6FD5


def urc_presence(line: str) -> bool | None:
    """What a URC says about the SIM: True inserted, False removed, None nothing."""
    name, sep, value = line.partition(":")
    if not sep:
        return None
    name, value = name.strip().upper(), value.strip().strip('"').upper()
    if name == "+CPIN":
        return value not in ("NOT READY", "NOT INSERTED", "SIM REMOVED")
    if name == "+SIMCARD":
        return value == "AVAILABLE"
    if name == "+QSIMSTAT":  # Quectel: <enable>,<inserted>
        return value.replace(" ", "").endswith(",1")
    if name == "^SIMST":  # Huawei: 255 = no card
        return value != "255"
    return None


class Card:
    """The UICC behind the modem's AT port; implements :class:`mn_secd.interfaces.CardAccess`.

    Build it with :func:`open_card`.
    """

    def __init__(
        self,
        port: str,
        *,
        baud: int = 115200,
        transport: str = "auto",
        application: str = "auto",
        command_timeout: float = 5.0,
        presence_poll: float = 2.0,
        reopen_max: float = 5.0,
    ) -> None:
        if application not in APPLICATIONS:
            raise ValueError(f"application must be one of {', '.join(APPLICATIONS)}, not {application!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self._transport_preference = transport
        self._application_preference = application
        self._presence_poll = presence_poll
        self._port = AtPort(
            port,
            baud=baud,
            command_timeout=command_timeout,
            on_urc=self._on_urc,
            on_state=self._on_port_state,
            reopen_max=reopen_max,
        )
        self._lock = asyncio.Lock()  # one card operation (several AT commands) at a time
        self._transport: ApduTransport | None = None
        self._identity: CardIdentity | None = None
        self._last_identity: CardIdentity | None = None
        self._generation = 0  # bumped on every removal: an identity read across one is void
        self._wake = asyncio.Event()
        self._subscribers = Subscribers[CardEvent](logger, "uicc.callback_error")
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    # --- life cycle --------------------------------------------------------------------------------

    async def _start(self) -> None:
        await self._port.open()
        try:
            async with self._lock:
                await self._bring_up(emit=False)
        except BaseException:
            await self._port.close()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Give the logical channel back and release the port."""
        if self._closed:
            return
        self._closed = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        transport, self._transport = self._transport, None
        if transport is not None and self._port.connected:
            async with self._lock:
                await transport.close()
        await self._port.close()

    @property
    def transport_name(self) -> str | None:
        return self._transport.name if self._transport is not None else None

    @property
    def port(self) -> AtPort:
        """The AT port (read-only use: diagnostics and the benchmark count commands on it)."""
        return self._port

    # --- CardAccess ---------------------------------------------------------------------------------

    async def identity(self) -> CardIdentity:
        """The identity read at start-up or at the last insertion; looks for the card once if absent."""
        if self._identity is not None:
            return self._identity
        self._require_port()
        async with self._lock:
            if self._identity is None:
                await self._bring_up(emit=True)
            assert self._identity is not None
            return self._identity

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        """Exactly one AUTHENTICATE (3G context or GBA bootstrapping mode); never resent."""
        command = parse_apdu(build_authenticate(rand, autn, context))
        async with self._lock:
            transport, identity = self._ready()
            if transport.basic_channel:  # the modem may have selected another file on channel 0
                await self._select_aid(transport, identity.aid, fcp=False)
            response = await self._run_once(transport, command, "AUTHENTICATE")
            return parse_authenticate_response(response.data, response.sw, context)

    async def gba_naf_derivation(self, naf_id: bytes, impi: str) -> bytes:
        """GBA_U NAF derivation (``DE``): Ks_ext_NAF; the card must hold a Ks from a GBA bootstrap."""
        command = parse_apdu(build_gba_naf_derivation(naf_id, impi))
        async with self._lock:
            transport, identity = self._ready()
            if transport.basic_channel:
                await self._select_aid(transport, identity.aid, fcp=False)
            response = await self._run_once(transport, command, "AUTHENTICATE (NAF derivation)")
            return parse_naf_derivation_response(response.data, response.sw)

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        """B-TID and lifetime into EF_GBABP, keeping the RAND the card wrote there during the bootstrap."""
        async with self._lock:
            transport, identity = self._ready()
            if identity.application is Application.ISIM:
                fcp = await self._select_file(transport, _FID_EF_GBABP_ISIM, optional=True)
                if fcp is not None:
                    await self._rewrite_gbabp(transport, fcp, btid, lifetime)
                    return
            usim = next((aid for app, aid in identity.applications if app is Application.USIM), None)
            if usim is None:
                raise ApplicationNotFound("no EF_GBABP: the card has no USIM and its ISIM has none")
            if usim != identity.aid:
                await self._select_aid(transport, usim)
            try:
                fcp = await self._select_file(transport, files.FID_EF_GBABP_USIM)
                assert fcp is not None
                await self._rewrite_gbabp(transport, fcp, btid, lifetime)
            finally:
                if usim != identity.aid:
                    await self._select_aid(transport, identity.aid)

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    # --- presence -------------------------------------------------------------------------------------

    def _emit(self, event: CardEvent) -> None:
        logger.info("card %s", event.kind.value, extra={"event": f"uicc.card_{event.kind.value}"})
        self._subscribers.emit(event)

    def _mark_absent(self, reason: str) -> None:
        self._generation += 1
        self._transport = None  # its channel went with the card (or the modem)
        was_present, self._identity = self._identity is not None, None
        if was_present:
            logger.info("card gone: %s", reason, extra={"event": "uicc.card_gone"})
            self._emit(CardEvent(CardEventKind.REMOVED))
        self._wake.set()

    def _on_urc(self, line: str) -> None:
        presence = urc_presence(line)
        if presence is False:
            self._mark_absent(f"URC {line}")
        elif presence is True and self._identity is None:
            self._wake.set()

    def _on_port_state(self, up: bool) -> None:
        if up:
            self._wake.set()
        else:
            self._mark_absent("port gone")

    async def _supervise(self) -> None:
        """While the card is away: look for it on a hint (URC, port back) or every ``presence_poll`` s."""
        while not self._closed:
            if self._identity is not None:
                self._wake.clear()
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._presence_poll):
                    await self._wake.wait()
            self._wake.clear()
            if not self._port.connected:
                continue
            try:
                async with self._lock:
                    if self._identity is None:
                        await self._bring_up(emit=True)
            except MnSecdError as exc:
                logger.debug("card not usable yet: %s", exc, extra={"event": "uicc.card_not_ready"})
            except Exception:  # a bug must not end the watch over the card; try again at the next poll
                logger.exception("looking for the card failed", extra={"event": "uicc.supervisor_error"})

    async def _bring_up(self, *, emit: bool) -> None:
        """Find the card, open a transport, read the identity (caller holds the lock)."""
        generation = self._generation
        await self._check_pin()
        transport = await open_transport(self._port, self._transport_preference, files.USIM_AID_PREFIX)
        try:
            identity = await self._read_identity(transport)
        except BaseException:
            with contextlib.suppress(Exception):
                await transport.close()
            raise
        if generation != self._generation:  # removed while we read: what we read is void
            raise UiccAbsent("the card went away during start-up")
        previous = self._last_identity
        self._transport, self._identity, self._last_identity = transport, identity, identity
        logger.info(
            "card ready: %s over %s (channel %d)",
            identity.application.value,
            transport.name,
            transport.channel,
            extra={"event": "uicc.card_ready", "transport": transport.name},
        )
        if emit:
            same = previous is None or (previous.iccid, previous.impi) == (identity.iccid, identity.impi)
            self._emit(CardEvent(CardEventKind.INSERTED if same else CardEventKind.CHANGED, identity))

    async def _check_pin(self) -> None:
        try:
            state = at.parse_cpin(await self._port.command(at.query("AT+CPIN?", "+CPIN:")))
        except AtCommandError as exc:
            check_absent(exc)
            raise
        if state in ("NOT READY", "NOT INSERTED"):
            raise UiccAbsent(f"no SIM in the modem (+CPIN: {state})")
        if state != "READY":
            raise UiccLocked(state)

    def _require_port(self) -> None:
        if self._closed:
            raise PortGoneError(f"{self._port.path}: card closed")
        if not self._port.connected:
            raise PortGoneError(f"{self._port.path}: port gone")

    def _ready(self) -> tuple[ApduTransport, CardIdentity]:
        self._require_port()
        if self._transport is None or self._identity is None:
            raise UiccAbsent("no usable card in the modem")
        return self._transport, self._identity

    # --- APDU helpers -------------------------------------------------------------------------------

    async def _exchange(self, transport: ApduTransport, apdu: Apdu) -> Response:
        try:
            return await exchange(transport, apdu)
        except AtCommandError as exc:
            if exc.cme == at.CME_SIM_NOT_INSERTED:
                self._mark_absent("+CME ERROR: 10")
            check_absent(exc)
            raise

    async def _run_once(self, transport: ApduTransport, command: Apdu, what: str) -> Response:
        """An AUTHENTICATE: no resend on ``6Cxx``, and an unknown outcome is said to be unknown."""
        try:
            return await exchange(transport, command, may_resend=False)
        except (ModemTimeout, PortGoneError, AtParseError) as exc:
            raise AuthenticateOutcomeUnknown(f"{what} sent, no usable answer: {exc}") from exc
        except AtCommandError as exc:
            if exc.cme == at.CME_SIM_NOT_INSERTED:
                self._mark_absent("+CME ERROR: 10")
            check_absent(exc)
            if exc.cme in _REFUSING_CME or (exc.cme is None and exc.text is None):
                raise AuthenticateRefused(f"the modem refused {what} ({exc})") from exc
            raise

    async def _select_aid(self, transport: ApduTransport, aid: bytes, *, fcp: bool = True) -> None:
        """SELECT an application; ``fcp=False`` asks for no data (P2 0C): one AT command, no GET RESPONSE."""
        command = Apdu(0x00, 0xA4, 0x04, 0x04, aid, le=256) if fcp else Apdu(0x00, 0xA4, 0x04, 0x0C, aid)
        response = await self._exchange(transport, command)
        if response.sw == SW_FILE_NOT_FOUND:
            raise ApplicationNotFound(f"SELECT of application {aid[:7].hex().upper()}... failed (6A82)")
        if response.sw != 0x9000:
            raise CardStatusError("SELECT application", response.sw)

    async def _select_file(
        self, transport: ApduTransport, fid: int, *, from_mf: bool = False, optional: bool = False
    ) -> files.Fcp | None:
        """SELECT by FID under the current ADF/DF, or by path from the MF; None if optional and absent."""
        p1 = 0x08 if from_mf else 0x00
        response = await self._exchange(transport, Apdu(0x00, 0xA4, p1, 0x04, fid.to_bytes(2, "big"), le=256))
        if response.sw == SW_FILE_NOT_FOUND and optional:
            return None
        if response.sw != 0x9000:
            raise CardStatusError(f"SELECT {fid:04X}", response.sw)
        return files.parse_fcp(response.data)

    async def _read_binary(self, transport: ApduTransport, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = min(size - len(data), 256)
            offset = len(data)
            response = await self._exchange(transport, Apdu(0x00, 0xB0, offset >> 8, offset & 0xFF, le=chunk))
            if response.sw != 0x9000 or not response.data:
                raise CardStatusError("READ BINARY", response.sw)
            data += response.data
        return data[:size]

    async def _read_transparent(
        self, transport: ApduTransport, fid: int, *, from_mf: bool = False, optional: bool = False
    ) -> bytes | None:
        fcp = await self._select_file(transport, fid, from_mf=from_mf, optional=optional)
        if fcp is None:
            return None
        if fcp.file_size is None:
            raise ApduParseError(f"FCP of {fid:04X} has no file size")
        return await self._read_binary(transport, fcp.file_size)

    async def _update_binary(self, transport: ApduTransport, data: bytes) -> None:
        for offset in range(0, len(data), 255):
            chunk = data[offset : offset + 255]
            response = await self._exchange(transport, Apdu(0x00, 0xD6, offset >> 8, offset & 0xFF, chunk))
            if response.sw != 0x9000:
                raise CardStatusError("UPDATE BINARY", response.sw)

    async def _rewrite_gbabp(self, transport: ApduTransport, fcp: files.Fcp, btid: str, lifetime: str) -> None:
        if fcp.file_size is None:
            raise ApduParseError("FCP of EF_GBABP has no file size")
        current = files.decode_gbabp(await self._read_binary(transport, fcp.file_size))
        new = files.encode_gbabp(replace(current, btid=btid, lifetime=lifetime))
        if len(new) > fcp.file_size:
            raise UiccError(f"EF_GBABP holds {fcp.file_size} octets, B-TID and lifetime need {len(new)}")
        await self._update_binary(transport, new + b"\xff" * (fcp.file_size - len(new)))

    # --- identity ---------------------------------------------------------------------------------

    async def _read_dir(self, transport: ApduTransport) -> list[files.DirEntry]:
        fcp = await self._select_file(transport, files.FID_EF_DIR, from_mf=True)
        assert fcp is not None
        if fcp.record_length is None or fcp.record_count is None:
            raise ApduParseError("EF_DIR is not a record file")
        entries: list[files.DirEntry] = []
        for number in range(1, fcp.record_count + 1):
            response = await self._exchange(transport, Apdu(0x00, 0xB2, number, 0x04, le=fcp.record_length))
            if response.sw != 0x9000:
                raise CardStatusError(f"READ RECORD {number} of EF_DIR", response.sw)
            try:
                entry = files.parse_dir_record(response.data)
            except ApduParseError as exc:  # one odd template must not hide the others
                logger.warning("EF_DIR record %d skipped: %s", number, exc, extra={"event": "uicc.bad_dir_record"})
                continue
            if entry is not None:
                entries.append(entry)
        return entries

    async def _read_identity(self, transport: ApduTransport) -> CardIdentity:
        apps = files.applications(await self._read_dir(transport))
        app, aid = files.choose_application(apps, self._application_preference)
        iccid_raw = await self._read_transparent(transport, files.FID_EF_ICCID, from_mf=True)
        assert iccid_raw is not None
        iccid = files.decode_iccid(iccid_raw)
        usim = next((a for kind, a in apps if kind is Application.USIM), None)
        ust: bytes | None = None
        if usim is not None:
            await self._select_aid(transport, usim)
            imsi_raw = await self._read_transparent(transport, files.FID_EF_IMSI)
            assert imsi_raw is not None
            imsi = files.decode_imsi(imsi_raw)
            ad = await self._read_transparent(transport, files.FID_EF_AD, optional=True)
            ust = await self._read_transparent(transport, files.FID_EF_UST, optional=True)
        else:  # an ISIM-only card: the modem still knows the IMSI
            imsi = at.parse_cimi(await self._port.command(at.cimi()))
            ad = None
        if app is Application.ISIM:
            await self._select_aid(transport, aid)
            impi_raw = await self._read_transparent(transport, files.FID_EF_IMPI)
            assert impi_raw is not None
            impi = files.decode_nai(impi_raw)
            if ad is None:
                ad = await self._read_transparent(transport, files.FID_EF_AD, optional=True)
            ist = await self._read_transparent(transport, files.FID_EF_IST, optional=True)
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
            transport=transport.name,
            applications=apps,
        )


async def open_card(
    port: str,
    *,
    baud: int = 115200,
    transport: str = "auto",
    application: str = "auto",
    command_timeout: float = 5.0,
    presence_poll: float = 2.0,
    reopen_max: float = 5.0,
) -> Card:
    """Open the AT port and bring the card up (identity read, application selected on our channel).

    Whatever stops start-up raises and leaves nothing open (PortGoneError, UiccAbsent, UiccLocked,
    TransportUnavailable, ApplicationNotFound, ...): the caller retries with its own back-off. Once
    open, the Card follows removals, insertions and a vanishing port by itself (card events).
    """
    card = Card(
        port,
        baud=baud,
        transport=transport,
        application=application,
        command_timeout=command_timeout,
        presence_poll=presence_poll,
        reopen_max=reopen_max,
    )
    await card._start()
    return card
