"""APDU transports over the AT port: AT+CSIM and AT+CCHO/AT+CGLA/AT+CCHC, and the probe that picks one.

Why two: the basic channel belongs to the modem's own stack, and some modems re-select files on it
between AT+CSIM commands, so a logical channel of our own is better (``docs/MODEMS.md``).
AT+CGLA gives one directly; where it is missing (Dell DW5821e, Huawei MS2372h...) MANAGE CHANNEL
through AT+CSIM gives one too; and where the modem forbids even that, AT+CSIM on the basic channel
is the last resort (:attr:`ApduTransport.basic_channel` tells the card to re-select its application
before each AUTHENTICATE then).

The probe sends only MANAGE CHANNEL, AT+CCHO (which selects the USIM by its partial AID), SELECT of
the MF and GET RESPONSE: never an AUTHENTICATE, which would burn a sequence number or count as a MAC
failure. A path counts only if the GET RESPONSE that fetches an answer gets through too: Wavecom
based modems (Moxa's manual lists them) refuse GET RESPONSE and AUTHENTICATE through AT+CSIM with
``+CME ERROR: 3``, and GBA is then impossible on that path. What each path answered is kept
(:class:`PathFinding`), for the error that says no path works and for ``mn-secd doctor``.

Some modems lose answers: Quectel EG95 was reported answering ``+CME ERROR: 0`` and dropping
``+CSIM`` answers. :func:`exchange` sends such a command again (twice at most) only when running it
twice is harmless (:func:`~mn_secd.uicc.apdu.idempotent`); an AUTHENTICATE never.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from mn_secd.errors import (
    AnswerLost,
    AtCommandError,
    AtParseError,
    AuthenticateOutcomeUnknown,
    MnSecdError,
    ModemTimeout,
    PathRefusedAuthenticate,
    PortGoneError,
    TransportUnavailable,
    UiccAbsent,
    UiccBusy,
)
from mn_secd.uicc import at
from mn_secd.uicc.apdu import Apdu, Done, Response, T0Exchange, idempotent, parse_response
from mn_secd.uicc.options import TransportChoice
from mn_secd.uicc.serial import AtCommandPort

logger = logging.getLogger(__name__)

#: A silent capability probe must not hold start-up for the whole command timeout (lpac PR #447).
PROBE_TIMEOUT = 3.0
#: SELECT MF asking for its FCP: the card answers ``61xx`` (or the modem fetches it), so one probe
#: proves both the path and the GET RESPONSE that every AUTHENTICATE answer needs. On the basic
#: channel it leaves the MF selected, which is where the modem's own stack expects it (old Siemens
#: firmware selects the MF after every AT+CSIM for that reason).
SELECT_MF_PROBE = Apdu(0x00, 0xA4, 0x00, 0x04, bytes.fromhex("3F00"), le=256)
MANAGE_CHANNEL_OPEN = Apdu(0x00, 0x70, 0x00, 0x00, le=1)
#: How often a command whose answer the modem lost is sent again (idempotent commands only).
LOST_ANSWER_RETRIES = 2


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
        :class:`~mn_secd.errors.PathRefusedAuthenticate` if the command surely never reached the card,
        :class:`~mn_secd.errors.AuthenticateOutcomeUnknown` if it may have, else ``exc`` itself."""

    async def close(self) -> None:
        """Give the channel back to the card (best effort: the card may be gone)."""


def check_absent(exc: AtCommandError) -> None:
    """``+CME ERROR: 10`` means no SIM, ``14`` a SIM the modem is still reading (just after power-up
    or insertion): different failures from "this command is not supported"."""
    if exc.cme == at.CME_SIM_NOT_INSERTED:
        raise UiccAbsent("SIM not inserted (+CME ERROR: 10)") from exc
    if exc.cme == at.CME_SIM_BUSY:
        raise UiccBusy("SIM busy (+CME ERROR: 14): the modem is still reading the SIM") from exc


@dataclass(frozen=True, slots=True)
class PathFinding:
    """What one way to the card answered during the probe (for errors and ``mn-secd doctor``)."""

    path: str  # "AT+CGLA", "AT+CSIM (logical channel)", "AT+CSIM (basic channel)"
    works: bool
    answer: str  # "ok", "+CME ERROR: 4", "GET RESPONSE refused (+CME ERROR: 3)", ...

    def describe(self) -> str:
        return f"{self.path}: {'works' if self.works else self.answer}"


#: ``+CME ERROR`` codes on AUTHENTICATE that mean "this modem will not pass it" (Moxa, old Siemens).
_REFUSING_CME = frozenset({at.CME_NOT_ALLOWED, at.CME_NOT_SUPPORTED})


def at_one_shot_error(exc: MnSecdError, what: str) -> MnSecdError:
    """:meth:`ApduTransport.one_shot_error` for both AT transports.

    Silence, a lost port or an unreadable answer after the command went out: the card may have run
    it (and consumed a sequence number). ``ERROR`` or ``+CME ERROR: 3/4``: the modem would not pass
    it on. Any other ``+CME ERROR`` stays what it is.
    """
    if isinstance(exc, ModemTimeout | PortGoneError | AtParseError | AnswerLost):
        return AuthenticateOutcomeUnknown(f"{what} sent, no usable answer: {exc}")
    if isinstance(exc, AtCommandError) and (exc.cme in _REFUSING_CME or (exc.cme is None and exc.text is None)):
        return PathRefusedAuthenticate(f"the modem refused {what} ({exc}): it will not pass AUTHENTICATE on this path")
    return exc


async def _at_command(port: AtCommandPort, command: at.Command, timeout: float | None) -> list[str]:
    """One AT command carrying an APDU: ``+CME ERROR: 10``/``14`` become UiccAbsent/UiccBusy, and
    ``+CME ERROR: 0`` (phone failure, as Quectel EG95 answers when it drops a command) AnswerLost."""
    try:
        return await port.command(command, timeout=timeout)
    except AtCommandError as exc:
        check_absent(exc)
        if exc.cme == at.CME_PHONE_FAILURE:
            raise AnswerLost(f"{exc}: the modem lost the answer; the card may have run the command") from exc
        raise


def _response(lines: list[str], parse: Callable[[list[str]], bytes], command: str) -> bytes:
    """The response APDU from the answer's lines; none, or a garbled one, is an answer lost."""
    try:
        return parse(lines)
    except AtParseError as exc:
        raise AnswerLost(f"{command}: no usable answer line ({exc}); the card may have run the command") from exc


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
        return _response(lines, at.parse_csim, "AT+CSIM")

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        return at_one_shot_error(exc, what)

    async def open_logical_channel(self, *, timeout: float | None = None) -> bool:
        """MANAGE CHANNEL through AT+CSIM; False (and the basic channel) when the modem or card refuses.

        Never sent twice: a lost answer may hide a channel the card opened, which stays open until
        the card is reset (the basic channel is used meanwhile).
        """
        try:
            response = parse_response(await CsimTransport(self._port).transmit(MANAGE_CHANNEL_OPEN, timeout=timeout))
        except AtCommandError as exc:
            logger.info("MANAGE CHANNEL via AT+CSIM refused: %s", exc, extra={"event": "uicc.no_manage_channel"})
            return False
        except AnswerLost as exc:
            logger.warning(
                "MANAGE CHANNEL answer lost (%s); using the basic channel",
                exc,
                extra={"event": "uicc.no_manage_channel"},
            )
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
        return _response(lines, at.parse_cgla, "AT+CGLA")

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
    """One command with its T=0 follow-ups (GET RESPONSE, wrong-Le resend), on the transport's channel.

    When the modem loses an answer (:class:`~mn_secd.errors.AnswerLost`) and running ``apdu`` again
    is harmless, the whole exchange starts over from ``apdu`` (a lost GET RESPONSE answer cannot be
    asked again: the card has handed it out), at most :data:`LOST_ANSWER_RETRIES` more times.
    """
    retries = 0
    while True:
        try:
            return await _exchange_once(transport, apdu, may_resend, timeout)
        except AnswerLost as exc:
            if not may_resend or not idempotent(apdu) or retries >= LOST_ANSWER_RETRIES:
                raise
            retries += 1
            logger.info(
                "answer lost (%s); sending INS %02X again", exc, apdu.ins, extra={"event": "uicc.answer_lost_retry"}
            )


async def _exchange_once(transport: ApduTransport, apdu: Apdu, may_resend: bool, timeout: float | None) -> Response:
    procedure = T0Exchange(apdu.on_channel(transport.channel), may_resend=may_resend)
    step_apdu = procedure.start()
    while True:
        step = procedure.receive(await transport.transmit(step_apdu, timeout=timeout))
        if isinstance(step, Done):
            return step.response
        step_apdu = step.apdu


def _answer(exc: MnSecdError) -> str:
    if isinstance(exc, AtCommandError):
        return str(exc).partition(" -> ")[2] or str(exc)
    if isinstance(exc, ModemTimeout):
        return "no answer"
    return f"{exc.kind}: {exc}"


async def _probe(transport: ApduTransport, timeout: float, path: str) -> PathFinding:
    """SELECT MF with its FCP, and the GET RESPONSE for it: any status word from the card proves the
    path (the MF's FCP is not needed); an AT error or silence on either step does not."""
    procedure = T0Exchange(SELECT_MF_PROBE.on_channel(transport.channel))
    step_apdu, what = procedure.start(), "SELECT"
    try:
        while True:
            step = procedure.receive(await transport.transmit(step_apdu, timeout=timeout))
            if isinstance(step, Done):
                return PathFinding(path, True, "ok")
            step_apdu = step.apdu
            what = "GET RESPONSE" if step_apdu.ins == 0xC0 else "SELECT"
    except (AtCommandError, ModemTimeout, AnswerLost) as exc:
        finding = PathFinding(path, False, f"{what} refused ({_answer(exc)})" if what != "SELECT" else _answer(exc))
        logger.info("%s", finding.describe(), extra={"event": "uicc.probe_failed"})
        return finding


async def _try_cgla(port: AtCommandPort, aid: bytes, timeout: float, found: list[PathFinding]) -> CglaTransport | None:
    try:
        transport = await CglaTransport.open(port, aid, timeout=timeout)
    except (AtCommandError, ModemTimeout, AtParseError) as exc:
        if isinstance(exc, AtCommandError):
            check_absent(exc)
        found.append(PathFinding("AT+CCHO", False, _answer(exc)))
        logger.info("AT+CCHO failed: %s", exc, extra={"event": "uicc.no_cgla"})
        return None
    finding = await _probe(transport, timeout, "AT+CGLA")
    found.append(finding)
    if finding.works:
        return transport
    await transport.close()
    return None


async def _try_csim(port: AtCommandPort, timeout: float, found: list[PathFinding]) -> CsimTransport | None:
    transport = CsimTransport(port)
    try:
        logical = await transport.open_logical_channel(timeout=timeout)
    except ModemTimeout:
        logical = False
    if logical:
        finding = await _probe(transport, timeout, "AT+CSIM (logical channel)")
        found.append(finding)
        if finding.works:
            return transport
        await transport.close()  # back to the basic channel
    else:
        found.append(PathFinding("MANAGE CHANNEL", False, "no logical channel through AT+CSIM"))
    finding = await _probe(transport, timeout, "AT+CSIM (basic channel)")
    found.append(finding)
    return transport if finding.works else None


async def open_transport(
    port: AtCommandPort,
    preference: TransportChoice,
    aid: bytes,
    *,
    findings: list[PathFinding] | None = None,
    avoid: frozenset[str] = frozenset(),
) -> ApduTransport:
    """Pick and open a transport: ``cgla`` (AT+CCHO with ``aid``), ``csim``, or ``auto`` (CGLA, then CSIM).

    With ``auto``, a transport named in ``avoid`` (the modem refused AUTHENTICATE on it) is passed
    over while another one works. What each path answered is appended to ``findings`` when given;
    TransportUnavailable names it.
    """
    timeout = min(port.command_timeout, PROBE_TIMEOUT)
    found = findings if findings is not None else []
    paths: dict[str, Callable[[], Awaitable[ApduTransport | None]]] = {
        CglaTransport.name: lambda: _try_cgla(port, aid, timeout, found),
        CsimTransport.name: lambda: _try_csim(port, timeout, found),
    }
    # auto: CGLA first, but a transport that refused AUTHENTICATE last
    order = sorted(paths, key=lambda name: name in avoid) if preference is TransportChoice.AUTO else [preference.value]
    for name in order:
        transport = await paths[name]()
        if transport is not None:
            return transport
    if preference is TransportChoice.CGLA:
        raise TransportUnavailable(
            f'AT+CCHO/AT+CGLA do not work on this modem ({_summary(found)}); try transport = "auto"'
        )
    hint = "" if preference is TransportChoice.AUTO else '; try transport = "auto"'
    raise TransportUnavailable(f"this modem cannot run GBA over AT: {_summary(found)}{hint}")


def _summary(found: list[PathFinding]) -> str:
    return "; ".join(f.describe() for f in found) or "no path tried"
