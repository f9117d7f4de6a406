"""The SIM PIN, sans-IO: what the modem says about it, and whether mn-secd may enter it now.

A gateway in the field may hold a SIM whose PIN lock is on. The daemon can enter the PIN from a
file (``[modem] pin_file``), but a wrong PIN entered twice too often blocks the SIM until someone
brings its PUK, which on a remote gateway means a site visit. So the rules here are strict:

* the PIN is entered **at most once per card insertion** (:class:`PinKeeper` remembers), never
  again after the card refused it, and a PUK never;
* only when the modem or the card says that **two or more attempts** are left. When neither can
  say, mn-secd does not enter it: one blind attempt could be the last one (docs/MODEMS.md).

Where the attempts left come from, in this order (the first one the modem answers): ``AT+CPINR``
(TS 27.007 8.65), Quectel's ``AT+QPINC``, Wavecom/Sierra's ``AT+CPINC``, and last the card itself:
VERIFY PIN without a PIN (P3 = 00) answers ``63Cx`` with x attempts left and changes nothing
(ETSI TS 102 221 11.1.9).

The PIN lives in a :class:`~mn_secd.secret.SecretBytes`; it leaves it only for the one
``AT+CPIN=`` line, and never reaches a log line, an error or a status text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from mn_secd.errors import PinRejected, UiccLocked
from mn_secd.secret import SecretBytes
from mn_secd.uicc import at
from mn_secd.uicc.apdu import Apdu

#: ``+CPIN:`` states in which the card is usable: SIM PIN2/PUK2 only concern commands needing PIN2.
READY_STATES = frozenset({"READY", "SIM PIN2", "SIM PUK2"})
#: ``+CPIN:`` states some modems use for "no card" instead of ``+CME ERROR: 10``.
ABSENT_STATES = frozenset({"NOT READY", "NOT INSERTED", "SIM REMOVED", "NO SIM"})
SIM_PIN = "SIM PIN"
SIM_PUK = "SIM PUK"
#: Attempts that must be left before mn-secd enters a PIN: with one left, a wrong PIN blocks the SIM.
MIN_ATTEMPTS = 2

#: VERIFY PIN (key reference 01, the application PIN) with P3 = 00 and no PIN: asks the card for the
#: attempts left. Written with a trailing 00 as the modems' manuals show it (``0020000100``).
VERIFY_STATUS = Apdu(0x00, 0x20, 0x00, 0x01, le=256)
#: UNBLOCK PIN without data: the PUK attempts left (same clause, 11.1.13).
UNBLOCK_STATUS = Apdu(0x00, 0x2C, 0x00, 0x01, le=256)


@dataclass(frozen=True, slots=True)
class PinCounters:
    """Attempts left for PIN1 and its PUK, where something could say (None: unknown)."""

    pin: int | None = None
    puk: int | None = None
    source: str = ""  # which command said it, e.g. "AT+CPINR"


# --- asking the modem ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterQuery:
    """One AT command that reports attempts left, and how to read its answer."""

    name: str
    command: at.Command

    def parse(self, lines: list[str]) -> PinCounters:
        return _PARSERS[self.name](lines)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"(?<![\w])\d+(?![\w])", text)]


def _fields(line: str, prefix: str) -> list[str]:
    return [f.strip().strip('"').upper() for f in line[len(prefix) :].split(",")]


def parse_cpinr(lines: list[str]) -> PinCounters:
    """``+CPINR: SIM PIN,<retries>[,<default>]`` lines (the code may be quoted)."""
    found: dict[str, int] = {}
    for line in lines:
        if not line.upper().startswith("+CPINR:"):
            continue
        fields = _fields(line, "+CPINR:")
        if len(fields) >= 2 and fields[1].isdigit():
            found[fields[0]] = int(fields[1])
    return PinCounters(found.get(SIM_PIN), found.get(SIM_PUK), "AT+CPINR")


def parse_qpinc(lines: list[str]) -> PinCounters:
    """Quectel ``+QPINC: "SC",<pin attempts>,<puk attempts>``."""
    for line in lines:
        if line.upper().startswith("+QPINC:"):
            fields = _fields(line, "+QPINC:")
            if len(fields) == 3 and fields[0] == "SC" and fields[1].isdigit() and fields[2].isdigit():
                return PinCounters(int(fields[1]), int(fields[2]), "AT+QPINC")
    return PinCounters(source="AT+QPINC")


def parse_cpinc(lines: list[str]) -> PinCounters:
    """Wavecom/Sierra ``+CPINC: <pin1>,<pin2>,<puk1>,<puk2>``."""
    for line in lines:
        if line.upper().startswith("+CPINC:"):
            numbers = _numbers(line[len("+CPINC:") :])
            if len(numbers) == 4:
                return PinCounters(numbers[0], numbers[2], "AT+CPINC")
    return PinCounters(source="AT+CPINC")


_PARSERS = {"AT+CPINR": parse_cpinr, "AT+QPINC": parse_qpinc, "AT+CPINC": parse_cpinc}

#: The modems' ways of saying how many attempts are left, tried in this order.
COUNTER_QUERIES: tuple[CounterQuery, ...] = (
    CounterQuery("AT+CPINR", at.Command("AT+CPINR", ("+CPINR:", "+CPINRE:"))),  # every PIN: no wildcard needed
    CounterQuery("AT+QPINC", at.query('AT+QPINC="SC"', "+QPINC:")),
    CounterQuery("AT+CPINC", at.query("AT+CPINC", "+CPINC:")),
)


def attempts_from_sw(sw: int) -> int | None:
    """The card's answer to VERIFY/UNBLOCK without data: ``63Cx`` x left, ``6983`` none; else unknown."""
    if sw & 0xFFF0 == 0x63C0:
        return sw & 0x0F
    if sw == 0x6983:
        return 0
    return None  # 9000: verified already or no PIN needed; 6A88 and the like: no such PIN


# --- deciding ---------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What became of the one PIN entry of this insertion."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNKNOWN = "unknown"  # sent, no usable answer: the card may have counted it


REMEDY_SET_PIN = (
    "put the PIN in the file [modem] pin_file names (a systemd credential works), "
    'or turn the SIM\'s PIN lock off (AT+CLCK="SC",0,"<PIN>")'
)
REMEDY_BY_HAND = 'enter the PIN once by hand (AT+CPIN="<PIN>"), or turn the SIM\'s PIN lock off'
REMEDY_PUK = (
    'unblock the SIM with its PUK in a phone, or by hand with AT+CPIN="<PUK>","<new PIN>" '
    "(mn-secd never enters a PUK), then put the new PIN in pin_file"
)


def _left(n: int, what: str = "PIN attempt") -> str:
    return f"{n} {what}{'' if n == 1 else 's'} left"


class PinKeeper:
    """The PIN from ``pin_file`` (or none), and what was done with it for the card in the modem now.

    It outlives any one attempt to open the card (the daemon keeps one for its whole run), so that
    "at most once per insertion" holds across reopened ports and retried start-ups. An insertion
    ends when the card is seen absent; a modem that reset (its port went and came back) powered the
    card again, which counts as a new insertion only if the PIN was accepted before: a refused PIN is
    not tried again until the SIM is taken out (or the daemon restarts).
    """

    def __init__(self, pin: SecretBytes | None = None) -> None:
        if pin is not None:
            text = pin.get().decode("ascii", "replace")
            if not (text.isascii() and text.isdigit() and 4 <= len(text) <= 8):
                raise ValueError("a SIM PIN is 4 to 8 decimal digits")
        self._pin = pin
        self._outcome: Outcome | None = None
        self._left_after: int | None = None

    @property
    def has_pin(self) -> bool:
        return self._pin is not None and not self._pin.wiped

    @property
    def outcome(self) -> Outcome | None:
        """What became of this insertion's PIN entry (None: none was made)."""
        return self._outcome

    # -- the card's comings and goings --

    def card_absent(self) -> None:
        """The SIM was seen gone: the next card is a new insertion."""
        self._outcome, self._left_after = None, None

    def card_powered_again(self) -> None:
        """The modem came back (reset, re-enumerated): the card needs its PIN again if it took it."""
        if self._outcome is Outcome.ACCEPTED:
            self._outcome = None

    # -- the decision --

    def decide(self, state: str, counters: PinCounters) -> UiccLocked | None:
        """None: enter the PIN now (:meth:`take`). Else the error the SIM stays locked with."""
        if state == SIM_PUK:
            detail = "the PIN was entered wrong too often"
            if counters.puk is not None:
                detail += f" ({_left(counters.puk, 'PUK attempt')})"
            return UiccLocked(state, detail, retries=counters.puk, remedy=REMEDY_PUK)
        if state != SIM_PIN:
            return UiccLocked(
                state,
                "a lock of the modem or the network, not the SIM's PIN",
                remedy="unlock it with the modem maker's tools (docs/MODEMS.md)",
            )
        if not self.has_pin:
            return UiccLocked(state, "no [modem] pin_file is set", retries=counters.pin, remedy=REMEDY_SET_PIN)
        if self._outcome is Outcome.REJECTED:
            left = self._left_after if counters.pin is None else counters.pin
            return PinRejected(
                state,
                "the SIM refused the PIN from pin_file" + (f" ({_left(left)})" if left is not None else ""),
                retries=left,
                remedy="correct pin_file; mn-secd enters it again only after the SIM is re-inserted "
                "or the daemon is restarted",
            )
        if self._outcome is not None:
            return UiccLocked(
                state,
                "the PIN was entered once for this SIM and it asks again",
                retries=counters.pin,
                remedy=REMEDY_BY_HAND,
            )
        if counters.pin is None:
            return UiccLocked(
                state,
                "neither the modem nor the card says how many PIN attempts are left, and mn-secd "
                f"enters a PIN only with {MIN_ATTEMPTS} or more left",
                remedy=REMEDY_BY_HAND,
            )
        if counters.pin < MIN_ATTEMPTS:
            return UiccLocked(
                state,
                f"{_left(counters.pin)}: too few to risk one",
                retries=counters.pin,
                remedy=REMEDY_BY_HAND,
            )
        return None

    # -- the one entry --

    def take(self) -> at.Command:
        """The ``AT+CPIN=`` command for the one entry of this insertion (counted from now on)."""
        if self._outcome is not None or self._pin is None:
            raise RuntimeError("the PIN may be entered once per insertion, and only when decide() says so")
        self._outcome = Outcome.UNKNOWN
        return at.enter_pin(self._pin.get().decode("ascii"))

    def accepted(self) -> None:
        self._outcome = Outcome.ACCEPTED

    def rejected(self, left: int | None) -> None:
        self._outcome, self._left_after = Outcome.REJECTED, left

    def wipe(self) -> None:
        if self._pin is not None:
            self._pin.wipe()
