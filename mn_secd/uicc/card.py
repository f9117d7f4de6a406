"""The card behind a modem's AT port: start-up, card events, and one operation at a time.

What only an AT port has lives here: ``AT+CPIN?`` before anything else, the transport probe over
AT+CGLA / AT+CSIM (:func:`~mn_secd.uicc.transport.open_transport`), ``AT+CIMI`` for the IMSI of an
ISIM-only card, URCs that say the SIM went or came, and a port that vanishes and returns. The
card's files and AUTHENTICATE are APDUs on the chosen transport, in
:class:`~mn_secd.uicc.channel.CardChannel`, which any other way of reaching a card can reuse.

Start-up (and every re-insertion or port return) runs once: ``AT+CPIN?``; a transport from the
probe; then the channel reads the identity and leaves the application selected.

Card events: REMOVED on a SIM-removed URC, when the card answers as absent (``+CME ERROR: 10``) or
when the port goes; then the card is looked for again (at once on an insertion URC or when the port
returns, else by polling ``AT+CPIN?``) and INSERTED or CHANGED is sent once its identity has been
re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from mn_secd.aka import AkaResult, AuthContext
from mn_secd.card_identity import CardEvent, CardEventKind, CardIdentity
from mn_secd.errors import AtCommandError, MnSecdError, PortGoneError, UiccAbsent, UiccLocked
from mn_secd.observers import Subscribers
from mn_secd.uicc import at, files
from mn_secd.uicc.channel import CardChannel
from mn_secd.uicc.options import ModemConfig
from mn_secd.uicc.serial import AtCommandPort, AtPort
from mn_secd.uicc.transport import check_absent, open_transport

logger = logging.getLogger(__name__)


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
    """The UICC behind ``port`` (a modem's AT port); implements :class:`mn_secd.interfaces.CardAccess`.

    :func:`open_card` builds the port from ``config`` and starts the card. ``config`` gives the
    transport and application wanted and how often to look for an absent card; the port is the
    caller's to build (the card listens to its URCs and port state from now on) and the card's to
    open and close.
    """

    def __init__(self, port: AtCommandPort, config: ModemConfig) -> None:
        self._config = config
        self._port = port
        port.listen(on_urc=self._on_urc, on_state=self._on_port_state)
        self._lock = asyncio.Lock()  # one card operation (several AT commands) at a time
        self._channel: CardChannel | None = None
        self._identity: CardIdentity | None = None
        self._last_identity: CardIdentity | None = None
        self._generation = 0  # bumped on every removal: an identity read across one is void
        self._wake = asyncio.Event()
        self._subscribers = Subscribers[CardEvent](logger, "uicc.callback_error")
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    # --- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the port and bring the card up; on failure nothing is left open."""
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
        channel, self._channel = self._channel, None
        if channel is not None and self._port.connected:
            async with self._lock:
                await channel.transport.close()
        await self._port.close()

    @property
    def transport_name(self) -> str | None:
        return self._channel.transport.name if self._channel is not None else None

    @property
    def port(self) -> AtCommandPort:
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
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed():
                return await channel.authenticate(identity, rand, autn, context)

    async def gba_naf_derivation(self, naf_id: bytes, impi: str) -> bytes:
        """GBA_U NAF derivation (``DE``): Ks_ext_NAF; the card must hold a Ks from a GBA bootstrap."""
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed():
                return await channel.gba_naf_derivation(identity, naf_id, impi)

    async def write_gba_bootstrap_params(self, btid: str, lifetime: str) -> None:
        """B-TID and lifetime into EF_GBABP, keeping the RAND the card wrote there during the bootstrap."""
        async with self._lock:
            channel, identity = self._ready()
            async with self._absence_noticed():
                await channel.write_gba_bootstrap_params(identity, btid, lifetime)

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    # --- presence -------------------------------------------------------------------------------------

    def _emit(self, event: CardEvent) -> None:
        logger.info("card %s", event.kind.value, extra={"event": f"uicc.card_{event.kind.value}"})
        self._subscribers.emit(event)

    def _mark_absent(self, reason: str) -> None:
        self._generation += 1
        self._channel = None  # its channel went with the card (or the modem)
        was_present, self._identity = self._identity is not None, None
        if was_present:
            logger.info("card gone: %s", reason, extra={"event": "uicc.card_gone"})
            self._emit(CardEvent(CardEventKind.REMOVED))
        self._wake.set()

    @contextlib.asynccontextmanager
    async def _absence_noticed(self) -> AsyncIterator[None]:
        """A card that answers as absent (``+CME ERROR: 10``) is gone, whatever the URCs said."""
        try:
            yield
        except UiccAbsent as exc:
            self._mark_absent(str(exc))
            raise

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
                async with asyncio.timeout(self._config.presence_poll):
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
        transport = await open_transport(self._port, self._config.transport, files.USIM_AID_PREFIX)
        channel = CardChannel(transport)
        try:
            async with self._absence_noticed():
                identity = await channel.read_identity(self._config.application, imsi_source=self._imsi_from_modem)
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

    async def _imsi_from_modem(self) -> str:
        """An ISIM-only card has no EF_IMSI; the modem still knows the IMSI."""
        return at.parse_cimi(await self._port.command(at.cimi()))

    def _require_port(self) -> None:
        if self._closed:
            raise PortGoneError(f"{self._port.path}: card closed")
        if not self._port.connected:
            raise PortGoneError(f"{self._port.path}: port gone")

    def _ready(self) -> tuple[CardChannel, CardIdentity]:
        self._require_port()
        if self._channel is None or self._identity is None:
            raise UiccAbsent("no usable card in the modem")
        return self._channel, self._identity


async def open_card(config: ModemConfig) -> Card:
    """Open the modem's AT port and bring the card up (identity read, application selected on our channel).

    Whatever stops start-up raises and leaves nothing open (PortGoneError, UiccAbsent, UiccLocked,
    TransportUnavailable, ApplicationNotFound, ...): the caller retries with its own back-off. Once
    open, the Card follows removals, insertions and a vanishing port by itself (card events).
    """
    port = AtPort(config.port, baud=config.baud, command_timeout=config.command_timeout, reopen_max=config.reopen_max)
    card = Card(port, config)
    await card.start()
    return card
