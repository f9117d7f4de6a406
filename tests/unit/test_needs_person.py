"""Which answers on the way to the card wait for a person (start-up reports READY=1 at once) and
which may mend by themselves (start-up waits up to ``modem_wait``)."""

from __future__ import annotations

import pytest

from mn_secd.errors import (
    AnswerLost,
    ApplicationNotFound,
    AtCommandError,
    GbaModeUnavailable,
    ModemTimeout,
    PinRejected,
    PortGoneError,
    ReaderGone,
    ReaderNotFound,
    TransportUnavailable,
    UiccAbsent,
    UiccBusy,
    UiccError,
    UiccLocked,
    needs_person,
)
from mn_secd.secret import SecretBytes
from mn_secd.uicc.pin import SIM_PIN, SIM_PUK, PinCounters, PinKeeper


def refusals() -> list[UiccLocked]:
    """Every refusal the PIN rules give, from the real PinKeeper."""
    found: list[UiccLocked | None] = [
        PinKeeper().decide(SIM_PIN, PinCounters(3, 10)),  # no pin_file
        PinKeeper(SecretBytes(b"1234")).decide(SIM_PIN, PinCounters(1, 10)),  # too few attempts to risk one
        PinKeeper(SecretBytes(b"1234")).decide(SIM_PIN, PinCounters()),  # nothing says how many are left
        PinKeeper(SecretBytes(b"1234")).decide(SIM_PUK, PinCounters(0, 9)),  # never a PUK
        PinKeeper(SecretBytes(b"1234")).decide("PH-NET PIN", PinCounters()),  # a network lock of the modem
    ]
    rejected = PinKeeper(SecretBytes(b"1234"))
    rejected.take()
    rejected.rejected(2)
    found.append(rejected.decide(SIM_PIN, PinCounters(2, 10)))  # refused once: never entered again
    asked_again = PinKeeper(SecretBytes(b"1234"))
    asked_again.take()
    asked_again.accepted()
    found.append(asked_again.decide(SIM_PIN, PinCounters(2, 10)))  # took it, and asks again
    assert all(r is not None for r in found)
    return [r for r in found if r is not None]


@pytest.mark.parametrize("refusal", refusals(), ids=lambda r: type(r).__name__ + ":" + r.state)
def test_every_refusal_of_the_pin_rules_waits_for_a_person(refusal: UiccLocked) -> None:
    assert needs_person(refusal)


@pytest.mark.parametrize(
    "error",
    [
        PinRejected(SIM_PIN, "the SIM refused the PIN from pin_file", retries=2),
        UiccLocked(SIM_PIN, "still locked after the PIN was accepted"),
        ApplicationNotFound("no USIM or ISIM in EF_DIR (found: none)"),
        ApplicationNotFound("an ISIM-only card: its IMSI needs a USIM, and nothing else can tell it"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_card_that_cannot_change_by_itself_waits_for_a_person(error: Exception) -> None:
    assert needs_person(error)


@pytest.mark.parametrize(
    "error",
    [
        UiccAbsent("no SIM in the modem (+CPIN: NOT INSERTED)"),  # not inserted yet: the modem may be booting
        UiccBusy("SIM busy (+CME ERROR: 14)"),
        UiccError("the modem reports a SIM failure (+CME ERROR: 13)"),  # often the SIM still initialising
        PortGoneError("/dev/ttyUSB2: port gone"),
        ModemTimeout("AT+CPIN? got no answer"),
        AnswerLost("+CME ERROR: 0"),
        AtCommandError("AT+CPIN?", 100),
        # Another program on the port, or a modem whose SIM stack is not up yet, looks just like this.
        TransportUnavailable("this modem cannot run GBA over AT: AT+CCHO: no answer"),
        ReaderNotFound("no PC/SC reader's name contains 'Omnikey'"),  # not plugged in yet
        ReaderGone("the reader vanished"),
        GbaModeUnavailable("GBA_U only, and this card has no GBA"),  # never met opening the card
        OSError(5, "Input/output error"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_may_mend_by_itself_is_waited_for(error: BaseException) -> None:
    assert not needs_person(error)
