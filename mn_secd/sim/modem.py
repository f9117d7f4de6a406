"""An AT modem on a real pseudo-terminal, with a software UICC behind it and real modems' quirks.

The daemon talks to modems through a serial port, and real modems disagree about almost everything
that matters on that port: echo, unsolicited result codes in the middle of answers, how AT+CCHO names
a channel, whether logical channels exist at all, who fetches ``61xx`` responses, whether
AUTHENTICATE may pass. Each such behaviour seen in the field (``docs/MODEMS.md`` says where) is a
switch in :class:`Quirks`, so tests can prove the daemon copes with each one, over a real tty.

The emulator serves the pty's master side in one background thread. The thread owns the master fd;
other threads (a test's) change the quirks, remove or insert the SIM, or make the port vanish, and
the thread notices through a wake-up pipe, so nothing ever waits longer than a ``select()`` round.

It depends on the card only through :class:`SimCard` (``process_apdu`` and ``profile.imsi``), so it
runs the project's software UICC as well as a test's small fake card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import threading
import time
import tty
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# The CLA channel coding (TS 102 221 10.1.1) is the daemon's own: it is arithmetic on one byte, the
# modem applies it exactly as the daemon's CSIM transport does, and the software UICC decodes CLA
# with its own code, so a mistake in the shared coding still shows up as a card that refuses or
# misroutes a command.
from mn_secd.uicc.apdu import channel_of, cla_for_channel

logger = logging.getLogger(__name__)

#: How AT+CCHO names the channel it opened: ``+CCHO: 1`` (most modems), a Sierra-style session
#: handle ``+CCHO: 000000000385A7CF`` (lpac #138/#139) or a bare ``1`` without prefix (Fibocom,
#: lpac #179/#209/#445).
CchoStyle = Literal["prefixed", "session_handle", "bare"]
CCHO_STYLES: tuple[CchoStyle, ...] = ("prefixed", "session_handle", "bare")
#: How the modem tells the PIN attempts left: ``AT+CPINR`` (TS 27.007 8.65), Quectel's
#: ``AT+QPINC``, Wavecom's (and Sierra's) ``AT+CPINC``, or not at all.
PinCounterStyle = Literal["cpinr", "qpinc", "cpinc", "none"]
PIN_COUNTER_STYLES: tuple[PinCounterStyle, ...] = ("cpinr", "qpinc", "cpinc", "none")

#: The Sierra handle of channel 1 is the one lpac's issue shows; other channels count up from it.
_SIERRA_HANDLE_BASE = 0x000000000385A7CE

#: +CME ERROR codes used here, with their TS 27.007 §9.2 texts (for AT+CMEE=2).
CME_TEXTS: dict[int, str] = {
    0: "phone failure",
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    16: "incorrect password",
    20: "memory full",
    21: "invalid index",
    22: "not found",
    50: "Incorrect parameters",
}
CME_PHONE_FAILURE = 0
CME_NOT_ALLOWED = 3
CME_NOT_SUPPORTED = 4
CME_SIM_NOT_INSERTED = 10
CME_SIM_PIN_REQUIRED = 11
CME_SIM_PUK_REQUIRED = 12
CME_SIM_FAILURE = 13
CME_SIM_BUSY = 14
CME_INCORRECT_PASSWORD = 16
CME_MEMORY_FULL = 20
CME_INVALID_INDEX = 21
CME_NOT_FOUND = 22
CME_INCORRECT_PARAMETERS = 50

#: Longest APDU AT+CSIM / AT+CGLA accept (5 header bytes + 255 data + Le), as in vendor manuals.
MAX_APDU = 261
#: A modem fetching ``61xx`` by itself gives up after this many GET RESPONSEs.
_MAX_INTERNAL_FETCHES = 8
#: A line longer than this without a terminator is noise; it is dropped.
_MAX_LINE = 4096

INS_AUTHENTICATE = 0x88
INS_MANAGE_CHANNEL = 0x70
INS_GET_RESPONSE = 0xC0
INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_READ_RECORD = 0xB2
INS_VERIFY = 0x20
INS_UNBLOCK_PIN = 0x2C
#: What Moxa's G2150I manual (a Wavecom-based modem) says AT+CSIM refuses with +CME ERROR: 3:
#: AUTHENTICATE (RUN GSM ALGORITHM), GET RESPONSE, the PIN commands and the updates.
_CSIM_RESTRICTED_INS = frozenset({0x88, 0xC0, 0x20, 0x24, 0x26, 0x28, 0x2C, 0xD6, 0xDC, 0x32, 0x44, 0x04, 0xFA})
#: SELECT MF without an answer: what Siemens-based firmware sends after every AT+CSIM.
_SELECT_MF = bytes.fromhex("00A4000C023F00")
#: Siemens keeps up to this many buffered SELECTs ("19 DFs and 1 EF") to send again before a command.
_MAX_SELECT_PATH = 20
#: What another program on the port seems to ask, and the answer everyone on the port then sees.
#: V.250 numeric forms of the basic result codes the emulator gives (ATV0).
_NUMERIC_CODES = {"OK": "0", "ERROR": "4"}
_FOREIGN_ANSWER = "\r\n+CSQ: 19,99\r\n\r\nOK\r\n"


class ProfileLike(Protocol):
    """The one thing the modem reads from the card profile: the IMSI, for AT+CIMI."""

    @property
    def imsi(self) -> str: ...


class SimCard(Protocol):
    """What the modem needs from a card (:class:`mn_secd.sim.usim.SoftUicc` is one)."""

    @property
    def profile(self) -> ProfileLike: ...

    def process_apdu(self, apdu: bytes) -> bytes:
        """One command APDU in, response data + SW1 SW2 out (T=0 behaviour: ``61xx`` for case 4)."""
        ...


@dataclass(frozen=True)
class Quirks:
    """Real modems' behaviours, each off by default (the default is a tidy TS 27.007 modem).

    Frozen: change them at run time with :meth:`ModemEmulator.set_quirks`, which swaps the whole
    object, so the serving thread always sees one consistent set per command.
    """

    #: Echo on at power-on (V.250 ``E1``). ATE0 turns it off as on real modems; setting this quirk
    #: at run time turns echo on (or off) right away, e.g. to test echo during APDU traffic.
    echo: bool = False
    #: A URC line (from ``urc_lines``, in turn) before every answer, i.e. between answers.
    urcs_between: bool = False
    #: A URC line inside every answer: after the info lines, before the final result code.
    urcs_inside: bool = False
    #: The URCs injected by ``urcs_between`` / ``urcs_inside``.
    urc_lines: tuple[str, ...] = ("+CREG: 1,1", "RING", "+CEREG: 1")
    #: Every write (echo, URCs, answers) goes out in pieces of ``split_size`` bytes,
    #: ``split_delay`` seconds apart.
    split_writes: bool = False
    split_size: int = 3
    split_delay: float = 0.002
    #: Lower-case hex in AT+CSIM/AT+CGLA/AT+CCHO is refused with a bare ``ERROR`` (Sierra EM7565).
    reject_lowercase_hex: bool = False
    #: Info lines without the space after the colon: ``+CSIM:4,"9000"`` (SIMCom A7908E).
    no_space_after_colon: bool = False
    #: How AT+CCHO names the channel (see :data:`CchoStyle`); AT+CGLA/AT+CCHC take the same token.
    ccho_style: CchoStyle = "prefixed"
    #: No logical channels at all: ``+CME ERROR: 4`` on AT+CCHO, AT+CCHC, AT+CGLA and on MANAGE
    #: CHANNEL sent through AT+CSIM (Dell DW5821e, Huawei MS2372h, Alcatel IK41).
    no_logical_channels: bool = False
    #: ``=?`` test commands answer ``ERROR`` (Fibocom FG132-GL; Sierra's AT+CGLA=?).
    no_test_commands: bool = False
    #: GET RESPONSE answers ``6100`` forever and never reaches the card (Quectel EC800G).
    get_response_loop: bool = False
    #: AUTHENTICATE (INS 88) is refused with ``+CME ERROR: 3`` and never reaches the card (Moxa).
    refuse_authenticate: bool = False
    #: The modem fetches ``61xx`` itself and returns data + ``9000``, as many real modems do.
    internal_get_response: bool = False
    #: Seconds before every answer.
    latency: float = 0.0
    #: Extra seconds before the answer to an APDU that is an AUTHENTICATE and reached the card
    #: (the card has run it: a host that times out here must not resend it).
    auth_latency: float = 0.0
    #: How the modem reports the PIN attempts left (see :data:`PinCounterStyle`).
    pin_counter: PinCounterStyle = "cpinr"
    #: Seconds after power-up (and after a SIM is inserted) during which every SIM command answers
    #: ``+CME ERROR: 10`` (SIM not inserted): the modem has not found the card yet.
    boot_no_sim: float = 0.0
    #: Seconds after that (and after a PIN is accepted) during which it answers ``+CME ERROR: 14``
    #: (SIM busy) while it reads the card (u-blox SARA-R4 at power-up, SIMCom SIM800 after the PIN).
    boot_sim_busy: float = 0.0
    #: AT+CSIM refuses AUTHENTICATE, GET RESPONSE, the PIN commands and updates with
    #: ``+CME ERROR: 3`` (Wavecom-based modems, as Moxa's G2150I manual lists them).
    csim_restricted: bool = False
    #: After every AT+CSIM on the basic channel the modem selects the MF again, and before the next
    #: one it sends the SELECTs it buffered since (Siemens AC75 and Multi-Tech manuals, AT+CSIM).
    reselect_mf: bool = False
    #: Every Nth AT+CSIM/AT+CGLA reaches the card but is answered ``+CME ERROR: 0`` (Quectel EG95).
    cme0_every: int = 0
    #: Every Nth AT+CSIM/AT+CGLA reaches the card but its ``+CSIM:``/``+CGLA:`` line is lost: a bare
    #: ``OK`` (Quectel EG95 "drops commands").
    drop_answer_every: int = 0
    #: The card answers READ BINARY / READ RECORD this many times in a row with ``6Cxx`` (the exact
    #: length), and the modem passes it on instead of re-issuing the command itself (Nordic nRF91).
    wrong_le: int = 0
    #: Another program shares the port (ModemManager probing): every this many seconds, while idle,
    #: an answer to an AT+CSQ the host never sent (``+CSQ: 19,99`` and ``OK``).
    foreign_answers: float = 0.0
    #: The stored profile holds ``ATV0`` (saved with ``AT&W``): numeric result codes at power-on
    #: (V.250 6.2.6: ``0<CR>`` for OK, ``4<CR>`` for ERROR, information lines without the leading
    #: ``<CR><LF>``) until ``ATV1``; ``ATZ`` restores the profile's V0.
    numeric_results: bool = False
    #: Seconds after power-up (start and every return of the port) during which the modem ignores
    #: the port: no echo, no answer, input dropped (a modem still booting).
    boot_silent: float = 0.0

    def __post_init__(self) -> None:
        if self.ccho_style not in CCHO_STYLES:
            raise ValueError(f"ccho_style must be one of {CCHO_STYLES}, not {self.ccho_style!r}")
        if self.pin_counter not in PIN_COUNTER_STYLES:
            raise ValueError(f"pin_counter must be one of {PIN_COUNTER_STYLES}, not {self.pin_counter!r}")
        if self.split_size < 1:
            raise ValueError("split_size must be >= 1")
        for name in (
            "split_delay",
            "latency",
            "auth_latency",
            "boot_no_sim",
            "boot_sim_busy",
            "foreign_answers",
            "boot_silent",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("cme0_every", "drop_answer_every", "wrong_le"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.urc_lines and (self.urcs_between or self.urcs_inside):
            raise ValueError("URC injection needs at least one line in urc_lines")


class _CmeError(Exception):
    """A failure the modem reports as ``+CME ERROR: <code>`` (``ERROR`` when AT+CMEE=0)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _BareError(Exception):
    """A failure the modem reports as a bare ``ERROR`` whatever AT+CMEE says."""


class _AnswerDropped(Exception):
    """The command was done, but its information lines are lost: a bare ``OK`` goes back."""


class _Halted(Exception):
    """The port is being closed: abandon the command in progress."""


@dataclass
class _Port:
    """One incarnation of the AT port: a pty, a wake-up pipe and the thread serving them."""

    master: int
    slave: int
    slave_path: str
    wake_r: int
    wake_w: int
    halt: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def close_fds(self) -> None:
        for fd in (self.master, self.slave, self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _split_params(text: str) -> list[tuple[str, bool]]:
    """``1,"ab,c",x`` -> ``[("1", False), ("ab,c", True), ("x", False)]``; unterminated quote -> 50."""
    params: list[tuple[str, bool]] = []
    i = 0
    while True:
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise _CmeError(CME_INCORRECT_PARAMETERS)
            value, quoted, i = text[i + 1 : end], True, end + 1
            while i < len(text) and text[i] == " ":
                i += 1
        else:
            end = text.find(",", i)
            end = len(text) if end < 0 else end
            value, quoted, i = text[i:end].strip(), False, end
        params.append((value, quoted))
        if i >= len(text):
            return params
        if text[i] != ",":
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        i += 1


def _parse_int(value: str) -> int:
    if not value.isdigit():
        raise _CmeError(CME_INCORRECT_PARAMETERS)
    return int(value)


class ModemEmulator:
    """A TS 27.007 modem on a pseudo-terminal, serving ``card`` (``None``: no SIM inserted).

    ``start()`` returns the port's path: the pty slave (``/dev/pts/N``), or ``link`` when given, a
    symlink the emulator keeps pointing at the current pty. The symlink is how a test keeps one
    path across :meth:`vanish` / :meth:`restore` (a new pty usually gets a new ``/dev/pts/N``);
    without it, :meth:`restore` returns the new path and :attr:`path` always holds the current one.
    """

    def __init__(self, card: SimCard | None, quirks: Quirks | None = None, *, link: str | None = None) -> None:
        self._lock = threading.Lock()
        self._card = card
        self._quirks = quirks if quirks is not None else Quirks()
        self._link = link
        self._port: _Port | None = None
        self._log: list[str] = []
        self._apdu_ins: Counter[int] = Counter()
        self._urc_queue: deque[str] = deque()
        self._urc_turn = 0
        # Modem settings (reset by a power cycle, i.e. by restore()).
        self._echo = self._quirks.echo
        self._verbose = not self._quirks.numeric_results  # V.250 V1 (verbose) or V0 (numeric)
        self._cmee = 0
        self._booted_at = time.monotonic()  # power-up of the modem itself (boot_silent)
        # Logical channels the modem knows are open on the card, and AT+CCHO's session tokens.
        self._card_channels: set[int] = set()
        self._sessions: dict[int, int] = {}  # session key (channel or Sierra handle) -> channel
        # When the card was last powered (start, restore, insertion) or took its PIN: the boot quirks.
        self._powered_at = time.monotonic()
        self._pin_taken_at: float | None = None
        self._apdu_commands = 0  # AT+CSIM and AT+CGLA so far, for cme0_every / drop_answer_every
        self._wrong_le_given: dict[bytes, int] = {}  # READ command header -> 6Cxx answers given in a row
        self._select_path: list[bytes] = []  # reselect_mf: the SELECTs buffered on the basic channel

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the pty and serve it in a background thread; returns the port's path."""
        return self._open_port()

    def stop(self) -> None:
        """Stop serving and close the pty (idempotent). Prompt: the thread is woken through its pipe
        and abandons any latency wait or blocked write; only a card call in progress is waited for."""
        self._close_port()

    def vanish(self) -> None:
        """The port disappears (USB reset, unplug): the master closes, so on the host's open slave
        fd poll() reports POLLHUP, read() returns EOF (pyserial: "device reports readiness to read
        but returned no data") and write() fails with EIO; the symlink (if any) is removed. The
        modem forgets its channels, closing them on the card as a rebooting modem does."""
        if self._port is None:
            raise RuntimeError("the port is not open")
        self._close_port()

    def restore(self) -> str:
        """The port comes back after :meth:`vanish`: a new pty (at the same ``link`` path if one
        was given), modem settings back to power-on defaults (echo per quirk, AT+CMEE=0)."""
        return self._open_port()

    def __enter__(self) -> ModemEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def path(self) -> str | None:
        """The port's current path (the link when one is managed), ``None`` while vanished/stopped."""
        port = self._port
        if port is None:
            return None
        return self._link if self._link is not None else port.slave_path

    @property
    def slave_path(self) -> str | None:
        """The current ``/dev/pts/N`` (also when a link is managed)."""
        port = self._port
        return None if port is None else port.slave_path

    def _open_port(self) -> str:
        with self._lock:
            if self._port is not None:
                raise RuntimeError("the port is already open")
            if self._link is not None and os.path.lexists(self._link) and not os.path.islink(self._link):
                raise FileExistsError(f"{self._link} exists and is not a symlink: not replacing it")
            master, slave = os.openpty()
            tty.setraw(slave)  # no line discipline: no echo, no CR/LF translation, 8 bit clean
            os.set_blocking(master, False)
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_w, False)
            port = _Port(master, slave, os.ttyname(slave), wake_r, wake_w)
            self._echo = self._quirks.echo
            self._verbose = not self._quirks.numeric_results
            self._cmee = 0
            self._urc_queue.clear()
            self._powered_at, self._pin_taken_at = time.monotonic(), None
            self._booted_at = self._powered_at
            self._select_path = []
            if self._link is not None:
                tmp = f"{self._link}.{os.getpid()}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                os.symlink(port.slave_path, tmp)
                os.replace(tmp, self._link)
            port.thread = threading.Thread(target=self._serve, args=(port,), name="modem-emulator", daemon=True)
            self._port = port
            port.thread.start()
            return self._link if self._link is not None else port.slave_path

    def _close_port(self) -> None:
        with self._lock:
            port, self._port = self._port, None
        if port is None:
            return
        port.halt.set()
        self._wake(port)
        if port.thread is not None:
            port.thread.join(timeout=5.0)
        port.close_fds()
        if self._link is not None and os.path.islink(self._link):
            with contextlib.suppress(OSError):
                if os.readlink(self._link) == port.slave_path:
                    os.unlink(self._link)
        self._reset_card_channels()

    def _reset_card_channels(self) -> None:
        """A rebooting modem closes the logical channels it opened; the card must not leak them."""
        with self._lock:
            card, channels = self._card, sorted(self._card_channels)
            self._card_channels.clear()
            self._sessions.clear()
        if card is None:
            return
        for channel in channels:
            try:
                card.process_apdu(bytes([0x00, INS_MANAGE_CHANNEL, 0x80, channel]))
            except Exception:
                logger.exception("card failed to close channel %d", channel, extra={"event": "modem.card_error"})

    @staticmethod
    def _wake(port: _Port) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the thread
            os.write(port.wake_w, b"w")

    # --- run-time controls ------------------------------------------------------------------------

    @property
    def quirks(self) -> Quirks:
        return self._quirks

    def set_quirks(self, quirks: Quirks | None = None, /, **changes: object) -> Quirks:
        """Swap the quirks (a whole :class:`Quirks`, or field changes to the current one); the next
        command sees the new set. Returns the quirks now in force."""
        with self._lock:
            new = quirks if quirks is not None else self._quirks
            if changes:
                unknown = set(changes) - {f.name for f in dataclasses.fields(Quirks)}
                if unknown:
                    raise TypeError(f"unknown quirk(s): {', '.join(sorted(unknown))}")
                new = dataclasses.replace(new, **changes)  # type: ignore[arg-type]
            if "echo" in changes or new.echo != self._quirks.echo:
                self._echo = new.echo
            if "numeric_results" in changes or new.numeric_results != self._quirks.numeric_results:
                self._verbose = not new.numeric_results  # as if the profile had just been loaded
            if (new.cme0_every, new.drop_answer_every) != (self._quirks.cme0_every, self._quirks.drop_answer_every):
                self._apdu_commands = 0  # "every Nth" counts from the moment it is switched on
            self._quirks = new
            return new

    @property
    def card(self) -> SimCard | None:
        return self._card

    def remove_sim(self, urcs: Sequence[str] = ("+CPIN: NOT READY", "+SIMCARD: NOT AVAILABLE")) -> None:
        """Take the SIM out: the removal URCs (``urcs``: modems differ in which they send), then
        ``+CME ERROR: 10`` for every SIM command; open channels are gone."""
        with self._lock:
            self._card = None
            self._card_channels.clear()
            self._sessions.clear()
        for line in urcs:
            self.post_urc(line)

    def insert_sim(self, card: SimCard) -> None:
        """Insert ``card`` (freshly reset, as a powered-up card is): URC ``+CPIN: READY``."""
        with self._lock:
            self._card = card
            self._card_channels.clear()
            self._sessions.clear()
            self._powered_at, self._pin_taken_at = time.monotonic(), None
            self._select_path = []
        self.post_urc("+CPIN: READY")

    def post_urc(self, line: str) -> None:
        """Send an unsolicited result code as soon as the modem is idle (dropped while vanished)."""
        with self._lock:
            port = self._port
            if port is None:
                return
            self._urc_queue.append(line)
        self._wake(port)

    # --- what went over the wire ------------------------------------------------------------------

    @property
    def log(self) -> list[str]:
        """Every command line received, in order (a copy, safe to read from any thread)."""
        with self._lock:
            return list(self._log)

    def count(self, prefix: str) -> int:
        """How many received command lines start with ``prefix`` (case-insensitive, like AT)."""
        p = prefix.upper()
        with self._lock:
            return sum(1 for line in self._log if line.upper().startswith(p))

    def apdu_count(self, ins: int) -> int:
        """How many well-formed APDUs with this INS the host sent (AT+CSIM and AT+CGLA)."""
        with self._lock:
            return self._apdu_ins[ins]

    def clear_log(self) -> None:
        """Forget the command log and APDU counts (e.g. after a client's start-up)."""
        with self._lock:
            self._log.clear()
            self._apdu_ins.clear()

    # --- the serving thread -----------------------------------------------------------------------

    def _serve(self, port: _Port) -> None:
        buf = bytearray()
        foreign_due = time.monotonic() + self._quirks.foreign_answers
        try:
            while not port.halt.is_set():
                wait = 0.5
                period = self._quirks.foreign_answers
                if period:
                    wait = max(0.0, min(wait, foreign_due - time.monotonic()))
                ready, _, _ = select.select([port.master, port.wake_r], [], [], wait)
                if port.wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(port.wake_r, 4096)
                if port.halt.is_set():
                    return
                self._flush_urcs(port)
                if period and not buf and time.monotonic() >= foreign_due:
                    # Idle between our host's commands: another program's answer shows up here too.
                    self._write(port, _FOREIGN_ANSWER.encode("ascii"))
                    foreign_due = time.monotonic() + period
                elif not period:
                    foreign_due = time.monotonic()
                if port.master not in ready:
                    continue
                try:
                    data = os.read(port.master, 4096)
                except BlockingIOError:
                    continue
                buf += data
                self._handle_input(port, buf)
        except _Halted:
            return
        except OSError:
            if not port.halt.is_set():
                logger.exception("modem emulator port failed", extra={"event": "modem.port_error"})

    def _handle_input(self, port: _Port, buf: bytearray) -> None:
        while True:
            ends = [i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0]
            if not ends:
                if len(buf) > _MAX_LINE:
                    buf.clear()
                return
            end = min(ends)
            raw = bytes(buf[:end])
            del buf[: end + 1]
            line = raw.decode("latin-1").strip()
            if line:
                self._handle_line(port, line)

    def _flush_urcs(self, port: _Port) -> None:
        while True:
            with self._lock:
                if not self._urc_queue:
                    return
                line = self._urc_queue.popleft()
            self._write(port, f"\r\n{line}\r\n".encode("latin-1"))

    def _next_urc(self, q: Quirks) -> bytes:
        with self._lock:
            line = q.urc_lines[self._urc_turn % len(q.urc_lines)]
            self._urc_turn += 1
        return f"\r\n{line}\r\n".encode("latin-1")

    def _handle_line(self, port: _Port, line: str) -> None:
        with self._lock:
            q = self._quirks
            if time.monotonic() - self._booted_at < q.boot_silent:
                return  # still booting: the line is lost, as on a modem whose firmware is not up
            self._log.append(line)
            echo = self._echo
        if line[:2].upper() != "AT":
            return  # V.250: a line without the "AT" prefix is not a command; a modem ignores it
        head = bytearray()
        if echo:
            head += line.encode("latin-1") + b"\r"
        if q.urcs_between:
            head += self._next_urc(q)
        if head:
            self._write(port, bytes(head))
        info: list[str] = []
        try:
            self._dispatch(port, line[2:], q, info)
            final = "OK"
        except _CmeError as exc:
            final = self._cme_text(exc.code)
        except _BareError:
            final = "ERROR"
        except _AnswerDropped:
            info, final = [], "OK"
        self._sleep(port, q.latency)
        with self._lock:
            verbose = self._verbose  # after the command: ATV1 answers in the form it asks for
        out = bytearray()
        for text in info:
            out += f"\r\n{text}\r\n".encode("latin-1") if verbose else f"{text}\r\n".encode("latin-1")
        if q.urcs_inside:
            out += self._next_urc(q)
        if verbose:
            out += f"\r\n{final}\r\n".encode("latin-1")
        else:  # V.250 6.2.6, V0: <numeric code><CR>; an extended code (+CME ERROR) keeps its text
            out += f"{_NUMERIC_CODES.get(final, final)}\r".encode("latin-1")
        self._write(port, bytes(out))

    def _cme_text(self, code: int) -> str:
        with self._lock:
            cmee = self._cmee
        if cmee == 0:
            return "ERROR"
        if cmee == 1:
            return f"+CME ERROR: {code}"
        return f"+CME ERROR: {CME_TEXTS.get(code, 'unknown')}"

    def _sleep(self, port: _Port, seconds: float) -> None:
        if seconds > 0 and port.halt.wait(seconds):
            raise _Halted

    def _write(self, port: _Port, data: bytes) -> None:
        q = self._quirks
        step = q.split_size if q.split_writes else len(data)
        for start in range(0, len(data), step):
            if start and q.split_writes:
                self._sleep(port, q.split_delay)
            self._write_all(port, data[start : start + step])

    def _write_all(self, port: _Port, data: bytes) -> None:
        """Write without ever blocking for good: a full pty (nobody reading) waits on halt too."""
        view = memoryview(data)
        while view:
            if port.halt.is_set():
                raise _Halted
            try:
                written = os.write(port.master, view)
            except BlockingIOError:
                select.select([port.wake_r], [port.master], [], 0.1)
                continue
            view = view[written:]

    # --- commands ---------------------------------------------------------------------------------

    def _info(self, q: Quirks, name: str, value: str) -> str:
        return f"{name}:{value}" if q.no_space_after_colon else f"{name}: {value}"

    def _dispatch(self, port: _Port, body: str, q: Quirks, info: list[str]) -> None:
        upper = body.upper()
        if upper == "":
            return
        if upper in ("E", "E0", "E1"):
            with self._lock:
                self._echo = upper == "E1"
            return
        if upper in ("V", "V0", "V1"):
            with self._lock:
                self._verbose = upper == "V1"
            return
        if upper in ("I", "I0"):
            info += ["mn_secd AT modem emulator", "Revision: 1"]
            return
        if upper in ("Z", "Z0"):
            with self._lock:
                self._echo = q.echo
                self._verbose = not q.numeric_results
                self._cmee = 0
            return
        if not upper.startswith("+"):
            raise _BareError
        name_end = len(body)
        for i, ch in enumerate(body):
            if ch in "=?":
                name_end = i
                break
        name, rest = upper[:name_end], body[name_end:]
        if rest == "=?":
            if q.no_test_commands or name not in _TEST_ANSWERS:
                raise _BareError
            answer = _TEST_ANSWERS[name]
            if answer:
                info.append(self._info(q, name, answer))
            return
        if name == "+CMEE":
            self._cmd_cmee(q, rest, info)
        elif name == "+CIMI" and rest == "":
            card = self._require_card()
            state = self._sim_state(card)
            if state != "READY":
                raise _CmeError(CME_SIM_PIN_REQUIRED if state == "SIM PIN" else CME_SIM_PUK_REQUIRED)
            info.append(card.profile.imsi)
        elif name == "+CPIN" and rest == "?":
            info.append(self._info(q, "+CPIN", self._sim_state(self._require_card())))
        elif name == "+CPIN" and rest.startswith("="):
            self._cmd_cpin(rest[1:])
        elif name in _PIN_COUNTER_COMMANDS and _PIN_COUNTER_COMMANDS[name] == q.pin_counter:
            info.extend(self._pin_counter_lines(q, name))
        elif name == "+CSIM" and rest.startswith("="):
            self._cmd_csim(port, q, rest[1:], info)
        elif name == "+CCHO" and rest.startswith("="):
            self._cmd_ccho(q, rest[1:], info)
        elif name == "+CCHC" and rest.startswith("="):
            self._cmd_cchc(q, rest[1:])
        elif name == "+CGLA" and rest.startswith("="):
            self._cmd_cgla(port, q, rest[1:], info)
        else:
            raise _BareError

    def _cmd_cmee(self, q: Quirks, rest: str, info: list[str]) -> None:
        if rest == "?":
            with self._lock:
                info.append(self._info(q, "+CMEE", str(self._cmee)))
            return
        if rest in ("", "="):
            value = 0
        elif rest.startswith("="):
            params = _split_params(rest[1:])
            if len(params) != 1 or params[0][1]:
                raise _CmeError(CME_INCORRECT_PARAMETERS)
            value = _parse_int(params[0][0])
        else:
            raise _BareError
        if value not in (0, 1, 2):
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        with self._lock:
            self._cmee = value

    def _require_card(self) -> SimCard:
        """The card, unless there is none (10) or the modem is still finding (10) or reading it (14)."""
        with self._lock:
            card, q = self._card, self._quirks
            powered, pin_taken = self._powered_at, self._pin_taken_at
        if card is None:
            raise _CmeError(CME_SIM_NOT_INSERTED)
        now = time.monotonic()
        if now - powered < q.boot_no_sim:
            raise _CmeError(CME_SIM_NOT_INSERTED)
        if now - powered < q.boot_no_sim + q.boot_sim_busy:
            raise _CmeError(CME_SIM_BUSY)
        if pin_taken is not None and now - pin_taken < q.boot_sim_busy:
            raise _CmeError(CME_SIM_BUSY)
        return card

    # --- the PIN, as the modem asks the card about it -------------------------------------------

    def _card_sw(self, card: SimCard, apdu: bytes) -> int:
        response = self._card_call(card, apdu)
        return int.from_bytes(response[-2:], "big")

    def _attempts(self, card: SimCard) -> tuple[int, int]:
        """PIN and PUK attempts left, from VERIFY / UNBLOCK PIN without data (a verified or
        unlocked card says 9000: the modem then shows the full counts, as modems do)."""
        pin = self._card_sw(card, bytes.fromhex("0020000100"))
        puk = self._card_sw(card, bytes.fromhex("002C000100"))
        return (pin & 0x0F if pin & 0xFFF0 == 0x63C0 else 0 if pin == 0x6983 else 3,
                puk & 0x0F if puk & 0xFFF0 == 0x63C0 else 0 if puk == 0x6983 else 10)  # fmt: skip

    def _sim_state(self, card: SimCard) -> str:
        """``+CPIN:``'s answer, from the card's own PIN status (TS 102 221 11.1.9)."""
        sw = self._card_sw(card, bytes.fromhex("0020000100"))
        if sw & 0xFFF0 == 0x63C0 and sw & 0x0F:
            return "SIM PIN"
        if sw in (0x63C0, 0x6983):
            puk = self._card_sw(card, bytes.fromhex("002C000100"))
            if puk & 0xFFF0 == 0x63C0 and puk & 0x0F:
                return "SIM PUK"
            raise _CmeError(CME_SIM_FAILURE)  # PIN and PUK both blocked: the card is dead
        return "READY"

    def _cmd_cpin(self, args: str) -> None:
        """``AT+CPIN=<pin>`` (VERIFY) or ``AT+CPIN=<puk>,<new pin>`` (UNBLOCK PIN), TS 27.007 8.3."""
        params = _split_params(args)
        if not 1 <= len(params) <= 2 or not all(value.isdigit() and 4 <= len(value) <= 8 for value, _ in params):
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        card = self._require_card()
        state = self._sim_state(card)
        if state == "READY":
            raise _CmeError(CME_NOT_ALLOWED)
        block = [value.encode("ascii").ljust(8, b"\xff") for value, _ in params]
        if state == "SIM PIN" and len(params) == 1:
            sw = self._card_sw(card, bytes.fromhex("0020000108") + block[0])
        elif state == "SIM PUK" and len(params) == 2 and len(params[0][0]) == 8:
            sw = self._card_sw(card, bytes.fromhex("002C000110") + block[0] + block[1])
        else:
            raise _CmeError(CME_SIM_PUK_REQUIRED if state == "SIM PUK" else CME_INCORRECT_PARAMETERS)
        what = "PIN" if state == "SIM PIN" else "PUK"
        if sw == 0x9000:
            with self._lock:
                self._pin_taken_at = time.monotonic()
            logger.info("AT+CPIN: %s accepted", what, extra={"event": "modem.pin"})
            return
        logger.info("AT+CPIN: %s refused (SW %04X)", what, sw, extra={"event": "modem.pin"})
        if sw == 0x6983 or (state == "SIM PIN" and sw == 0x63C0):
            raise _CmeError(CME_SIM_PUK_REQUIRED if state == "SIM PIN" else CME_SIM_FAILURE)
        raise _CmeError(CME_INCORRECT_PASSWORD)

    def _pin_counter_lines(self, q: Quirks, name: str) -> list[str]:
        pin, puk = self._attempts(self._require_card())
        if name == "+CPINR":
            return [self._info(q, "+CPINR", f"SIM PIN,{pin},3"), self._info(q, "+CPINR", f"SIM PUK,{puk},10")]
        if name == "+QPINC":
            return [self._info(q, "+QPINC", f'"SC",{pin},{puk}'), self._info(q, "+QPINC", '"P2",3,10')]
        return [self._info(q, "+CPINC", f"{pin},3,{puk},10")]

    def _hex(self, q: Quirks, value: str) -> bytes:
        if q.reject_lowercase_hex and any(c in "abcdef" for c in value):
            raise _BareError
        if len(value) % 2 or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        return bytes.fromhex(value)

    def _length_and_apdu(self, q: Quirks, params: Sequence[tuple[str, bool]]) -> bytes:
        (length_text, length_quoted), (hex_text, hex_quoted) = params
        if length_quoted or not hex_quoted:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        length = _parse_int(length_text)
        apdu = self._hex(q, hex_text)
        if length != len(hex_text) or not 4 <= len(apdu) <= MAX_APDU:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        return apdu

    def _cmd_csim(self, port: _Port, q: Quirks, args: str, info: list[str]) -> None:
        params = _split_params(args)
        if len(params) != 2:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        apdu = self._length_and_apdu(q, params)
        if q.csim_restricted and apdu[1] in _CSIM_RESTRICTED_INS:
            with self._lock:
                self._apdu_ins[apdu[1]] += 1
            raise _CmeError(CME_NOT_ALLOWED)
        if q.reselect_mf and channel_of(apdu[0]) == 0:
            response = self._siemens_exchange(port, q, apdu)
        else:
            response = self._exchange(port, q, apdu)
        text = response.hex().upper()
        info.append(self._info(q, "+CSIM", f'{len(text)},"{text}"'))

    def _cmd_cgla(self, port: _Port, q: Quirks, args: str, info: list[str]) -> None:
        params = _split_params(args)
        if len(params) != 3:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        apdu = self._length_and_apdu(q, params[1:])
        channel = self._session_channel(q, params[0][0])
        apdu = bytes([cla_for_channel(apdu[0], channel)]) + apdu[1:]
        response = self._exchange(port, q, apdu)
        text = response.hex().upper()
        info.append(self._info(q, "+CGLA", f'{len(text)},"{text}"'))

    @staticmethod
    def _session_key(q: Quirks, token: str) -> int:
        """AT+CCHO's token as a number: the channel, or the Sierra handle read as hex."""
        text = token.strip()
        digits = "0123456789abcdefABCDEF" if q.ccho_style == "session_handle" else "0123456789"
        if not text or len(text) > 16 or any(c not in digits for c in text):
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        return int(text, 16 if q.ccho_style == "session_handle" else 10)

    def _session_channel(self, q: Quirks, token: str) -> int:
        """The channel behind an AT+CCHO session token (after checking the SIM and channel support)."""
        key = self._session_key(q, token)
        self._require_card()
        if q.no_logical_channels:
            raise _CmeError(CME_NOT_SUPPORTED)
        with self._lock:
            channel = self._sessions.get(key)
        if channel is None:
            raise _CmeError(CME_INVALID_INDEX)
        return channel

    def _cmd_ccho(self, q: Quirks, args: str, info: list[str]) -> None:
        params = _split_params(args)
        if len(params) != 1 or not params[0][1]:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        aid = self._hex(q, params[0][0])
        if not 1 <= len(aid) <= 16:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        card = self._require_card()
        if q.no_logical_channels:
            raise _CmeError(CME_NOT_SUPPORTED)
        opened = self._card_call(card, bytes([0x00, INS_MANAGE_CHANNEL, 0x00, 0x00, 0x01]))
        opened = self._fetch(card, 0x00, opened)
        if len(opened) != 3 or opened[-2:] != b"\x90\x00" or not 1 <= opened[0] <= 19:
            raise _CmeError(CME_MEMORY_FULL)
        channel = opened[0]
        with self._lock:
            self._card_channels.add(channel)
        select_aid = bytes([cla_for_channel(0x00, channel), INS_SELECT, 0x04, 0x04, len(aid)]) + aid
        selected = self._fetch(card, select_aid[0], self._card_call(card, select_aid))
        if selected[-2] not in (0x90, 0x91, 0x92):
            self._close_on_card(card, channel)
            raise _CmeError(CME_NOT_FOUND)
        key = _SIERRA_HANDLE_BASE + channel if q.ccho_style == "session_handle" else channel
        with self._lock:
            self._sessions[key] = channel
        token = f"{key:016X}" if q.ccho_style == "session_handle" else str(key)
        info.append(token if q.ccho_style == "bare" else self._info(q, "+CCHO", token))

    def _cmd_cchc(self, q: Quirks, args: str) -> None:
        params = _split_params(args)
        if len(params) != 1:
            raise _CmeError(CME_INCORRECT_PARAMETERS)
        channel = self._session_channel(q, params[0][0])
        card = self._require_card()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v != channel}
        self._close_on_card(card, channel)

    def _close_on_card(self, card: SimCard, channel: int) -> None:
        with self._lock:
            self._card_channels.discard(channel)
        self._card_call(card, bytes([0x00, INS_MANAGE_CHANNEL, 0x80, channel]))

    def _card_call(self, card: SimCard, apdu: bytes) -> bytes:
        """One APDU to the card; a card that crashes or answers without a status word is a SIM failure."""
        try:
            response = card.process_apdu(apdu)
        except Exception:
            logger.exception("card failed on INS %02X", apdu[1], extra={"event": "modem.card_error"})
            raise _CmeError(CME_SIM_FAILURE) from None
        if len(response) < 2:
            raise _CmeError(CME_SIM_FAILURE)
        return response

    def _fetch(self, card: SimCard, cla: int, response: bytes) -> bytes:
        """What a modem that handles ``61xx`` itself does: GET RESPONSE on the same channel."""
        data = bytearray()
        for _ in range(_MAX_INTERNAL_FETCHES):
            if response[-2] != 0x61:
                break
            data += response[:-2]
            get = bytes([cla_for_channel(0x00, channel_of(cla)), INS_GET_RESPONSE, 0x00, 0x00, response[-1]])
            response = self._card_call(card, get)
        return bytes(data) + response

    def _siemens_exchange(self, port: _Port, q: Quirks, apdu: bytes) -> bytes:
        """AT+CSIM on the basic channel as Siemens-based firmware runs it: the SELECTs buffered since
        the last MF re-selection go to the card first (not before a GET RESPONSE, which would lose
        the answer it fetches), the command, then SELECT MF again -- unless the card holds an answer
        for a GET RESPONSE (``61xx``)."""
        card = self._require_card()
        ins = apdu[1]
        if ins != INS_GET_RESPONSE:
            with self._lock:
                path = list(self._select_path)
            for select_apdu in path:
                self._card_call(card, select_apdu)
        response = self._exchange(port, q, apdu)
        if ins == INS_SELECT and response[-2] in (0x90, 0x91, 0x61):
            p1, data = apdu[2], apdu[5 : 5 + apdu[4]] if len(apdu) > 4 else b""
            with self._lock:
                if p1 in (0x04, 0x08) or data in (b"", b"\x3f\x00"):
                    self._select_path = [apdu]  # an AID, a path from the MF, or the MF: a fresh path
                elif len(self._select_path) < _MAX_SELECT_PATH:
                    self._select_path.append(apdu)
        if response[-2] not in (0x61, 0x9F):
            self._card_call(card, _SELECT_MF)
        return response

    def _exchange(self, port: _Port, q: Quirks, apdu: bytes) -> bytes:
        """One host APDU (AT+CSIM / AT+CGLA) through the modem to the card, quirks applied."""
        ins = apdu[1]
        with self._lock:
            self._apdu_ins[ins] += 1
            self._apdu_commands += 1
            number = self._apdu_commands
        card = self._require_card()
        if ins == INS_AUTHENTICATE and q.refuse_authenticate:
            raise _CmeError(CME_NOT_ALLOWED)
        if ins == INS_MANAGE_CHANNEL and q.no_logical_channels:
            raise _CmeError(CME_NOT_SUPPORTED)
        if ins == INS_GET_RESPONSE and q.get_response_loop:
            return b"\x61\x00"
        response = self._card_call(card, apdu)
        if ins == INS_MANAGE_CHANNEL:
            self._track_manage_channel(apdu, response)
        if q.internal_get_response:
            response = self._fetch(card, apdu[0], response)
        if ins == INS_AUTHENTICATE:
            self._sleep(port, q.auth_latency)
            logger.info(
                "AUTHENTICATE (%s): %04X",
                _authenticate_context(apdu),
                int.from_bytes(response[-2:], "big"),
                extra={"event": "modem.authenticate"},
            )
        if ins in (INS_READ_BINARY, INS_READ_RECORD) and q.wrong_le and len(apdu) == 5:
            response = self._wrong_le(q, apdu, response)
        if q.cme0_every and number % q.cme0_every == 0:
            raise _CmeError(CME_PHONE_FAILURE)
        if q.drop_answer_every and number % q.drop_answer_every == 0:
            raise _AnswerDropped
        return response

    def _wrong_le(self, q: Quirks, apdu: bytes, response: bytes) -> bytes:
        """``6Cxx`` naming the length the card has, ``wrong_le`` times in a row per READ command."""
        if response[-2:] != b"\x90\x00":
            return response
        with self._lock:
            given = self._wrong_le_given.get(apdu[:4], 0)
            if given >= q.wrong_le:
                self._wrong_le_given.pop(apdu[:4], None)
                return response
            self._wrong_le_given[apdu[:4]] = given + 1
        return bytes([0x6C, (len(response) - 2) & 0xFF])

    def _track_manage_channel(self, apdu: bytes, response: bytes) -> None:
        """Remember channels opened/closed through AT+CSIM, so a modem reboot closes them too."""
        if response[-2:] != b"\x90\x00":
            return
        p1, p2 = apdu[2], apdu[3]
        with self._lock:
            if p1 == 0x00:
                opened = p2 if p2 else (response[0] if len(response) == 3 else 0)
                if opened:
                    self._card_channels.add(opened)
            elif p1 == 0x80:
                self._card_channels.discard(p2 if p2 else channel_of(apdu[0]))


def _authenticate_context(apdu: bytes) -> str:
    """What an AUTHENTICATE APDU asks for (TS 31.102 7.1.2), for the emulator's log."""
    p2 = apdu[3] if len(apdu) > 3 else 0
    tag = apdu[5] if len(apdu) > 5 else 0
    if p2 & 0x07 == 0x01:
        return "3G context"
    if p2 & 0x07 == 0x04:
        return {0xDD: "GBA bootstrapping", 0xDE: "GBA NAF derivation"}.get(tag, "GBA context")
    return f"P2 {p2:02X}"


#: The commands that report PIN attempts left, by the ``pin_counter`` style that has them (any form:
#: ``AT+CPINR``, ``AT+CPINR="SIM PIN"``, ``AT+QPINC?``, ``AT+QPINC="SC"``, ``AT+CPINC``...).
_PIN_COUNTER_COMMANDS: dict[str, PinCounterStyle] = {"+CPINR": "cpinr", "+QPINC": "qpinc", "+CPINC": "cpinc"}

#: ``AT+<name>=?`` answers (empty: just ``OK``).
_TEST_ANSWERS: dict[str, str] = {
    "+CMEE": "(0-2)",
    "+CIMI": "",
    "+CPIN": "",
    "+CSIM": "",
    "+CCHO": "",
    "+CCHC": "",
    "+CGLA": "",
}
