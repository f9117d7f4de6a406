"""APDUs through a PC/SC card reader (pcsc-lite's pcscd, through pyscard), beside AT+CSIM and AT+CGLA.

Labs test GBA with programmable SIMs in USB readers, and some gateways carry the SIM in a reader.
This transport keeps the :class:`~mn_secd.uicc.transport.ApduTransport` contract of the AT ones:

* The reader is the first whose name contains the configured text (case-insensitive); when
  several do, the one holding a card, else :class:`~mn_secd.errors.ReaderNotFound` names them.
  pcscd numbers readers in the order they appear, so the text should not include the number.
* The card is opened exclusively (like an AT port, it is the daemon's) and a logical channel is
  asked for with MANAGE CHANNEL; a card that refuses gets its basic channel, which is ours alone.
* T=0 stays with :func:`~mn_secd.uicc.transport.exchange` and :class:`~mn_secd.uicc.apdu.T0Exchange`:
  ``61xx`` and ``6Cxx`` come back to us as from a modem, so an AUTHENTICATE is never resent. Over
  T=0 a case-4 command goes out without Le (ISO/IEC 7816-3 §12.2.5: the card answers ``61xx``).
* pyscard blocks, so every call runs on the transport's own worker thread with a timeout. A
  command that was handed to pcscd and got no answer (card pulled, reader gone, timeout, an
  empty answer) raises :class:`~mn_secd.errors.ApduOutcomeUnknown` -- for an AUTHENTICATE,
  :meth:`PcscTransport.one_shot_error` makes that
  :class:`~mn_secd.errors.AuthenticateOutcomeUnknown`: it is never sent again, and the transport
  is dead from then on (:class:`~mn_secd.errors.UiccAbsent` or
  :class:`~mn_secd.errors.ReaderGone` without sending anything; its owner hears of the death
  through ``on_dead``).
* :class:`ReaderWatcher` follows the reader and its card with ``SCardGetStatusChange`` (bounded
  waits on its own context and thread) and reports card removal/insertion and the reader's
  disappearance/return as :class:`ReaderEvent`; when pcscd itself goes, it looks again with a
  back-off capped at ``reconnect_max`` seconds.

pyscard is optional (``pip install 'mn-secd[pcsc]'`` or Debian's ``python3-pyscard``): it is
imported only when PC/SC is asked for, and its absence is :class:`~mn_secd.errors.PcscUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from mn_secd.errors import (
    ApduOutcomeUnknown,
    AuthenticateOutcomeUnknown,
    Culprit,
    MnSecdError,
    PcscUnavailable,
    ReaderError,
    ReaderGone,
    ReaderNotFound,
    UiccAbsent,
)
from mn_secd.uicc.apdu import Apdu, parse_response

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: pcsc-lite's pseudo-reader whose state changes when a reader is plugged or unplugged.
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
MANAGE_CHANNEL_OPEN = Apdu(0x00, 0x70, 0x00, 0x00, le=1)
DEFAULT_TIMEOUT = 5.0

# PC/SC return codes (winscard / pcsc-lite's pcsclite.h), as unsigned 32-bit values.
SCARD_S_SUCCESS = 0x00000000
SCARD_E_CANCELLED = 0x80100002
SCARD_E_INVALID_HANDLE = 0x80100003
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_SHARING_VIOLATION = 0x8010000B
SCARD_E_NO_SMARTCARD = 0x8010000C
SCARD_E_UNKNOWN_READER = 0x80100009
SCARD_E_PROTO_MISMATCH = 0x8010000F
SCARD_E_NOT_TRANSACTED = 0x80100016
SCARD_E_READER_UNAVAILABLE = 0x80100017
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_E_SERVICE_STOPPED = 0x8010001E
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
SCARD_F_COMM_ERROR = 0x80100013
SCARD_W_UNRESPONSIVE_CARD = 0x80100066
SCARD_W_UNPOWERED_CARD = 0x80100067
SCARD_W_RESET_CARD = 0x80100068
SCARD_W_REMOVED_CARD = 0x80100069

_CARD_GONE = frozenset({SCARD_E_NO_SMARTCARD, SCARD_W_REMOVED_CARD, SCARD_W_RESET_CARD, SCARD_W_UNPOWERED_CARD})
_READER_GONE = frozenset({SCARD_E_UNKNOWN_READER, SCARD_E_READER_UNAVAILABLE, SCARD_E_INVALID_HANDLE})
_SERVICE_GONE = frozenset({SCARD_E_NO_SERVICE, SCARD_E_SERVICE_STOPPED, SCARD_F_COMM_ERROR})
#: pcscd answers these before it hands a command to the reader: nothing reached the card.
_REFUSED_BEFORE_SENDING = frozenset(
    {
        SCARD_W_REMOVED_CARD,
        SCARD_W_RESET_CARD,
        SCARD_E_SHARING_VIOLATION,
        SCARD_E_INVALID_HANDLE,
        SCARD_E_PROTO_MISMATCH,
    }
)

# SCARD_STATE_* bits of a reader's event state.
STATE_UNAWARE = 0x0000
STATE_CHANGED = 0x0002
STATE_UNKNOWN = 0x0004
STATE_UNAVAILABLE = 0x0008
STATE_EMPTY = 0x0010
STATE_PRESENT = 0x0020
STATE_MUTE = 0x0200


# --- pyscard, imported on demand ------------------------------------------------------------------


def load_pyscard() -> ModuleType:
    """pyscard's ``smartcard.scard``; :class:`PcscUnavailable` with the fix when it is not installed."""
    try:
        return importlib.import_module("smartcard.scard")
    except ImportError as exc:
        raise PcscUnavailable(
            "PC/SC needs pyscard: pip install 'mn-secd[pcsc]' (or apt install python3-pyscard)"
        ) from exc


def _code(hresult: int) -> int:
    return hresult & 0xFFFFFFFF


def describe(hresult: int) -> str:
    """A PC/SC return code as text, for logs and error messages."""
    code = _code(hresult)
    names = {value: name for name, value in globals().items() if name.startswith("SCARD_") and isinstance(value, int)}
    return f"{names.get(code, 'PC/SC error')} ({code:08X})"


def error_for(hresult: int, what: str) -> ReaderError | UiccAbsent:
    """The typed error for a failed PC/SC call (who is at fault: the card, the reader, pcscd)."""
    code = _code(hresult)
    text = f"{what}: {describe(code)}"
    if code in _CARD_GONE:
        return UiccAbsent(f"no card in the reader ({text})")
    if code in _READER_GONE:
        return ReaderGone(f"the reader went away ({text})")
    if code in _SERVICE_GONE:
        return ReaderGone(f"pcscd went away ({text})")
    if code == SCARD_E_SHARING_VIOLATION:
        return ReaderGone(f"another program holds the card ({text})")
    return ReaderError(text)


# --- sans-IO helpers ---------------------------------------------------------------------------------


def choose_reader(names: Sequence[str], wanted: str, with_card: Sequence[str] = ()) -> str:
    """The reader whose name contains ``wanted`` (case-insensitive); among several, the only one with a card."""
    needle = wanted.casefold()
    matches = [name for name in names if needle in name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        listed = ", ".join(repr(n) for n in names) or "none"
        raise ReaderNotFound(f"no PC/SC reader's name contains {wanted!r} (readers: {listed})")
    holding = [name for name in matches if name in with_card]
    if len(holding) == 1:
        return holding[0]
    raise ReaderNotFound(
        f"{len(matches)} readers match {wanted!r} and {len(holding) or 'none'} hold a card: "
        + ", ".join(repr(n) for n in matches)
    )


def wire_command(apdu: Apdu, t0: bool) -> bytes:
    """The bytes to hand pcscd: over T=0 a case-4 command loses its Le (the card answers ``61xx``)."""
    if t0 and apdu.data and apdu.le is not None:
        return Apdu(apdu.cla, apdu.ins, apdu.p1, apdu.p2, apdu.data).encode()
    return apdu.encode()


# --- the worker thread -----------------------------------------------------------------------------


class _Worker:
    """One thread for one PC/SC context's blocking calls, each awaited with a timeout."""

    def __init__(self, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._calls: list[concurrent.futures.Future[Any]] = []

    @property
    def busy(self) -> bool:
        """True while a call still runs (or waits) on the thread, also one we stopped waiting for."""
        self._calls = [call for call in self._calls if not call.done()]
        return bool(self._calls)

    async def call(self, timeout: float, function: Callable[..., T], *args: Any, always: bool = False) -> T:
        """``function(*args)`` on the thread; ``always``: it still runs if we stop waiting (releases)."""
        call = self._executor.submit(function, *args)
        self._calls.append(call)
        future = asyncio.wrap_future(call)
        return await asyncio.wait_for(asyncio.shield(future) if always else future, timeout)

    def shutdown(self) -> None:
        # A call stuck in pcscd ends on its own; the releases queued behind it still run then, so
        # an exclusive handle is given back even by a transport that died on a mute card.
        self._executor.shutdown(wait=False, cancel_futures=False)


# --- the transport -----------------------------------------------------------------------------------


class PcscTransport:
    """The card in a PC/SC reader, on a logical channel of ours (or the basic channel, held exclusively)."""

    name = "pcsc"

    def __init__(
        self,
        scard: ModuleType,
        worker: _Worker,
        context: int,
        handle: int,
        protocol: int,
        reader: str,
        atr: bytes,
        *,
        exclusive: bool,
        timeout: float,
        on_dead: Callable[[UiccAbsent | ReaderError], None] | None = None,
    ) -> None:
        self._scard = scard
        self._worker = worker
        self._context = context
        self._handle = handle
        self._protocol = protocol
        self.reader = reader
        self.atr = atr
        self._exclusive = exclusive
        self._timeout = timeout
        self._channel = 0
        self._dead: UiccAbsent | ReaderError | None = None
        self._on_dead = on_dead
        self._closed = False

    @property
    def channel(self) -> int:
        return self._channel

    @property
    def basic_channel(self) -> bool:
        """True only when another program may select files between our commands (shared access)."""
        return self._channel == 0 and not self._exclusive

    @property
    def t0(self) -> bool:
        return bool(self._protocol == self._scard.SCARD_PROTOCOL_T0)

    @property
    def stuck(self) -> bool:
        """True while a command that got no answer in time is still running inside pcscd."""
        return self._worker.busy

    @classmethod
    async def open(
        cls,
        reader: str,
        *,
        exclusive: bool = True,
        logical_channel: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        on_dead: Callable[[UiccAbsent | ReaderError], None] | None = None,
    ) -> PcscTransport:
        """Connect to the card in the reader whose name contains ``reader``; ask for a logical channel.

        Raises :class:`PcscUnavailable` (no pyscard, no pcscd), :class:`ReaderNotFound`,
        :class:`UiccAbsent` (reader empty), :class:`ReaderGone` (reader vanished or held by another
        program). Nothing stays open when it raises. ``on_dead`` hears, once, why the transport died
        (a command without an answer, the card or reader gone); never after :meth:`close`.
        """
        scard = load_pyscard()
        worker = _Worker("pcsc")
        context: int | None = None
        try:
            context = await worker.call(timeout, _establish, scard)
            name = await worker.call(timeout, _find_reader, scard, context, reader)
            share = scard.SCARD_SHARE_EXCLUSIVE if exclusive else scard.SCARD_SHARE_SHARED
            protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
            hresult, handle, protocol = await worker.call(timeout, scard.SCardConnect, context, name, share, protocols)
            if _code(hresult) != SCARD_S_SUCCESS:
                raise error_for(hresult, f"connecting to {name!r}")
            atr = await worker.call(timeout, _atr_of, scard, handle)
        except BaseException:
            if context is not None:
                await _release(worker, scard, context)
            worker.shutdown()
            raise
        transport = cls(
            scard, worker, context, handle, protocol, name, atr, exclusive=exclusive, timeout=timeout, on_dead=on_dead
        )
        logger.info(
            "card in %r (T=%d)", name, 0 if transport.t0 else 1, extra={"event": "uicc.pcsc_connected", "reader": name}
        )
        if logical_channel:
            try:
                await transport._open_logical_channel()
            except BaseException:
                await transport.close()
                raise
        return transport

    async def _open_logical_channel(self) -> None:
        response = parse_response(await self.transmit(MANAGE_CHANNEL_OPEN))
        if response.sw != 0x9000 or len(response.data) != 1 or not 1 <= response.data[0] <= 19:
            logger.info(
                "card refused MANAGE CHANNEL (SW %04X): basic channel",
                response.sw,
                extra={"event": "uicc.no_manage_channel"},
            )
            return
        self._channel = response.data[0]

    async def transmit(self, apdu: Apdu, *, timeout: float | None = None) -> bytes:
        """One APDU on our channel: the raw answer (data + SW1 SW2), with no T=0 follow-up of its own."""
        if self._dead is not None:
            raise type(self._dead)(str(self._dead))
        if self._closed:
            raise ReaderGone(f"{self.reader!r}: transport closed")
        command = list(wire_command(apdu.on_channel(self._channel), self.t0))
        try:
            hresult, answer = await self._worker.call(
                timeout if timeout is not None else self._timeout,
                self._scard.SCardTransmit,
                self._handle,
                self._protocol,
                command,
            )
        except TimeoutError as exc:  # the worker is stuck in pcscd: do not wait long to give the handle back
            await self._die(ReaderGone(f"{self.reader!r} stopped answering"), release_timeout=1.0)
            raise ApduOutcomeUnknown(f"INS {apdu.ins:02X} sent to {self.reader!r}, no answer in time") from exc
        code = _code(hresult)
        if code != SCARD_S_SUCCESS:
            error = error_for(code, f"INS {apdu.ins:02X} on {self.reader!r}")
            await self._die(error)
            if code in _REFUSED_BEFORE_SENDING:
                raise error
            raise ApduOutcomeUnknown(f"INS {apdu.ins:02X} handed to {self.reader!r}, then {describe(code)}") from error
        raw = bytes(answer)
        if len(raw) < 2:  # vpcd, and some readers, report a card pulled mid-command as an empty answer
            await self._die(UiccAbsent(f"no card in {self.reader!r} (it left during a command)"))
            raise ApduOutcomeUnknown(f"INS {apdu.ins:02X} sent to {self.reader!r}, answer of {len(raw)} octets")
        return raw

    def one_shot_error(self, exc: MnSecdError, what: str) -> MnSecdError:
        """:meth:`ApduTransport.one_shot_error <mn_secd.uicc.transport.ApduTransport.one_shot_error>`.

        A command pcscd took and never answered (:class:`~mn_secd.errors.ApduOutcomeUnknown`) may
        have run on the card: an unknown outcome, blamed on the reader path. Anything else never
        reached the card (pcscd refused it, or the transport was already dead) and stays what it is.
        """
        if isinstance(exc, ApduOutcomeUnknown):
            unknown = AuthenticateOutcomeUnknown(f"{what} sent, no usable answer: {exc}")
            unknown.culprit = Culprit.READER
            return unknown
        return exc

    async def _die(self, error: UiccAbsent | ReaderError, *, release_timeout: float | None = None) -> None:
        """No more commands; give the reader back at once (an exclusive handle would lock out the next card)."""
        first = self._dead is None
        self._dead = error
        self._channel = 0
        await self._release_all(release_timeout)
        on_dead = self._on_dead
        if first and on_dead is not None:
            self._on_dead = None
            on_dead(error)

    async def _release_all(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        timeout = self._timeout if timeout is None else timeout
        try:
            try:
                await self._worker.call(
                    timeout, self._scard.SCardDisconnect, self._handle, self._scard.SCARD_LEAVE_CARD, always=True
                )
            except Exception as exc:
                logger.debug("SCardDisconnect failed: %s", exc, extra={"event": "uicc.close_failed"})
            await _release(self._worker, self._scard, self._context, timeout)
        finally:
            self._worker.shutdown()

    async def close(self) -> None:
        """Close our logical channel (best effort), release the card and the PC/SC context."""
        self._on_dead = None  # whoever closes knows
        if self._channel and not self._closed:
            channel = self._channel
            try:
                await self.transmit(Apdu(0x00, 0x70, 0x80, channel))
            except Exception as exc:  # the card or the reader may be gone
                logger.info("closing channel %d failed: %s", channel, exc, extra={"event": "uicc.close_failed"})
            self._channel = 0
        await self._release_all()


def _establish(scard: ModuleType) -> int:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if _code(hresult) != SCARD_S_SUCCESS:
        raise PcscUnavailable(f"no PC/SC service (is pcscd running?): {describe(hresult)}")
    return int(context)


async def _release(worker: _Worker, scard: ModuleType, context: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    try:
        await worker.call(timeout, scard.SCardReleaseContext, context, always=True)
    except Exception as exc:
        logger.debug("SCardReleaseContext failed: %s", exc, extra={"event": "uicc.close_failed"})


def _list_readers(scard: ModuleType, context: int) -> list[str]:
    hresult, names = scard.SCardListReaders(context, [])
    code = _code(hresult)
    if code == SCARD_E_NO_READERS_AVAILABLE:
        return []
    if code != SCARD_S_SUCCESS:
        raise error_for(code, "listing readers")
    return [str(name) for name in names]


def _states(scard: ModuleType, context: int, names: Sequence[str]) -> list[tuple[str, int, bytes]]:
    if not names:
        return []
    hresult, states = scard.SCardGetStatusChange(context, 0, [(name, STATE_UNAWARE) for name in names])
    if _code(hresult) != SCARD_S_SUCCESS:
        raise error_for(hresult, "reading reader states")
    return [(str(name), int(state), bytes(atr)) for name, state, atr in states]


def _find_reader(scard: ModuleType, context: int, wanted: str) -> str:
    names = _list_readers(scard, context)
    needle = wanted.casefold()
    matching = [name for name in names if needle in name.casefold()]
    with_card = (
        [n for n, state, _ in _states(scard, context, matching) if state & STATE_PRESENT] if len(matching) > 1 else []
    )
    return choose_reader(names, wanted, with_card)


def _atr_of(scard: ModuleType, handle: int) -> bytes:
    hresult, _reader, _state, _protocol, atr = scard.SCardStatus(handle)
    return bytes(atr) if _code(hresult) == SCARD_S_SUCCESS else b""


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    """A reader as ``mn-secd doctor`` and ``uicc info`` show it."""

    name: str
    card_present: bool
    atr: bytes


async def list_readers(*, timeout: float = DEFAULT_TIMEOUT) -> list[ReaderInfo]:
    """Every reader pcscd knows, whether it holds a card, and the card's ATR."""
    scard = load_pyscard()
    worker = _Worker("pcsc-list")
    try:
        context = await worker.call(timeout, _establish, scard)
        try:
            names = await worker.call(timeout, _list_readers, scard, context)
            states = await worker.call(timeout, _states, scard, context, names)
        finally:
            await _release(worker, scard, context)
    finally:
        worker.shutdown()
    return [
        ReaderInfo(name, bool(state & STATE_PRESENT), atr if state & STATE_PRESENT else b"")
        for name, state, atr in states
    ]


# --- presence ------------------------------------------------------------------------------------------


class ReaderEventKind(enum.StrEnum):
    READER_FOUND = "reader-found"  # a reader matching the name is there (at start, or back)
    READER_GONE = "reader-gone"  # it vanished, or pcscd did
    CARD_INSERTED = "card-inserted"
    CARD_REMOVED = "card-removed"


@dataclass(frozen=True, slots=True)
class ReaderEvent:
    kind: ReaderEventKind
    reader: str | None = None


class ReaderWatcher:
    """Follows one reader (chosen by a name substring) and its card; events go to ``on_event`` on the loop.

    Runs on its own thread and PC/SC context; every wait in pcscd is at most ``poll`` seconds, so
    :meth:`close` returns promptly. When pcscd is gone it retries with a back-off doubling up to
    ``reconnect_max`` seconds; when the reader is gone it waits for pcsc-lite's reader
    notifications (and polls, for drivers that do not send them).
    """

    def __init__(
        self,
        wanted: str,
        on_event: Callable[[ReaderEvent], None],
        *,
        poll: float = 0.5,
        reconnect_max: float = 5.0,
    ) -> None:
        self._wanted = wanted
        self._on_event = on_event
        self._poll_ms = max(1, int(poll * 1000))
        self._reconnect_max = reconnect_max
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scard: ModuleType | None = None
        self._context: int | None = None
        self.reader: str | None = None
        self.card_present = False

    async def start(self) -> None:
        self._scard = load_pyscard()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pcsc-watch", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        context, scard = self._context, self._scard
        if context is not None and scard is not None:  # wakes SCardGetStatusChange at once (any thread may)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(scard.SCardCancel, context), 2.0)
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, self._poll_ms / 1000 + 2.0)

    def _emit(self, kind: ReaderEventKind) -> None:
        event = ReaderEvent(kind, self.reader)
        level = logging.WARNING if kind is ReaderEventKind.READER_GONE else logging.INFO
        logger.log(
            level, "PC/SC %s: %s", kind.value, self.reader or self._wanted, extra={"event": f"uicc.pcsc_{kind.value}"}
        )
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, event)

    def _set(self, reader: str | None, present: bool) -> None:
        """Move to a new observed state, emitting the events between the old and the new one."""
        if self.card_present and (not present or reader != self.reader):
            self.card_present = False
            self._emit(ReaderEventKind.CARD_REMOVED)
        if self.reader is not None and reader != self.reader:
            self._emit(ReaderEventKind.READER_GONE)
            self.reader = None
        if reader is not None and self.reader is None:
            self.reader = reader
            self._emit(ReaderEventKind.READER_FOUND)
        if present and not self.card_present:
            self.card_present = True
            self._emit(ReaderEventKind.CARD_INSERTED)

    def _run(self) -> None:
        scard = self._scard
        assert scard is not None
        delay = 0.1
        first = True
        while not self._stop.is_set():
            hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if _code(hresult) != SCARD_S_SUCCESS:
                if first:
                    logger.warning("no PC/SC service: %s", describe(hresult), extra={"event": "uicc.pcsc_no_service"})
                    first = False
                self._set(None, False)
                self._stop.wait(delay)
                delay = min(delay * 2, self._reconnect_max)
                continue
            first = True
            self._context = int(context)
            try:
                self._watch(scard, int(context))
                delay = 0.1
            except Exception as exc:
                logger.warning("watching the reader failed: %s", exc, extra={"event": "uicc.pcsc_watch_error"})
                self._set(None, False)
                self._stop.wait(delay)
                delay = min(delay * 2, self._reconnect_max)
            finally:
                self._context = None
                scard.SCardReleaseContext(context)

    def _watch(self, scard: ModuleType, context: int) -> None:
        """Until pcscd goes away or we are stopped: wait for changes, bounded by the poll period."""
        known: dict[str, int] = {PNP_NOTIFICATION: STATE_UNAWARE}
        reader: str | None = None
        while not self._stop.is_set():
            if reader is None:
                try:
                    reader = _find_reader(scard, context, self._wanted)
                except ReaderNotFound:
                    reader = None
                except ReaderError as exc:
                    if isinstance(exc, ReaderGone):
                        self._set(None, False)
                        return  # pcscd went: establish a new context (with back-off)
                    raise
                if reader is not None:
                    known = {PNP_NOTIFICATION: known[PNP_NOTIFICATION], reader: STATE_UNAWARE}
                else:
                    self._set(None, False)
            watched = [(name, state) for name, state in known.items()]
            hresult, states = scard.SCardGetStatusChange(context, self._poll_ms, watched)
            code = _code(hresult)
            if code in (SCARD_E_TIMEOUT, SCARD_E_CANCELLED):
                continue
            if code in _SERVICE_GONE or code == SCARD_E_INVALID_HANDLE:
                self._set(None, False)
                return
            if code in (SCARD_E_UNKNOWN_READER, SCARD_E_READER_UNAVAILABLE):
                self._set(None, False)
                reader = None
                known = {PNP_NOTIFICATION: STATE_UNAWARE}
                continue
            if code != SCARD_S_SUCCESS:
                raise ReaderError(f"SCardGetStatusChange: {describe(code)}")
            for name, state, _atr in states:
                known[str(name)] = int(state) & ~STATE_CHANGED
                if str(name) != reader:
                    continue
                if state & (STATE_UNKNOWN | STATE_UNAVAILABLE):
                    self._set(None, False)
                    reader = None
                else:
                    self._set(reader, bool(state & STATE_PRESENT) and not state & STATE_MUTE)
            if reader is not None and reader not in known:
                reader = None
            if reader is None:
                known = {PNP_NOTIFICATION: known.get(PNP_NOTIFICATION, STATE_UNAWARE)}
