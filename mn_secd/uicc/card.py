"""The card, whichever way it is reached: start-up, card events, and one operation at a time.

A :class:`Card` reaches its UICC through a :class:`CardSource`: the modem's AT port
(:class:`ModemSource`, here) or a PC/SC card reader (:class:`mn_secd.uicc.reader.ReaderSource`).
The source opens an APDU transport to a card that is there and says when the card goes and may be
back; the card's files and AUTHENTICATE are APDUs on that transport, in
:class:`~mn_secd.uicc.channel.CardChannel`, the same for every source.

What only an AT port has stays in :class:`ModemSource`: ``AT+CPIN?`` before anything else, the
transport probe over AT+CGLA / AT+CSIM (:func:`~mn_secd.uicc.transport.open_transport`),
``AT+CIMI`` for the IMSI of an ISIM-only card, URCs that say the SIM went or came, and a port that
vanishes and returns.

Start-up (and every re-insertion, or return of the port or reader) runs once: a transport from
the source; then the channel reads the identity and leaves the application selected. Through the
AT port that starts with ``AT+CPIN?``, entering the PIN from ``pin_file`` when
:class:`~mn_secd.uicc.pin.PinKeeper` allows it (at most once per insertion, with two or more
attempts left); ``+CME ERROR: 14`` (SIM busy, the first seconds after power-up) is
:class:`~mn_secd.errors.UiccBusy`, which the caller waits out.

Another program on the AT port (ModemManager, a dialer) is looked for when the port opens and
whenever an answer arrives to a command we never sent; a :class:`PortSharing` notice names it.

Card events: REMOVED when the source says the card went (a SIM-removed URC, the port gone, the
reader's card pulled or the reader gone) or when the card answers as absent; then the card is
looked for again (at once when the source says it may be back, else every ``presence_poll``
seconds) and INSERTED or CHANGED is sent once its identity has been re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.card_identity import CardEvent, CardEventKind, CardIdentity, GbaBootstrapParams
from mn_secd.errors import (
    AnswerLost,
    AtCommandError,
    AtParseError,
    MnSecdError,
    ModemTimeout,
    PathRefusedAuthenticate,
    PinRejected,
    PortGoneError,
    UiccAbsent,
    UiccBusy,
    UiccError,
    UiccLocked,
)
from mn_secd.observers import Subscribers
from mn_secd.uicc import at, files
from mn_secd.uicc.apdu import Apdu, parse_response
from mn_secd.uicc.channel import CardChannel, ImsiSource
from mn_secd.uicc.holders import PortHolder, port_holders
from mn_secd.uicc.options import ModemConfig, TransportChoice
from mn_secd.uicc.pin import (
    ABSENT_STATES,
    COUNTER_QUERIES,
    READY_STATES,
    UNBLOCK_STATUS,
    VERIFY_STATUS,
    PinCounters,
    PinKeeper,
    attempts_from_sw,
)
from mn_secd.uicc.serial import AtCommandPort, AtPort
from mn_secd.uicc.transport import ApduTransport, CsimTransport, PathFinding, check_absent, open_transport

logger = logging.getLogger(__name__)

#: After the PIN was accepted, how long the SIM may stay busy before it answers READY.
PIN_SETTLE = 10.0
PIN_SETTLE_POLL = 0.5
#: While the SIM is locked, how often to look again (a URC or a port return also wakes the watch).
LOCKED_POLL = 30.0
#: At most one look for the other program per this many seconds, however many stray answers come.
HOLDER_SCAN_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class PortSharing:
    """Another program uses the modem's AT port: who (where it could be seen) and how we noticed."""

    port: str
    holders: tuple[PortHolder, ...]
    stray_answers: int  # answers to commands we never sent since the port opened

    @property
    def clear(self) -> bool:
        """Nobody else is seen any more (the port was opened again and no other holder found)."""
        return not self.holders and not self.stray_answers

    def describe(self) -> str:
        if self.holders:
            who = ", ".join(h.describe() for h in self.holders)
            advice = self.holders[0].advice
        else:
            who = "a process mn-secd cannot see (run `mn-secd doctor` as root to name it)"
            advice = "keep other programs off the port, e.g. ModemManager with udev/90-mn-secd-modem.rules"
        seen = f"; {self.stray_answers} answers to commands mn-secd never sent" if self.stray_answers else ""
        return f"{self.port} is also used by {who}{seen}: {advice}"


async def read_sim_state(port: AtCommandPort) -> str:
    """``AT+CPIN?``: ``READY``, ``SIM PIN``, ``SIM PUK``...; no SIM is UiccAbsent, SIM busy UiccBusy."""
    try:
        state = at.parse_cpin(await port.command(at.query("AT+CPIN?", "+CPIN:")))
    except AtCommandError as exc:
        check_absent(exc)
        if exc.cme == at.CME_SIM_FAILURE:
            raise UiccError(f"the modem reports a SIM failure ({exc})") from exc
        raise
    if state in ABSENT_STATES:
        raise UiccAbsent(f"no SIM in the modem (+CPIN: {state})")
    return state


async def read_pin_counters(port: AtCommandPort) -> PinCounters:
    """Attempts left for the PIN (and PUK): the modem's commands first, then the card's VERIFY status.

    Only questions: nothing here enters a PIN or changes a counter.
    """
    for query in COUNTER_QUERIES:
        try:
            counters = query.parse(await port.command(query.command))
        except (AtCommandError, ModemTimeout, AtParseError):
            continue  # not this modem's command
        if counters.pin is not None or counters.puk is not None:
            return counters
    csim = CsimTransport(port)
    pin, puk = await _card_attempts(csim, VERIFY_STATUS), await _card_attempts(csim, UNBLOCK_STATUS)
    return PinCounters(pin, puk, "VERIFY through AT+CSIM") if pin is not None or puk is not None else PinCounters()


async def _card_attempts(csim: CsimTransport, status: Apdu) -> int | None:
    try:
        return attempts_from_sw(parse_response(await csim.transmit(status)).sw)
    except (AtCommandError, ModemTimeout, AnswerLost):
        return None  # the modem will not pass VERIFY/UNBLOCK (Wavecom refuses them through AT+CSIM)


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


class CardSource(Protocol):
    """How a :class:`Card` reaches its UICC, and who tells it that the card went or may be back."""

    @property
    def connected(self) -> bool:
        """The way to the card is there (the AT port is open; pcscd runs and the reader is plugged in)."""

    @property
    def imsi_source(self) -> ImsiSource | None:
        """Who tells the IMSI of an ISIM-only card (a modem: ``AT+CIMI``); None when nobody can."""

    def listen(self, on_presence: Callable[[bool, str], None]) -> None:
        """``on_presence(False, why)`` when the card went; ``(True, why)`` when it may be back."""

    async def open(self) -> None:
        """Start reaching the card (open the port, watch the reader); raises if that cannot start."""

    async def close(self) -> None:
        """Stop, and release whatever is held (the port, the reader, the transport)."""

    async def open_transport(self) -> ApduTransport:
        """A transport to the card, once whatever must come first has said it is there and usable."""

    def unreachable(self, detail: str | None = None) -> MnSecdError:
        """The error for "the way to the card is gone" (PortGoneError, ReaderGone), with ``detail``."""

    def refused_authenticate(self, transport: ApduTransport) -> bool:
        """The modem would not pass AUTHENTICATE through ``transport``: True when the next transport
        this source opens takes another way to the card."""


class Card:
    """The UICC reached through ``source``; implements :class:`mn_secd.interfaces.CardAccess`.

    :func:`open_card` builds the source from ``config`` and starts the card. ``config`` gives the
    application wanted and how often to look for an absent card; the source is the caller's to
    build (the card listens to it from now on) and the card's to open and close.
    """

    def __init__(self, source: CardSource, config: ModemConfig) -> None:
        self._config = config
        self._source = source
        source.listen(self._on_presence)
        self._lock = asyncio.Lock()  # one card operation (several commands) at a time
        self._channel: CardChannel | None = None
        self._identity: CardIdentity | None = None
        self._last_identity: CardIdentity | None = None
        self._generation = 0  # bumped on every removal: an identity read across one is void
        self._wake = asyncio.Event()
        self._subscribers = Subscribers[CardEvent](logger, "uicc.callback_error")
        self._notices = Subscribers[PortSharing | MnSecdError](logger, "uicc.callback_error")
        self._problem: MnSecdError | None = None  # why the card is not usable now (for the watch's pace)
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    # --- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the source and bring the card up; on failure nothing is left open."""
        await self._source.open()
        try:
            async with self._lock:
                await self._bring_up(emit=False)
        except BaseException:
            await self._source.close()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Give the logical channel back and release the source."""
        if self._closed:
            return
        self._closed = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channel, self._channel = self._channel, None
        if channel is not None and self._source.connected:
            async with self._lock:
                await channel.transport.close()
        await self._source.close()

    @property
    def transport_name(self) -> str | None:
        return self._channel.transport.name if self._channel is not None else None

    @property
    def source(self) -> CardSource:
        """The way to the card (read-only use: diagnostics, and benchmarks that count commands on it)."""
        return self._source

    # --- CardAccess ---------------------------------------------------------------------------------

    async def identity(self) -> CardIdentity:
        """The identity read at start-up or at the last insertion; looks for the card once if absent."""
        if self._identity is not None:
            return self._identity
        self._require_source()
        async with self._lock:
            if self._identity is None:
                await self._bring_up(emit=True)
            assert self._identity is not None
            return self._identity

    async def authenticate(self, rand: bytes, autn: bytes, context: AuthContext) -> AkaResult:
        """Exactly one AUTHENTICATE (3G context or GBA bootstrapping mode); never resent.

        If the modem refuses it on this path, it is not sent another way (the caller's next
        challenge is), but the next one goes another way where the source has one.
        """
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed(), self._path_refusal_noticed(channel):
                return await channel.authenticate(identity, rand, autn, context)

    async def gba_naf_derivation(self, naf_id: bytes, impi: str) -> bytes:
        """GBA_U NAF derivation (``DE``): Ks_ext_NAF; the card must hold a Ks from a GBA bootstrap."""
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed(), self._path_refusal_noticed(channel):
                return await channel.gba_naf_derivation(identity, naf_id, impi)

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        """B-TID and lifetime into EF_GBABP, keeping the RAND the card wrote there during the bootstrap."""
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed():
                await channel.write_gba_bootstrap_params(identity, btid, lifetime)

    async def read_gba_bootstrap_params(self) -> GbaBootstrapParams:
        """EF_GBABP as the card holds it: RAND from its last GBA bootstrap, the B-TID and lifetime we wrote."""
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed():
                return await channel.read_gba_bootstrap_params(identity)

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    def subscribe_notices(self, callback: Callable[[PortSharing | MnSecdError], None]) -> Callable[[], None]:
        """Be told what the card events do not say: why a card that came back is not usable yet (a
        locked or busy SIM: the error). The modem's source tells of another program on its port."""
        return self._notices.subscribe(callback)

    # --- presence -------------------------------------------------------------------------------------

    def _emit(self, event: CardEvent) -> None:
        logger.info("card %s", event.kind.value, extra={"event": f"uicc.card_{event.kind.value}"})
        self._subscribers.emit(event)

    def _mark_absent(self, reason: str) -> None:
        self._generation += 1
        self._channel = None  # its channel went with the card (or the modem, or the reader)
        was_present, self._identity = self._identity is not None, None
        if was_present:
            logger.info("card gone: %s", reason, extra={"event": "uicc.card_gone"})
            self._emit(CardEvent(CardEventKind.REMOVED))
        self._wake.set()

    @contextlib.asynccontextmanager
    async def _absence_noticed(self) -> AsyncIterator[None]:
        """A card that answers as absent (``+CME ERROR: 10``, an empty reader) is gone, whatever was said."""
        try:
            yield
        except UiccAbsent as exc:
            self._mark_absent(str(exc))
            raise

    @contextlib.asynccontextmanager
    async def _path_refusal_noticed(self, channel: CardChannel) -> AsyncIterator[None]:
        """The modem refused AUTHENTICATE on this channel's path (``AT+CGLA`` answering ``ERROR``
        while ``AT+CSIM`` would carry it): the card is reached another way from now on, if the
        source has one, so that the next challenge is not refused too. Caller holds the lock."""
        try:
            yield
        except PathRefusedAuthenticate:
            if self._source.refused_authenticate(channel.transport):
                await self._switch_path(channel)
            raise

    async def _switch_path(self, channel: CardChannel) -> None:
        previous = self._identity
        logger.warning(
            "the modem refused AUTHENTICATE over %s; the card is reached another way from now on",
            channel.transport.name,
            extra={"event": "uicc.path_refused_authenticate", "transport": channel.transport.name},
        )
        with contextlib.suppress(Exception):  # best effort: the channel is left for another one
            await channel.transport.close()
        self._channel = None
        try:
            await self._bring_up(emit=False)
        except MnSecdError as exc:
            self._mark_absent(f"no other way to the card: {exc}")
            return
        assert self._identity is not None
        if previous is not None and (previous.iccid, previous.impi) != (self._identity.iccid, self._identity.impi):
            self._emit(CardEvent(CardEventKind.CHANGED, self._identity))

    def _on_presence(self, present: bool, why: str) -> None:
        if not present:
            self._mark_absent(why)
        elif self._identity is None:
            self._wake.set()

    async def _supervise(self) -> None:
        """While the card is away: look for it on a hint from the source or every ``presence_poll`` s
        (every :data:`LOCKED_POLL` s while it is locked: nothing changes that without a hint)."""
        while not self._closed:
            if self._identity is not None:
                self._wake.clear()
                await self._wake.wait()
                continue
            pause = LOCKED_POLL if isinstance(self._problem, UiccLocked) else self._config.presence_poll
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()
            self._wake.clear()
            if not self._source.connected:
                continue
            try:
                async with self._lock:
                    if self._identity is None:
                        await self._bring_up(emit=True)
                self._problem = None
            except MnSecdError as exc:
                logger.debug("card not usable yet: %s", exc, extra={"event": "uicc.card_not_ready"})
                if isinstance(exc, UiccLocked | UiccBusy) and str(exc) != str(self._problem):
                    self._notices.emit(exc)
                self._problem = exc
            except Exception:  # a bug must not end the watch over the card; try again at the next poll
                logger.exception("looking for the card failed", extra={"event": "uicc.supervisor_error"})

    async def _bring_up(self, *, emit: bool) -> None:
        """Find the card, open a transport, read the identity (caller holds the lock)."""
        generation = self._generation
        transport = await self._source.open_transport()
        channel = CardChannel(transport)
        try:
            async with self._absence_noticed():
                identity = await channel.read_identity(self._config.application, imsi_source=self._source.imsi_source)
        except BaseException:
            with contextlib.suppress(Exception):
                await transport.close()
            raise
        if generation != self._generation:  # removed while we read: what we read is void
            raise UiccAbsent("the card went away during start-up")
        previous = self._last_identity
        self._channel, self._identity, self._last_identity = channel, identity, identity
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

    def _require_source(self) -> None:
        if self._closed:
            raise self._source.unreachable("card closed")
        if not self._source.connected:
            raise self._source.unreachable()

    def _ready(self) -> tuple[CardChannel, CardIdentity]:
        self._require_source()
        if self._channel is None or self._identity is None:
            raise UiccAbsent(f"no usable card in {self._config.where}")
        return self._channel, self._identity


class ModemSource:
    """A :class:`CardSource`: the card behind a modem's AT port.

    Before a transport: ``AT+CPIN?`` (a PIN entered when ``pin`` allows it; a locked card is
    :class:`~mn_secd.errors.UiccLocked`, a busy one :class:`~mn_secd.errors.UiccBusy`, an absent one
    :class:`~mn_secd.errors.UiccAbsent`), then the transport probe, whose findings are kept
    (``mn-secd doctor`` shows them). The IMSI of an ISIM-only card comes from ``AT+CIMI``. URCs and
    the port's comings and goings tell the card; another program on the port is a notice.
    """

    def __init__(self, port: AtCommandPort, config: ModemConfig, pin: PinKeeper | None = None) -> None:
        self.port = port
        self._config = config
        self._pin = pin if pin is not None else PinKeeper()
        self._on_presence: Callable[[bool, str], None] | None = None
        self._notices = Subscribers[PortSharing | MnSecdError](logger, "uicc.callback_error")
        self._strays = 0
        self._shared = False  # another program was reported and not yet seen gone
        self._reported: PortSharing | None = None
        self._rescan = False
        self._last_scan = -HOLDER_SCAN_INTERVAL
        self._scan: asyncio.Task[None] | None = None
        #: What each way to the card answered at the last probe.
        self.findings: list[PathFinding] = []
        self._refused: set[str] = set()  # transports the modem would not pass AUTHENTICATE through
        port.listen(on_urc=self._on_urc, on_state=self._on_port_state, on_stray=self._on_stray)

    @property
    def connected(self) -> bool:
        return self.port.connected

    @property
    def imsi_source(self) -> ImsiSource:
        return self._imsi_from_modem

    def listen(self, on_presence: Callable[[bool, str], None]) -> None:
        self._on_presence = on_presence

    def subscribe_notices(self, callback: Callable[[PortSharing | MnSecdError], None]) -> Callable[[], None]:
        """Be told of another program on the port (:class:`PortSharing`), and when it is gone."""
        return self._notices.subscribe(callback)

    async def open(self) -> None:
        await self.port.open()
        self._look_for_holders()

    async def close(self) -> None:
        task, self._scan = self._scan, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.port.close()

    async def open_transport(self) -> ApduTransport:
        await self._check_pin()
        self.findings = []
        return await open_transport(
            self.port,
            self._config.transport,
            files.USIM_AID_PREFIX,
            findings=self.findings,
            avoid=frozenset(self._refused),
        )

    def unreachable(self, detail: str | None = None) -> PortGoneError:
        return PortGoneError(f"{self.port.path}: {detail or 'port gone'}")

    def refused_authenticate(self, transport: ApduTransport) -> bool:
        """With ``transport = "auto"``, a transport that refused AUTHENTICATE is tried last from now on
        (until the port goes: a modem that comes back may be another one). Never both: with both
        refused, the card stays on the one it has."""
        if self._config.transport is not TransportChoice.AUTO or transport.name in self._refused or self._refused:
            return False
        self._refused.add(transport.name)
        return True

    def _tell(self, present: bool, why: str) -> None:
        if self._on_presence is not None:
            self._on_presence(present, why)

    def _on_urc(self, line: str) -> None:
        presence = urc_presence(line)
        if presence is False:
            self._pin.card_absent()  # the next card is a new insertion
        if presence is not None:
            self._tell(presence, f"URC {line}")

    def _on_port_state(self, up: bool) -> None:
        if up:
            self._pin.card_powered_again()  # a modem that reset powered the card again
            self._refused.clear()  # and may be another modem, or run other firmware
            self._strays = 0
            self._look_for_holders()
        self._tell(up, "port back" if up else "port gone")

    # --- the SIM's PIN -----------------------------------------------------------------------------

    async def _check_pin(self) -> None:
        """``AT+CPIN?``; a locked SIM gets its PIN only when the keeper says so, else it stays locked."""
        try:
            state = await read_sim_state(self.port)
        except UiccAbsent:
            self._pin.card_absent()
            raise
        if state in READY_STATES:
            return
        counters = await read_pin_counters(self.port)
        refusal = self._pin.decide(state, counters)
        if refusal is not None:
            raise refusal
        await self._enter_pin(state)

    async def _enter_pin(self, state: str) -> None:
        """The one PIN entry of this insertion; never repeated, whatever its outcome."""
        command = self._pin.take()
        logger.info("entering the SIM PIN from pin_file", extra={"event": "uicc.pin_entry"})
        try:
            await self.port.command(command)
        except AtCommandError as exc:
            check_absent(exc)
            left = (await read_pin_counters(self.port)).pin
            if exc.cme in (at.CME_INCORRECT_PASSWORD, at.CME_SIM_PUK_REQUIRED):
                self._pin.rejected(left)
                logger.error(
                    "the SIM refused the PIN from pin_file (%s attempts left); not entered again",
                    "?" if left is None else left,
                    extra={"event": "uicc.pin_rejected"},
                )
                raise PinRejected(
                    state,
                    f"the SIM refused the PIN from pin_file ({'unknown' if left is None else left} attempts left)",
                    retries=left,
                    remedy="correct pin_file; mn-secd enters it again only after the SIM is re-inserted "
                    "or the daemon is restarted",
                ) from None
            raise UiccLocked(
                state,
                f"the modem answered the PIN entry with {exc.cme if exc.cme is not None else 'ERROR'}; "
                "not entered again for this SIM",
                retries=left,
            ) from None
        self._pin.accepted()
        logger.info("the SIM accepted the PIN", extra={"event": "uicc.pin_accepted"})
        await self._settle_after_pin()

    async def _settle_after_pin(self) -> None:
        """A SIM that took its PIN answers busy for a moment while the modem reads it."""
        deadline = time.monotonic() + PIN_SETTLE
        while True:
            try:
                state = await read_sim_state(self.port)
            except UiccBusy:
                state = "busy"
            if state in READY_STATES:
                return
            if state != "busy":
                raise UiccLocked(state, "still locked after the PIN was accepted")
            if time.monotonic() >= deadline:
                raise UiccBusy(f"the SIM took its PIN but is still busy after {PIN_SETTLE:g} s")
            await asyncio.sleep(PIN_SETTLE_POLL)

    async def _imsi_from_modem(self) -> str:
        """An ISIM-only card has no EF_IMSI; the modem still knows the IMSI."""
        return at.parse_cimi(await self.port.command(at.cimi()))

    # --- another program on the port -------------------------------------------------------------

    def _on_stray(self) -> None:
        self._strays += 1
        if self._strays == 1:
            logger.warning(
                "answers to commands mn-secd never sent on %s: another program uses the port",
                self.port.path,
                extra={"event": "uicc.port_shared"},
            )
        self._look_for_holders()

    def _look_for_holders(self) -> None:
        """Name whoever else holds the port, in a thread (it walks /proc). Once it has been reported,
        stray answers look again at most every :data:`HOLDER_SCAN_INTERVAL` seconds."""
        if self._scan is not None:
            self._rescan = True
            return
        now = time.monotonic()
        if self._shared and now - self._last_scan < HOLDER_SCAN_INTERVAL:
            return
        self._last_scan = now
        self._scan = asyncio.get_running_loop().create_task(self._scan_holders())

    async def _scan_holders(self) -> None:
        try:
            holders = [h for h in await asyncio.to_thread(port_holders, self.port.path) if not h.is_mn_secd]
        except Exception:  # diagnostics must never take the card down
            logger.exception("looking for other programs on the port failed", extra={"event": "uicc.holder_scan"})
            return
        finally:
            self._scan = None
        sharing = PortSharing(self.port.path, tuple(holders), self._strays)
        if sharing.clear:
            if self._shared:  # said before: say that it is over
                self._shared = False
                logger.info("%s: no other program on the port now", self.port.path, extra={"event": "uicc.port_own"})
                self._notices.emit(sharing)
        elif sharing != self._reported:
            self._shared, self._reported = True, sharing
            logger.warning("%s", sharing.describe(), extra={"event": "uicc.port_shared"})
            self._notices.emit(sharing)
        if self._rescan:
            self._rescan = False
            self._look_for_holders()


async def open_card(
    config: ModemConfig,
    *,
    pin: PinKeeper | None = None,
    notices: Callable[[PortSharing | MnSecdError], None] | None = None,
    sync_for: float = 0.0,
) -> Card:
    """Reach the card as ``config`` says and bring it up (identity read, application selected on our channel).

    The modem's AT port, or with ``transport = "pcsc"`` the PC/SC reader whose name contains
    ``config.reader`` (:mod:`mn_secd.uicc.reader`). Whatever stops start-up raises and leaves
    nothing open (PortGoneError, ReaderNotFound, PcscUnavailable, UiccAbsent, UiccLocked,
    TransportUnavailable, ApplicationNotFound, ...): the caller retries with its own back-off. Once
    open, the Card follows removals, insertions and a vanishing port or reader by itself (card events).
    Through the modem, ``pin`` (the same keeper at every attempt: it remembers a PIN entry) may unlock
    the SIM; ``notices`` hears of another program on the port from the moment the port opens, and of
    a card that came back locked or busy. ``sync_for`` > 0 waits that long at open for a modem that
    does not answer yet (:meth:`AtPort._sync`; the command-line tools, not the daemon).
    """
    source: CardSource
    if config.uses_reader:
        # Imported here: a daemon on an AT port has no use for the PC/SC modules (~0.4 MB).
        from mn_secd.uicc.reader import ReaderSource

        source = ReaderSource(config)  # pyscard is imported when it opens, not before
    else:
        assert config.port is not None  # ModemConfig requires it for every AT transport
        port = AtPort(
            config.port,
            baud=config.baud,
            command_timeout=config.command_timeout,
            reopen_max=config.reopen_max,
            sync_for=sync_for,
        )
        modem = ModemSource(port, config, pin)
        if notices is not None:
            modem.subscribe_notices(notices)
        source = modem
    card = Card(source, config)
    if notices is not None:
        card.subscribe_notices(notices)
    await card.start()
    return card
