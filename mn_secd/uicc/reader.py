"""The card in a PC/SC reader as a card source: what :class:`~mn_secd.uicc.card.Card` needs, over pcscd.

Where the AT port has ``AT+CPIN?``, URCs and a port that vanishes, a reader has
:class:`~mn_secd.uicc.pcsc.ReaderWatcher`: it says when the card is pulled or put back and when
the reader (or pcscd) goes and returns, and it looks for them again with a back-off capped at
``reopen_max`` seconds. Each start-up opens a fresh :class:`~mn_secd.uicc.pcsc.PcscTransport`
(exclusive access, a logical channel when the card gives one); when the card or the reader goes,
that transport is released at once, so the exclusive handle never locks out the next card.

A transport that died on its own -- a command without an answer, the card pulled mid-command --
counts as the card gone: the card is brought up again, which over PC/SC means a new connection,
and the keystore wipes its keys as for a SIM taken out of a modem. While a command that never got
an answer is still stuck inside pcscd (a mute card), no new connection is tried: that command
keeps the card, pcscd would refuse a new connection as a sharing violation ("another program
holds the card"), and the operator needs to hear the real remedy: pull the card and put it back.

A reader has no modem to ask the IMSI (``AT+CIMI``), so an ISIM-only card is refused with
:class:`~mn_secd.errors.ApplicationNotFound`: mn-secd reads the IMSI from the card's USIM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mn_secd.errors import MnSecdError, ReaderError, ReaderGone, UiccAbsent
from mn_secd.uicc.options import ModemConfig
from mn_secd.uicc.pcsc import (
    DEFAULT_TIMEOUT,
    PcscTransport,
    ReaderEvent,
    ReaderEventKind,
    ReaderInfo,
    ReaderWatcher,
    choose_reader,
    list_readers,
)
from mn_secd.uicc.transport import ApduTransport

logger = logging.getLogger(__name__)

_GONE = frozenset({ReaderEventKind.CARD_REMOVED, ReaderEventKind.READER_GONE})


class ReaderSource:
    """A :class:`~mn_secd.uicc.card.CardSource`: the card in the PC/SC reader whose name contains ``config.reader``."""

    def __init__(self, config: ModemConfig) -> None:
        if config.reader is None:
            raise ValueError("a reader source needs config.reader")
        self.wanted = config.reader
        self._timeout = config.command_timeout
        self._watcher = ReaderWatcher(self.wanted, self._on_reader_event, reconnect_max=config.reopen_max)
        self._on_presence: Callable[[bool, str], None] | None = None
        self._transport: PcscTransport | None = None
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def transport(self) -> PcscTransport | None:
        """The current connection to the card (its reader's full name and the card's ATR), if any."""
        return self._transport

    @property
    def connected(self) -> bool:
        return self._watcher.reader is not None

    @property
    def imsi_source(self) -> None:
        return None  # no modem to ask: an ISIM-only card is refused (module docstring)

    def listen(self, on_presence: Callable[[bool, str], None]) -> None:
        self._on_presence = on_presence

    async def open(self) -> None:
        """Start watching the reader (PcscUnavailable without pyscard)."""
        await self._watcher.start()

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
        for task in list(self._releases):
            await task
        await self._watcher.close()

    async def open_transport(self) -> ApduTransport:
        previous = self._transport
        if previous is not None:
            if previous.stuck:
                raise ReaderGone(
                    f"{previous.reader!r} is still waiting for the card to answer a command; "
                    "pull the card and insert it again"
                )
            self._transport = None
            await previous.close()
        transport = await PcscTransport.open(self.wanted, timeout=self._timeout, on_dead=self._on_transport_dead)
        self._transport = transport
        return transport

    def unreachable(self, detail: str | None = None) -> ReaderGone:
        return ReaderGone(f"PC/SC reader {self.wanted!r}: {detail or 'not there (unplugged, or pcscd not running)'}")

    def refused_authenticate(self, transport: ApduTransport) -> bool:
        """A reader has one way to the card."""
        return False

    # --- presence -----------------------------------------------------------------------------------

    def _tell(self, present: bool, why: str) -> None:
        if self._on_presence is not None:
            self._on_presence(present, why)

    def _on_reader_event(self, event: ReaderEvent) -> None:
        gone = event.kind in _GONE
        if gone:
            self._release_transport()
        self._tell(not gone, f"PC/SC {event.kind.value}: {event.reader or self.wanted}")

    def _on_transport_dead(self, error: UiccAbsent | ReaderError) -> None:
        self._tell(False, f"connection to the card lost: {error}")

    def _release_transport(self) -> None:
        """The card or the reader went: give the handle back now, without waiting for the next start-up."""
        transport, self._transport = self._transport, None
        if transport is None or transport.stuck:  # a stuck one is kept: it says when it is free again
            self._transport = transport
            return
        task = asyncio.get_running_loop().create_task(transport.close())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


# --- for diagnostics (mn-secd uicc readers, mn-secd doctor) -----------------------------------------


@dataclass(frozen=True, slots=True)
class ReaderSurvey:
    """What pcscd shows, and which reader ``[modem] reader`` picks (or why none)."""

    readers: tuple[ReaderInfo, ...]
    chosen: ReaderInfo | None
    problem: MnSecdError | None  # ReaderNotFound, or UiccAbsent when the chosen reader is empty


async def survey_readers(wanted: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> ReaderSurvey:
    """Every reader pcscd knows, and the one the daemon would use for ``wanted`` (nothing is connected).

    Raises :class:`~mn_secd.errors.PcscUnavailable` without pyscard or pcscd: no survey at all.
    """
    readers = tuple(await list_readers(timeout=timeout))
    if wanted is None:
        return ReaderSurvey(readers, None, None)
    try:
        name = choose_reader([r.name for r in readers], wanted, [r.name for r in readers if r.card_present])
    except ReaderError as exc:
        return ReaderSurvey(readers, None, exc)
    chosen = next(r for r in readers if r.name == name)
    problem = None if chosen.card_present else UiccAbsent(f"no card in {name!r}")
    return ReaderSurvey(readers, chosen, problem)
