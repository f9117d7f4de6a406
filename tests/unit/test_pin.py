"""The SIM PIN rules, sans-IO: the modems' ways of telling the attempts left, and when a PIN may go in."""

from __future__ import annotations

import pytest

from mn_secd.errors import PinRejected, UiccLocked
from mn_secd.secret import SecretBytes
from mn_secd.uicc.pin import (
    MIN_ATTEMPTS,
    Outcome,
    PinCounters,
    PinKeeper,
    attempts_from_sw,
    parse_cpinc,
    parse_cpinr,
    parse_qpinc,
)


@pytest.mark.parametrize(
    ("lines", "pin", "puk"),
    [
        (["+CPINR: SIM PIN,3,3", "+CPINR: SIM PUK,10,10", "+CPINR: SIM PIN2,3,3"], 3, 10),
        (['+CPINR: "SIM PIN",2', '+CPINR: "SIM PUK",9'], 2, 9),  # quoted codes, no default count
        (["+CPINR:SIM PIN,1,3"], 1, None),  # no space after the colon
        (["+CPINRE: OPERATOR PIN,3,3"], None, None),  # manufacturer codes only
    ],
)
def test_cpinr(lines: list[str], pin: int | None, puk: int | None) -> None:
    assert parse_cpinr(lines) == PinCounters(pin, puk, "AT+CPINR")


def test_qpinc_and_cpinc() -> None:
    assert parse_qpinc(['+QPINC: "SC",3,10', '+QPINC: "P2",3,10']) == PinCounters(3, 10, "AT+QPINC")
    assert parse_qpinc(['+QPINC: "P2",3,10']).pin is None
    assert parse_cpinc(["+CPINC: 2,3,10,10"]) == PinCounters(2, 10, "AT+CPINC")
    assert parse_cpinc(["+CPINC: 2,3"]).pin is None


@pytest.mark.parametrize(("sw", "left"), [(0x63C3, 3), (0x63C0, 0), (0x6983, 0), (0x9000, None), (0x6A88, None)])
def test_attempts_from_the_cards_verify_status(sw: int, left: int | None) -> None:
    assert attempts_from_sw(sw) == left


def keeper(pin: str | None = "1234") -> PinKeeper:
    return PinKeeper(SecretBytes(pin.encode()) if pin else None)


def test_the_pin_goes_in_only_with_two_or_more_attempts_left() -> None:
    assert MIN_ATTEMPTS == 2
    assert keeper().decide("SIM PIN", PinCounters(2, 10)) is None
    assert keeper().decide("SIM PIN", PinCounters(3, 10)) is None
    one = keeper().decide("SIM PIN", PinCounters(1, 10))
    assert isinstance(one, UiccLocked) and one.retries == 1 and "too few" in str(one)
    unknown = keeper().decide("SIM PIN", PinCounters())
    assert isinstance(unknown, UiccLocked) and "how many PIN attempts are left" in str(unknown)
    none = keeper(None).decide("SIM PIN", PinCounters(3, 10))
    assert isinstance(none, UiccLocked) and "pin_file" in str(none)


def test_never_a_puk_nor_another_lock() -> None:
    puk = keeper().decide("SIM PUK", PinCounters(0, 7))
    assert isinstance(puk, UiccLocked) and puk.retries == 7 and "never enters a PUK" in str(puk)
    other = keeper().decide("PH-NET PIN", PinCounters(3, 10))
    assert isinstance(other, UiccLocked) and "not the SIM's PIN" in str(other)


def test_once_per_insertion() -> None:
    pin = keeper("2468")
    command = pin.take()
    assert command.text == 'AT+CPIN="2468"' and command.secret and "2468" not in repr(command)
    assert pin.outcome is Outcome.UNKNOWN
    with pytest.raises(RuntimeError):
        pin.take()  # a second entry for the same insertion is a bug, not a retry
    again = pin.decide("SIM PIN", PinCounters(3, 10))
    assert isinstance(again, UiccLocked) and "entered once for this SIM" in str(again)
    pin.accepted()
    pin.card_powered_again()  # the modem reset: the card took its PIN before, so it may again
    assert pin.decide("SIM PIN", PinCounters(3, 10)) is None


def test_a_rejected_pin_waits_for_the_sim_to_go() -> None:
    pin = keeper()
    pin.take()
    pin.rejected(2)
    refused = pin.decide("SIM PIN", PinCounters())
    assert isinstance(refused, PinRejected) and refused.retries == 2 and "2 PIN attempts left" in str(refused)
    pin.card_powered_again()  # a modem reset is not enough
    assert isinstance(pin.decide("SIM PIN", PinCounters(2, 10)), PinRejected)
    pin.card_absent()  # taken out: the next card is a new insertion
    assert pin.decide("SIM PIN", PinCounters(2, 10)) is None


def test_the_pin_is_checked_and_wiped() -> None:
    with pytest.raises(ValueError):
        keeper("12")
    with pytest.raises(ValueError):
        keeper("12345678901")
    secret = SecretBytes(b"1234")
    pin = PinKeeper(secret)
    assert pin.has_pin
    pin.wipe()
    assert secret.wiped and not pin.has_pin
    assert isinstance(pin.decide("SIM PIN", PinCounters(3, 10)), UiccLocked)  # no PIN to enter any more
