"""The modem's AT port on asyncio: pyserial for opening and configuring, the event loop for I/O.

pyserial opens the tty and sets it raw at the right speed; after that the file descriptor is read
with ``loop.add_reader`` and written with ``os.write`` (no thread, no polling), and every byte goes
through the sans-IO :class:`~mn_secd.uicc.at.AtConnection`.

One command at a time (an :class:`asyncio.Lock`), each with a timeout. Unsolicited result codes go
to a side channel (``on_urc``) whenever they arrive. A port that vanishes (USB reset, unplugged
modem: ``EIO``/``ENXIO``, or end of file) fails the outstanding command with
:class:`~mn_secd.errors.PortGoneError`, is reported through ``on_state(False)``, and is reopened in
the background with exponential backoff; ``on_state(True)`` says it is back and initialised.

Log lines name commands, never their arguments or answers: an AUTHENTICATE answer carries CK/IK.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import termios
from collections.abc import Callable
from typing import Protocol

import serial

from mn_secd.errors import AtCommandError, AtParseError, ModemTimeout, PortGoneError
from mn_secd.uicc import at

logger = logging.getLogger(__name__)

#: errno values that mean the device behind the fd is gone, not that one read failed.
_GONE_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.EPIPE})
#: Commands sent after every (re)open, once ``ATV1`` has made the result codes verbose
#: (:func:`~mn_secd.uicc.at.verbose_results`): no echo, numeric +CME ERROR codes.
INIT_COMMANDS = ("ATE0", "AT+CMEE=1")
#: How long one ``ATV1`` of the AT sync waits for its answer, and then for a late one, before the
#: next is sent: a sync probe every 0.75 s.
SYNC_PROBE = 0.5
SYNC_GRACE = 0.25
#: How long ``mn-secd uicc``, ``bootstrap`` and ``doctor`` wait at open for a modem that does not
#: answer yet (its first seconds after power-up). The daemon does not sync: it reopens with back-off.
CLI_SYNC_SECONDS = 10.0


def _command_name(command: at.Command) -> str:
    """``AT+CSIM=14,"00A4..."`` -> ``AT+CSIM``: what may appear in logs and error texts."""
    return at.command_name(command.text)


def _denied_hint(path: str, exc: Exception) -> str:
    """Under systemd, EPERM on open is the unit's device policy, not file permissions (EACCES).

    ``DevicePolicy=closed`` refuses every device node not listed in ``DeviceAllow=``, and a
    ``char-ttyUSB`` class pattern matches nothing when the USB-serial driver was loaded after the
    service started; ``$INVOCATION_ID`` is set for every process systemd starts as a unit.
    """
    if getattr(exc, "errno", None) != errno.EPERM or "INVOCATION_ID" not in os.environ:
        return ""
    return (
        f" (the service's DeviceAllow= does not list this device: add 'DeviceAllow={path} rw' in a drop-in,"
        " or let mn-secd-generator write it from [modem] port; see docs/INSTALL.md)"
    )


class AtCommandPort(Protocol):
    """What the card and the APDU transports need of an AT port (implemented by :class:`AtPort`)."""

    path: str
    command_timeout: float

    @property
    def connected(self) -> bool: ...

    async def open(self) -> None:
        """Open and initialise the port; PortGoneError if it cannot be opened or does not answer."""

    async def close(self) -> None:
        """Stop reopening, fail any outstanding command, release the port."""

    async def command(self, command: at.Command, *, timeout: float | None = None) -> list[str]:
        """One command; its information lines on OK (AtCommandError, ModemTimeout, PortGoneError)."""

    def listen(
        self,
        *,
        on_urc: Callable[[str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_stray: Callable[[], None] | None = None,
    ) -> None:
        """Where unsolicited result codes go, who hears that the port went (False) or is back (True),
        and who hears of an answer to a command we never sent (another program on the port)."""


class AtPort:
    """An AT command port: ``await open()``, ``await command(...)``, ``await close()``."""

    def __init__(
        self,
        path: str,
        *,
        baud: int = 115200,
        command_timeout: float = 5.0,
        reopen_initial: float = 0.1,
        reopen_max: float = 5.0,
        sync_for: float = 0.0,
    ) -> None:
        if sync_for < 0:
            raise ValueError("sync_for must be >= 0")
        self.path = path
        self.sync_for = sync_for
        self.baud = baud
        self.command_timeout = command_timeout
        self._on_urc: Callable[[str], None] | None = None
        self._on_state: Callable[[bool], None] | None = None
        self._on_stray: Callable[[], None] | None = None
        self._reopen_initial = reopen_initial
        self._reopen_max = reopen_max
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._conn = at.AtConnection()
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[list[str]] | None = None
        self._info: list[str] = []
        self._stale_cleared = asyncio.Event()
        self._stale_cleared.set()
        self._reopen_task: asyncio.Task[None] | None = None
        self._closing = False
        self.commands_sent = 0  # for the benchmark and diagnostics
        self.stray_answers = 0  # answers to commands we never sent: another program on the port

    def listen(
        self,
        *,
        on_urc: Callable[[str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_stray: Callable[[], None] | None = None,
    ) -> None:
        """URCs go to ``on_urc`` whenever they arrive; ``on_state`` hears the port go (False) and
        return (True); ``on_stray`` hears of each answer to a command we never sent."""
        self._on_urc = on_urc
        self._on_state = on_state
        self._on_stray = on_stray

    # --- life cycle -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._fd >= 0

    async def open(self) -> None:
        """Open and initialise the port; PortGoneError if it cannot be opened or does not answer."""
        self._closing = False
        await self._open_and_init(sync=True)

    async def close(self) -> None:
        """Stop reopening, fail any outstanding command, release the tty."""
        self._closing = True
        task, self._reopen_task = self._reopen_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_fd(PortGoneError(f"{self.path}: port closed"))

    async def _open_and_init(self, *, sync: bool = False) -> None:
        """Open, then ``ATV1``, ``ATE0``, ``AT+CMEE=1``; with ``sync`` (and ``sync_for``) the first
        open waits out a modem that is still silent after power-up (:meth:`_sync`)."""
        self._open_fd()
        text = "ATV1"
        try:
            if not (sync and self.sync_for > 0 and await self._sync()):
                await self._verbose(self.command_timeout)
            for text in INIT_COMMANDS:
                await self.command(at.plain(text))
        except (ModemTimeout, AtCommandError) as exc:
            self._drop_fd(PortGoneError(f"{self.path}: modem does not answer"))
            raise PortGoneError(f"{self.path}: modem does not answer {text}: {exc}") from exc

    async def _verbose(self, timeout: float) -> None:
        """``ATV1``, accepting V.250's ``0`` as its OK: a modem whose stored profile says ``ATV0``
        answers only in numeric codes until then. An ERROR to it was written verbosely, so the
        modem is in verbose mode already and init goes on."""
        try:
            await self.command(at.verbose_results(), timeout=timeout)
        except AtCommandError as exc:
            logger.debug("ATV1 refused: %s", exc, extra={"event": "uicc.at_v1_refused"})

    async def _sync(self) -> bool:
        """The AT sync of the first open: an ``ATV1`` every 0.75 s for up to ``sync_for`` seconds,
        until the modem answers anything (a modem still booting ignores the port).

        True once an ``ATV1`` was answered; False when only a late answer came (a slow modem, which
        then gets a full-timeout ``ATV1``). No answer at all is :class:`ModemTimeout`. Only ever
        ``ATV1``: the sync never repeats a command that does anything to the card.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sync_for
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise ModemTimeout(f"ATV1: no answer within {self.sync_for:g} s (AT sync)")
            try:
                await self._verbose(min(SYNC_PROBE, left))
                return True
            except ModemTimeout:
                pass
            # The probe was abandoned: an answer that comes now is late, but says the modem is up.
            try:
                async with asyncio.timeout(max(0.0, min(SYNC_GRACE, deadline - loop.time()))):
                    await self._stale_cleared.wait()
            except TimeoutError:
                # Still silent. An answer that comes after all is dropped, or taken for the next
                # probe's: the same ATV1, so nothing is mistaken.
                self._conn.forget_stale()
                self._stale_cleared.set()
                continue
            if self._fd < 0:
                raise PortGoneError(f"{self.path}: port gone")
            return False

    def _open_fd(self) -> None:
        try:
            port = serial.Serial(self.path, self.baud, timeout=0, write_timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortGoneError(f"{self.path}: cannot open: {exc}{_denied_hint(self.path, exc)}") from exc
        fd = port.fileno()
        try:
            # VMIN 1: with pyserial's VMIN 0 a read with no data returns 0 bytes, the same as end of
            # file; with VMIN 1 and O_NONBLOCK it raises EAGAIN, so 0 bytes means the port is gone.
            attrs = termios.tcgetattr(fd)
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            port.reset_input_buffer()  # a late answer from before a reopen is not ours
        except (termios.error, OSError) as exc:
            port.close()
            raise PortGoneError(f"{self.path}: cannot configure: {exc}") from exc
        os.set_blocking(fd, False)
        self._serial, self._fd = port, fd
        self._conn = at.AtConnection()
        self._stale_cleared.set()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        logger.info("AT port open", extra={"event": "uicc.port_open", "port": self.path})

    def _drop_fd(self, reason: PortGoneError) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(reason)
        self._stale_cleared.set()

    def _lost(self, detail: str) -> None:
        if self._fd < 0:
            return
        logger.warning("AT port gone: %s", detail, extra={"event": "uicc.port_gone", "port": self.path})
        self._drop_fd(PortGoneError(f"{self.path}: port gone ({detail})"))
        self._notify_state(False)
        if not self._closing and self._reopen_task is None:
            self._reopen_task = asyncio.get_running_loop().create_task(self._reopen_loop())

    async def _reopen_loop(self) -> None:
        delay = self._reopen_initial
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._open_and_init()
                except PortGoneError as exc:
                    logger.debug("reopen failed: %s", exc, extra={"event": "uicc.port_reopen_failed"})
                    delay = min(delay * 2, self._reopen_max)
                    continue
                logger.info("AT port back", extra={"event": "uicc.port_back", "port": self.path})
                self._reopen_task = None
                self._notify_state(True)
                return
        finally:
            if self._reopen_task is asyncio.current_task():
                self._reopen_task = None

    def _notify_state(self, up: bool) -> None:
        if self._on_state is not None:
            try:
                self._on_state(up)
            except Exception:
                logger.exception("port state callback failed", extra={"event": "uicc.callback_error"})

    # --- reading --------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        while self._fd >= 0:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    self._lost(os.strerror(exc.errno))
                    return
                raise
            if not data:
                self._lost("end of file")
                return
            self._conn.receive_data(data)
            self._process_events()

    def _process_events(self) -> None:
        while True:
            try:
                event = self._conn.next_event()
            except AtParseError as exc:
                logger.warning("garbage on the AT port: %s", exc, extra={"event": "uicc.at_garbage"})
                continue
            if event is at.NEED_DATA:
                break
            self._dispatch(event)
        if not self._conn.has_stale:
            self._stale_cleared.set()

    def _dispatch(self, event: at.Event | at.Need) -> None:
        if isinstance(event, at.Info):
            self._info.append(event.text)
        elif isinstance(event, at.Urc):
            logger.debug("URC %s", event.text[:40], extra={"event": "uicc.urc"})
            if self._on_urc is not None:
                try:
                    self._on_urc(event.text)
                except Exception:
                    logger.exception("URC callback failed", extra={"event": "uicc.callback_error"})
        elif isinstance(event, at.Ok | at.Error):
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                if isinstance(event, at.Ok):
                    waiter.set_result(self._info)
                else:
                    waiter.set_exception(_FinalError(event))
        elif isinstance(event, at.Discarded):
            logger.debug("late answer discarded", extra={"event": "uicc.at_discarded"})
        elif isinstance(event, at.Stray):
            # Never the line itself: it may be another program's command, PIN included.
            self.stray_answers += 1
            logger.debug("answer to a command we never sent", extra={"event": "uicc.at_stray"})
            if self._on_stray is not None:
                try:
                    self._on_stray()
                except Exception:
                    logger.exception("stray callback failed", extra={"event": "uicc.callback_error"})

    # --- commands -----------------------------------------------------------------------------------

    async def command(self, command: at.Command, *, timeout: float | None = None) -> list[str]:
        """Send one command; its information lines on OK.

        Raises AtCommandError (ERROR / +CME ERROR), ModemTimeout, PortGoneError.
        """
        limit = self.command_timeout if timeout is None else timeout
        name = _command_name(command)
        async with self._lock:
            if self._fd < 0:
                raise PortGoneError(f"{self.path}: port not open")
            await self._settle(limit)
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[list[str]] = loop.create_future()
            self._waiter, self._info = waiter, []
            data = self._conn.send(command)
            try:
                async with asyncio.timeout(limit):
                    await self._write(data)
                    self.commands_sent += 1
                    return await waiter
            except TimeoutError:
                raise ModemTimeout(f"{name}: no final result code within {limit:g} s") from None
            except _FinalError as exc:
                raise AtCommandError(name, exc.final.cme, exc.final.text) from None
            finally:
                # The lines go to the caller only: a key in an answer (GBA NAF derivation) is not kept here.
                self._waiter, self._info = None, []
                if self._conn.pending is command:  # timed out or cancelled: its late answer is not the next's
                    self._conn.abandon()
                    self._stale_cleared.clear()

    async def _settle(self, limit: float) -> None:
        """Before a new command, give an abandoned one's late answer a chance to arrive and be dropped."""
        if not self._conn.has_stale:
            return
        try:
            async with asyncio.timeout(limit):
                await self._stale_cleared.wait()
        except TimeoutError:
            logger.info("abandoned command never answered", extra={"event": "uicc.at_stale_forgotten"})
            self._conn.forget_stale()
        if self._fd < 0:
            raise PortGoneError(f"{self.path}: port gone")

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            fd = self._fd
            if fd < 0:
                raise PortGoneError(f"{self.path}: port gone")
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()

                def wake(future: asyncio.Future[None] = ready) -> None:
                    if not future.done():
                        future.set_result(None)

                loop.add_writer(fd, wake)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
                continue
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    self._lost(os.strerror(exc.errno))
                    raise PortGoneError(f"{self.path}: port gone ({os.strerror(exc.errno)})") from exc
                raise
            view = view[written:]


class _FinalError(Exception):
    """Carries an ERROR final result from the reader callback to the waiting command."""

    def __init__(self, final: at.Error) -> None:
        super().__init__("AT error")
        self.final = final
