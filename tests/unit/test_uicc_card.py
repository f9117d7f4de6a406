"""Card-level pieces that need no modem: URC meanings and argument checks."""

from __future__ import annotations

import pytest

from mn_secd.uicc.card import Card, urc_presence


@pytest.mark.parametrize(
    ("line", "presence"),
    [
        ("+CPIN: READY", True),
        ("+CPIN:NOT READY", False),
        ('+CPIN: "NOT INSERTED"', False),
        ("+CPIN: SIM PIN", True),  # a card is there (locked): start-up will say UiccLocked
        ("+SIMCARD: NOT AVAILABLE", False),
        ("+SIMCARD: AVAILABLE", True),
        ("+QSIMSTAT: 1,0", False),
        ("+QSIMSTAT: 1, 1", True),
        ("^SIMST: 255", False),
        ("^SIMST: 1", True),
        ("+CREG: 1,1", None),
        ("RING", None),
        ("+CPIN", None),
    ],
)
def test_urc_presence(line: str, presence: bool | None) -> None:
    assert urc_presence(line) is presence


def test_bad_preferences_are_refused_before_any_io() -> None:
    with pytest.raises(ValueError):
        Card("/dev/null", transport="qmi")
    with pytest.raises(ValueError):
        Card("/dev/null", application="csim")
