"""APDU transports over the AT port: AT+CSIM and AT+CCHO/AT+CGLA/AT+CCHC, and the probe that picks one.

Why two: the basic channel belongs to the modem's own stack, and some modems re-select files on it
between AT+CSIM commands, so a logical channel of our own is better (``docs/MODEMS.md``).
AT+CGLA gives one directly; where it is missing (Dell DW5821e, Huawei MS2372h...) MANAGE CHANNEL
through AT+CSIM gives one too; and where the modem forbids even that, AT+CSIM on the basic channel
is the last resort (:attr:`ApduTransport.basic_channel` tells the card to re-select its application
before each AUTHENTICATE then).

The probe sends only MANAGE CHANNEL, AT+CCHO (which selects the USIM by its partial AID), SELECT and
STATUS: never an AUTHENTICATE, which would burn a sequence number or count as a MAC failure.
"""

from __future__ import annotations

import logging
from typing import Protocol

from mn_secd.errors import (
    AtCommandError,
    AtParseError,
    AuthenticateOutcomeUnknown,
    AuthenticateRefused,
    MnSecdError,
    ModemTimeout,
    PortGoneError,
    TransportUnavailable,
    UiccAbsent,
)
from mn_secd.uicc import at
from mn_secd.uicc.apdu import Apdu, Done, Response, T0Exchange, parse_response
from mn_secd.uicc.options import TransportChoice
from mn_secd.uicc.serial import AtCommandPort

logger = logging.getLogger(__name__)

#: A silent capability probe must not hold start-up for the whole command timeout (lpac PR #447).
PROBE_TIMEOUT = 3.0
#: STATUS, "no indication", no data back: the cheapest APDU that proves a path to the card works.
STATUS_PROBE = Apdu(0x80, 0xF2, 0x00, 0x0C)
#: SELECT MF without response data: the probe on a logical channel.
SELECT_MF_PROBE = Apdu(0x00, 0xA4, 0x00, 0x0C, bytes.fromhex("3F00"))
MANAGE_CHANNEL_OPEN = Apdu(0x00, 0x70, 0x00, 0x00, le=1)


def _close_channel_apdu(channel: int) -> Apdu:
    return Apdu(0x00, 0x70, 0x80, channel)


class ApduTransport(Protocol):
    """One path for APDUs to the card, on one channel.

    :meth:`transmit` raises :class:`~mn_secd.errors.UiccAbsent` when there is no card; any other
    failure is the path's own (:class:`~mn_secd.errors.MnSecdError`), which :meth:`one_shot_error`
    interprets for a command that must not be resent.
    """

    name: str  # "csim" or "cgla"; "pcsc" for a reader (mn_secd.uicc.pcsc)

    @property
    def channel(self) -> int:
        """The logical channel our commands run on (0: the basic channel)."""

    @property
    def basic_channel(self) -> bool:
        """True when commands share the modem's basic channel (selection may not stick)."""

    async def transmit(self, apdu: Apdu, *, timeout: float | None = None) -> bytes:
        """One APDU, one AT command: the raw response (data + SW1 SW2)."""

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        """What ``exc`` from sending ``what`` (an AUTHENTICATE, never resent) means for its outcome:
        :class:`~mn_secd.errors.AuthenticateRefused` if the command surely never reached the card,
        :class:`~mn_secd.errors.AuthenticateOutcomeUnknown` if it may have, else ``exc`` itself."""

    async def close(self) -> None:
        """Give the channel back to the card (best effort: the card may be gone)."""


def check_absent(exc: AtCommandError) -> None:
    """``+CME ERROR: 10`` means no SIM: a different failure from "this command is not supported"."""
    if exc.cme == at.CME_SIM_NOT_INSERTED:
        raise UiccAbsent("no SIM in the modem (+CME ERROR: 10)") from exc


#: ``+CME ERROR`` codes on AUTHENTICATE that mean "this modem will not pass it" (Moxa, old Siemens).
_REFUSING_CME = frozenset({at.CME_NOT_ALLOWED, at.CME_NOT_SUPPORTED})


def at_one_shot_error(exc: MnSecdError, what: str) -> MnSecdError:
    """:meth:`ApduTransport.one_shot_error` for both AT transports.

    Silence, a lost port or an unreadable answer after the command went out: the card may have run
    it (and consumed a sequence number). ``ERROR`` or ``+CME ERROR: 3/4``: the modem would not pass
    it on. Any other ``+CME ERROR`` stays what it is.
    """
    if isinstance(exc, ModemTimeout | PortGoneError | AtParseError):
        return AuthenticateOutcomeUnknown(f"{what} sent, no usable answer: {exc}")
    if isinstance(exc, AtCommandError) and (exc.cme in _REFUSING_CME or (exc.cme is None and exc.text is None)):
        return AuthenticateRefused(f"the modem refused {what} ({exc})")
    return exc


async def _at_command(port: AtCommandPort, command: at.Command, timeout: float | None) -> list[str]:
    """One AT command carrying an APDU; ``+CME ERROR: 10`` (no SIM) becomes UiccAbsent."""
    try:
        return await port.command(command, timeout=timeout)
    except AtCommandError as exc:
        check_absent(exc)
        raise


class CsimTransport:
    """AT+CSIM. The channel is coded in CLA by us; 0 means the basic channel."""

    name = "csim"

    def __init__(self, port: AtCommandPort, channel: int = 0) -> None:
        self._port = port
        self._channel = channel

    @property
    def channel(self) -> int:
        return self._channel

    @property
    def basic_channel(self) -> bool:
        return self._channel == 0

    async def transmit(self, apdu: Apdu, *, timeout: float | None = None) -> bytes:
        lines = await _at_command(self._port, at.csim(apdu.on_channel(self._channel).encode()), timeout)
        return at.parse_csim(lines)

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        return at_one_shot_error(exc, what)

    async def open_logical_channel(self, *, timeout: float | None = None) -> bool:
        """MANAGE CHANNEL through AT+CSIM; False (and the basic channel) when the modem or card refuses."""
        try:
            response = parse_response(await CsimTransport(self._port).transmit(MANAGE_CHANNEL_OPEN, timeout=timeout))
        except AtCommandError as exc:
            logger.info("MANAGE CHANNEL via AT+CSIM refused: %s", exc, extra={"event": "uicc.no_manage_channel"})
            return False
        if response.sw != 0x9000 or len(response.data) != 1 or not 1 <= response.data[0] <= 19:
            logger.info("card refused MANAGE CHANNEL (SW %04X)", response.sw, extra={"event": "uicc.no_manage_channel"})
            return False
        self._channel = response.data[0]
        return True

    async def close(self) -> None:
        if self._channel == 0:
            return
        channel, self._channel = self._channel, 0
        try:
            await CsimTransport(self._port).transmit(_close_channel_apdu(channel))
        except Exception as exc:  # closing is best effort; the card or the port may be gone
            logger.info("closing channel %d failed: %s", channel, exc, extra={"event": "uicc.close_failed"})


class CglaTransport:
    """AT+CCHO / AT+CGLA / AT+CCHC: the modem owns the channel and codes it in CLA itself."""

    name = "cgla"

    def __init__(self, port: AtCommandPort, session: str) -> None:
        self._port = port
        self.session = session  # exactly as AT+CCHO gave it (a number, or a Sierra handle)

    @property
    def channel(self) -> int:
        return 0  # CLA goes out with channel bits 0; the modem sets them (TS 27.007 +CGLA)

    @property
    def basic_channel(self) -> bool:
        return False

    @classmethod
    async def open(cls, port: AtCommandPort, aid: bytes, *, timeout: float | None = None) -> CglaTransport:
        """AT+CCHO with ``aid`` (a partial AID works): the modem opens a channel and selects it."""
        return cls(port, at.parse_ccho(await port.command(at.ccho(aid), timeout=timeout)))

    async def transmit(self, apdu: Apdu, *, timeout: float | None = None) -> bytes:
        lines = await _at_command(self._port, at.cgla(self.session, apdu.on_channel(0).encode()), timeout)
        return at.parse_cgla(lines)

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        return at_one_shot_error(exc, what)

    async def close(self) -> None:
        try:
            await self._port.command(at.cchc(self.session))
        except Exception as exc:  # Sierra EM9191 has no AT+CCHC; the card or the port may be gone
            logger.info("AT+CCHC failed: %s", exc, extra={"event": "uicc.close_failed"})


async def exchange(
    transport: ApduTransport, apdu: Apdu, *, may_resend: bool = True, timeout: float | None = None
) -> Response:
    """One command with its T=0 follow-ups (GET RESPONSE, wrong-Le resend), on the transport's channel."""
    procedure = T0Exchange(apdu.on_channel(transport.channel), may_resend=may_resend)
    step_apdu = procedure.start()
    while True:
        step = procedure.receive(await transport.transmit(step_apdu, timeout=timeout))
        if isinstance(step, Done):
            return step.response
        step_apdu = step.apdu


async def _usable(transport: ApduTransport, timeout: float) -> bool:
    """Any status word proves the path to the card works; an AT error or silence does not.

    On a logical channel the probe is SELECT MF without response data (Quectel EG25 fails STATUS on
    a logical channel through AT+CSIM); on the basic channel it is STATUS, which selects nothing
    under the modem's own stack.
    """
    probe = STATUS_PROBE if transport.basic_channel else SELECT_MF_PROBE
    try:
        await transport.transmit(probe, timeout=timeout)
    except AtCommandError as exc:
        logger.info("%s probe failed: %s", transport.name, exc, extra={"event": "uicc.probe_failed"})
        return False
    except ModemTimeout:
        logger.info("%s probe got no answer", transport.name, extra={"event": "uicc.probe_failed"})
        return False
    return True


async def _try_cgla(port: AtCommandPort, aid: bytes, timeout: float) -> CglaTransport | None:
    try:
        transport = await CglaTransport.open(port, aid, timeout=timeout)
    except AtCommandError as exc:
        check_absent(exc)
        logger.info("AT+CCHO refused: %s", exc, extra={"event": "uicc.no_cgla"})
        return None
    except ModemTimeout:
        logger.info("AT+CCHO got no answer", extra={"event": "uicc.no_cgla"})
        return None
    if await _usable(transport, timeout):
        return transport
    await transport.close()
    return None


async def _try_csim(port: AtCommandPort, timeout: float) -> CsimTransport | None:
    transport = CsimTransport(port)
    try:
        logical = await transport.open_logical_channel(timeout=timeout)
    except ModemTimeout:
        logical = False
    if logical:
        if await _usable(transport, timeout):
            return transport
        await transport.close()  # back to the basic channel
    return transport if await _usable(transport, timeout) else None


async def open_transport(port: AtCommandPort, preference: TransportChoice, aid: bytes) -> ApduTransport:
    """Pick and open a transport: ``cgla`` (AT+CCHO with ``aid``), ``csim``, or ``auto`` (CGLA, then CSIM)."""
    timeout = min(port.command_timeout, PROBE_TIMEOUT)
    if preference in (TransportChoice.AUTO, TransportChoice.CGLA):
        cgla = await _try_cgla(port, aid, timeout)
        if cgla is not None:
            return cgla
        if preference == TransportChoice.CGLA:
            raise TransportUnavailable("AT+CCHO/AT+CGLA do not work on this modem")
    csim = await _try_csim(port, timeout)
    if csim is None:
        raise TransportUnavailable("neither AT+CGLA nor AT+CSIM work on this modem")
    return csim
