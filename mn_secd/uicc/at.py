"""AT command codec, sans-IO (3GPP TS 27.007 answers as real modems send them).

Bytes from the port go in with :meth:`AtConnection.receive_data`; typed, frozen events come out of
:meth:`AtConnection.next_event`; :meth:`AtConnection.send` turns a :class:`Command` into the bytes
to write. No I/O and no clock here, so every modem quirk can be tested byte by byte.

Why the codec has to know which command is outstanding: an answer line only means something
relative to the command it answers. ``12345`` is the IMSI after ``AT+CIMI`` and the session id
after a Fibocom ``AT+CCHO``; ``+CREG: 1`` is noise in both. So each :class:`Command` says which
prefixes (and which bare shapes) belong to its answer, and every other line is a URC.

Quirks tolerated (``docs/MODEMS.md`` says which modems do what): echo on, URCs between the lines
of an answer, answers split over many writes, ``\\r\\n`` / ``\\r`` / ``\\n`` line ends, no space
after the colon, unquoted or lowercase hex, ``+CCHO:`` with a session handle or a bare number,
V.250 numeric result codes (``0``/``4``) in answer to ``ATV1`` only (:func:`verbose_results`).

After a command times out the modem may still answer it later; :meth:`AtConnection.abandon` keeps
that command in line so its late answer is swallowed (reported as :class:`Discarded`) instead of
being taken for the answer to the next command.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from mn_secd.errors import AtParseError

#: A line longer than this without a line end is garbage, not an answer (AT+CSIM answers are ~530).
MAX_LINE = 4096

# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Echo:
    """The modem echoed the command line back (echo on, ``ATE1``)."""

    text: str


@dataclass(frozen=True, slots=True)
class Info:
    """An information line that belongs to the answer of the outstanding command."""

    text: str


@dataclass(frozen=True, slots=True)
class Urc:
    """An unsolicited result code (``+CREG: 1``, ``RING``, ``+CPIN: NOT READY``...)."""

    text: str


@dataclass(frozen=True, slots=True)
class Ok:
    """Final result code ``OK``."""


@dataclass(frozen=True, slots=True)
class Error:
    """Final result code ``ERROR``, ``+CME ERROR: <n|text>`` or ``+CMS ERROR: <n|text>``.

    ``cme`` is the numeric code (verbose texts are mapped back to their number when known);
    ``text`` keeps a verbose text that has no known number.
    """

    cme: int | None = None
    text: str | None = None
    sms: bool = False  # +CMS ERROR rather than +CME ERROR


@dataclass(frozen=True, slots=True)
class Discarded:
    """A line of the late answer to an abandoned (timed-out) command; kept for logging only."""

    text: str


@dataclass(frozen=True, slots=True)
class Stray:
    """A line that answers a command we never sent: a final result code while none of ours is
    outstanding, or the echo of another program's command line. Another process talks on the port.

    ``text`` is for counting and classifying only: an echoed line may carry someone else's PIN, so
    it is never logged.
    """

    text: str = field(repr=False)


Final = Ok | Error
Event = Echo | Info | Urc | Ok | Error | Discarded | Stray


class Need(enum.Enum):
    """Sentinel from :meth:`AtConnection.next_event`: feed more bytes."""

    DATA = "need-data"


NEED_DATA = Need.DATA

# --- +CME ERROR codes (TS 27.007 9.2) ----------------------------------------------------------------

CME_PHONE_FAILURE = 0
CME_NOT_ALLOWED = 3
CME_NOT_SUPPORTED = 4
CME_SIM_NOT_INSERTED = 10
CME_SIM_PIN_REQUIRED = 11
CME_SIM_PUK_REQUIRED = 12
CME_SIM_FAILURE = 13
CME_SIM_BUSY = 14
CME_SIM_WRONG = 15
CME_INCORRECT_PASSWORD = 16

#: Verbose texts (``AT+CMEE=2``, or modems that ignore ``AT+CMEE=1``) mapped to their numbers.
_CME_TEXTS: dict[str, int] = {
    "phone failure": 0,
    "no connection to phone": 1,
    "phone-adaptor link reserved": 2,
    "operation not allowed": 3,
    "operation not supported": 4,
    "ph-sim pin required": 5,
    "sim not inserted": 10,
    "sim pin required": 11,
    "sim puk required": 12,
    "sim failure": 13,
    "sim busy": 14,
    "sim wrong": 15,
    "incorrect password": 16,
    "sim pin2 required": 17,
    "sim puk2 required": 18,
    "memory full": 20,
    "invalid index": 21,
    "not found": 22,
    "memory failure": 23,
    "no network service": 30,
    "network timeout": 31,
    "unknown": 100,
}


def cme_from_text(text: str) -> int | None:
    """The number of a verbose ``+CME ERROR`` text, or None for vendor texts (``Parameters error``)."""
    return _CME_TEXTS.get(text.strip().strip('"').lower())


# --- commands --------------------------------------------------------------------------------------

_BARE_DIGITS = re.compile(r"\d{5,15}")
_BARE_SESSION = re.compile(r'"?[0-9A-Fa-f]{1,32}"?')
_HEX = re.compile(r"[0-9A-Fa-f]*")


@dataclass(frozen=True, slots=True)
class Command:
    """One AT command line and the shape of the information lines that answer it.

    ``secret`` marks a line that carries a secret (``AT+CPIN="<PIN>"``): its repr shows only the
    command's name, so it cannot leak into a log line or an error message by accident.
    """

    text: str  # e.g. 'AT+CSIM=10,"00A4000C00"'; CR is added by AtConnection.send
    prefixes: tuple[str, ...] = ()  # e.g. ("+CSIM:",): prefixed information lines of the answer
    bare: re.Pattern[str] | None = field(default=None, compare=False)  # unprefixed information lines
    secret: bool = field(default=False, compare=False)
    #: ``0`` / ``4`` alone on a line are this command's OK / ERROR (V.250 numeric result codes).
    #: Only :func:`verbose_results` sets it: elsewhere a bare digit is an answer (Fibocom's
    #: ``AT+CCHO`` session number), never a final result code.
    numeric_final: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.text.isascii() or not self.text.isprintable() or not self.text.upper().startswith("AT"):
            raise ValueError("an AT command is printable ASCII starting with AT")

    def __repr__(self) -> str:
        if self.secret:
            return f"Command({command_name(self.text)!r}, <secret>)"
        return f"Command({self.text!r}, prefixes={self.prefixes!r})"

    def claims(self, line: str) -> bool:
        upper = line.upper()
        if any(upper.startswith(p) for p in self.prefixes):
            return True
        return self.bare is not None and self.bare.fullmatch(line) is not None


def command_name(text: str) -> str:
    """``AT+CSIM=14,"00A4..."`` -> ``AT+CSIM``: what of a command line may appear in logs and errors."""
    cut = min((i for i in (text.find("="), text.find("?")) if i >= 0), default=len(text))
    return text[:cut]


def plain(text: str) -> Command:
    """A command answered by a final result code only (``ATE0``, ``AT+CMEE=1``, ``AT+CCHC=...``)."""
    return Command(text)


def query(text: str, prefix: str) -> Command:
    """A command answered by ``<prefix> ...`` lines (``AT+CPIN?`` -> ``+CPIN: READY``)."""
    return Command(text, (prefix.upper(),))


def _hex(data: bytes) -> str:
    return data.hex().upper()


def csim(apdu: bytes) -> Command:
    """``AT+CSIM=<length>,"<HEX>"``: length in hex characters, uppercase hex (Sierra refuses lowercase)."""
    if not apdu:
        raise ValueError("empty APDU")
    return Command(f'AT+CSIM={2 * len(apdu)},"{_hex(apdu)}"', ("+CSIM:",))


def cgla(session: str, apdu: bytes) -> Command:
    """``AT+CGLA=<session>,<length>,"<HEX>"``; the session id is passed through exactly as CCHO gave it."""
    if not apdu:
        raise ValueError("empty APDU")
    if _BARE_SESSION.fullmatch(session) is None or '"' in session:
        raise ValueError("session id must be hex digits")
    return Command(f'AT+CGLA={session},{2 * len(apdu)},"{_hex(apdu)}"', ("+CGLA:",))


def ccho(aid: bytes) -> Command:
    """``AT+CCHO="<AID>"``: answered by ``+CCHO: <id>``, a bare ``<id>`` (Fibocom) or a handle (Sierra)."""
    if not 1 <= len(aid) <= 16:
        raise ValueError("an AID is 1..16 octets")
    return Command(f'AT+CCHO="{_hex(aid)}"', ("+CCHO:",), _BARE_SESSION)


def verbose_results() -> Command:
    """``ATV1``: verbose result codes, whatever the modem's stored profile says (ITU-T V.250 6.2.6).

    A modem whose profile holds ``ATV0`` (saved with ``AT&W``) answers with V.250's numeric codes,
    ``0<CR>`` for OK and ``4<CR>`` for ERROR, until it is told ``ATV1``; it may answer ``ATV1``
    itself in either form. So this one command takes a bare ``0`` as OK and ``4`` as ERROR. It is
    not saved on the modem (no ``AT&W``): the setting lasts until the modem restarts, and the port
    sends it again at every open.
    """
    return Command("ATV1", numeric_final=True)


def cchc(session: str) -> Command:
    """``AT+CCHC=<session>``: some modems answer ``+CCHC`` before OK, which is claimed here."""
    return Command(f"AT+CCHC={session}", ("+CCHC",))


def enter_pin(pin: str) -> Command:
    """``AT+CPIN="<PIN>"`` (TS 27.007 8.3): a secret line; the PIN is 4 to 8 digits (TS 102 221 9.5)."""
    if not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 8):
        raise ValueError("a SIM PIN is 4 to 8 decimal digits")
    return Command(f'AT+CPIN="{pin}"', secret=True)


def cimi() -> Command:
    """``AT+CIMI``: the IMSI as a bare line of digits."""
    return Command("AT+CIMI", ("+CIMI:",), _BARE_DIGITS)


# --- answer parsing ----------------------------------------------------------------------------------


def _value(line: str, prefix: str) -> str:
    return line[len(prefix) :].strip()


def _only_line(lines: list[str], prefix: str, what: str) -> str:
    found = [ln for ln in lines if ln.upper().startswith(prefix)]
    if len(found) != 1:
        raise AtParseError(f"expected one {prefix} line in the answer to {what}, got {len(found)}")
    return found[0]


_HEX_ANSWER = re.compile(r'(\d{1,6})\s*,\s*("?)([0-9A-Fa-f]*)\2')


def parse_hex_answer(lines: list[str], prefix: str) -> bytes:
    """``+CSIM: <len>,"<hex>"`` / ``+CGLA: ...`` -> bytes, with the length checked against the hex."""
    line = _only_line(lines, prefix, prefix.rstrip(":"))
    match = _HEX_ANSWER.fullmatch(_value(line, prefix))
    if match is None:
        raise AtParseError(f"malformed {prefix} answer")
    length, hexdata = int(match.group(1)), match.group(3)
    if length != len(hexdata):
        raise AtParseError(f"{prefix} length {length} does not match {len(hexdata)} hex characters")
    if len(hexdata) % 2 or len(hexdata) < 4:
        raise AtParseError(f"{prefix} answer of {len(hexdata)} hex characters is not data + SW1 SW2")
    return bytes.fromhex(hexdata)


def parse_csim(lines: list[str]) -> bytes:
    """Response APDU (data + SW1 SW2) from the information lines of an ``AT+CSIM`` answer."""
    return parse_hex_answer(lines, "+CSIM:")


def parse_cgla(lines: list[str]) -> bytes:
    """Response APDU (data + SW1 SW2) from the information lines of an ``AT+CGLA`` answer."""
    return parse_hex_answer(lines, "+CGLA:")


def parse_ccho(lines: list[str]) -> str:
    """The session id, exactly as the modem wrote it (``1``, ``2``, ``000000000385a7cf``)."""
    candidates = [_value(ln, "+CCHO:") if ln.upper().startswith("+CCHO:") else ln for ln in lines]
    if len(candidates) != 1:
        raise AtParseError(f"expected one session id in the AT+CCHO answer, got {len(candidates)}")
    session = candidates[0].strip().strip('"')
    if _HEX.fullmatch(session) is None or not 1 <= len(session) <= 32:
        raise AtParseError("AT+CCHO session id is not a number or a hex handle")
    return session


def parse_cimi(lines: list[str]) -> str:
    """The IMSI from ``AT+CIMI`` (bare digits, or ``+CIMI: <digits>`` on some firmware)."""
    candidates = [_value(ln, "+CIMI:") if ln.upper().startswith("+CIMI:") else ln for ln in lines]
    if len(candidates) != 1 or _BARE_DIGITS.fullmatch(candidates[0].strip('"')) is None:
        raise AtParseError("AT+CIMI did not answer with 5..15 digits")
    return candidates[0].strip('"')


def parse_cpin(lines: list[str]) -> str:
    """``+CPIN: READY`` -> ``READY`` (also ``SIM PIN``, ``SIM PUK``, ``NOT READY``, ...).

    A ``+CPIN:`` URC (Quectel, SIMCom and u-blox send ``+CPIN: READY`` unsolicited once the SIM is
    read) can land inside the answer and has the answer's own shape, so it cannot be told apart.
    Every such line states the SIM's state when it was written; the last one is the newest.
    """
    found = [ln for ln in lines if ln.upper().startswith("+CPIN:")]
    if not found:
        raise AtParseError("expected a +CPIN: line in the answer to AT+CPIN?, got none")
    return _value(found[-1], "+CPIN:").strip('"').upper()


# --- the connection ------------------------------------------------------------------------------------

_LINE_END = re.compile(rb"[\r\n]")
_FINAL_OK = "OK"
_FINAL_ERROR = "ERROR"
_CME = "+CME ERROR:"
_CMS = "+CMS ERROR:"
#: V.250 numeric result codes, taken only for a command that allows them (``numeric_final``).
_NUMERIC_FINALS: dict[str, Final] = {"0": Ok(), "4": Error()}


def _final(line: str) -> Final | None:
    upper = line.upper()
    if upper == _FINAL_OK:
        return Ok()
    if upper == _FINAL_ERROR:
        return Error()
    for prefix, sms in ((_CME, False), (_CMS, True)):
        if upper.startswith(prefix):
            detail = line[len(prefix) :].strip()
            if detail.isdigit() and len(detail) <= 5:
                return Error(cme=int(detail), sms=sms)
            code = cme_from_text(detail) if not sms else None
            return Error(cme=code, text=None if code is not None else detail, sms=sms)
    return None


class AtConnection:
    """The AT codec: bytes <-> events, one command outstanding at a time (plus abandoned ones)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: deque[bytes | None] = deque()  # None marks an over-long line
        self._pending: Command | None = None
        self._stale: deque[Command] = deque()
        self._forgotten = 0  # abandoned commands given up on: their late finals are not strays

    # -- sending --

    @property
    def pending(self) -> Command | None:
        """The command whose answer is being read, if any."""
        return self._pending

    @property
    def has_stale(self) -> bool:
        """True while an abandoned command's late answer may still arrive."""
        return bool(self._stale)

    def send(self, command: Command) -> bytes:
        """The bytes to write for ``command``; its answer is then read as events."""
        if self._pending is not None:
            raise RuntimeError("AT command sent while another one is outstanding")
        self._pending = command
        return command.text.encode("ascii") + b"\r"

    def abandon(self) -> None:
        """Give up waiting for the outstanding command; a late answer will come out as Discarded."""
        if self._pending is not None:
            self._stale.append(self._pending)
            self._pending = None

    def forget_stale(self) -> None:
        """Stop expecting late answers (the modem dropped the abandoned commands).

        Should one still come, its final result code is Discarded rather than taken for a Stray.
        """
        self._forgotten += len(self._stale)
        self._stale.clear()

    # -- receiving --

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the port (any split, any amount)."""
        self._buffer += data
        *complete, rest = _LINE_END.split(bytes(self._buffer))
        self._lines.extend(line for line in complete if line)
        self._buffer = bytearray(rest)
        if len(self._buffer) > MAX_LINE:
            self._buffer.clear()
            self._lines.append(None)  # reported from next_event, in order

    def next_event(self) -> Event | Need:
        """The next event, or NEED_DATA. Raises AtParseError for one bad line, which is then dropped."""
        while self._lines:
            raw = self._lines.popleft()
            if raw is None:
                raise AtParseError(f"AT line longer than {MAX_LINE} bytes without a line end")
            if not all(0x20 <= b < 0x7F or b == 0x09 for b in raw):
                raise AtParseError(f"non-printable bytes in an AT line ({len(raw)} bytes)")
            line = raw.decode("ascii").strip()
            if line:
                return self._classify(line)
        return NEED_DATA

    def _classify(self, line: str) -> Event:
        command = self._stale[0] if self._stale else self._pending
        final = _final(line)
        if final is None and command is not None and command.numeric_final:
            final = _NUMERIC_FINALS.get(line)
        if command is None:
            if final is None:
                return Stray(line) if _is_command_line(line) else Urc(line)
            if self._forgotten:
                self._forgotten -= 1
                return Discarded(line)
            return Stray(line)
        stale = bool(self._stale)
        event: Event
        if final is not None:
            if stale:
                self._stale.popleft()
            else:
                self._pending = None
            event = final
        elif line.upper() == command.text.upper():
            event = Echo(line)
        elif command.claims(line):
            event = Info(line)
        elif _is_command_line(line) and not self._ours(line):
            return Stray(line)  # the echo of a command line that is not ours
        else:
            return Urc(line)  # URCs are URCs even while an abandoned answer is still expected
        return Discarded(line) if stale else event

    def _ours(self, line: str) -> bool:
        """``line`` is the echo of our outstanding command or of an abandoned one."""
        upper = line.upper()
        return any(c is not None and upper == c.text.upper() for c in (self._pending, *self._stale))


def _is_command_line(line: str) -> bool:
    """An echoed command line (``AT...``): no result code or URC starts like that."""
    return line[:2].upper() == "AT"
