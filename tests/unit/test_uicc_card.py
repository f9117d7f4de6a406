"""Card-level pieces that need no modem: URC meanings, argument checks, and start-up over an injected port."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mn_secd.card_identity import CardEvent
from mn_secd.errors import AtCommandError, PortGoneError, UiccAbsent, UiccLocked
from mn_secd.uicc import at
from mn_secd.uicc.card import Card, ModemSource, urc_presence
from mn_secd.uicc.options import ModemConfig


@pytest.mark.parametrize(
    ("line", "presence"),
    [
        ("+CPIN: READY", True),
        ("+CPIN:NOT READY", False),
        ('+CPIN: "NOT INSERTED"', False),
        ("+CPIN: SIM REMOVED", False),
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
        ModemConfig("/dev/null", transport="qmi")
    with pytest.raises(ValueError):
        ModemConfig("/dev/null", application="csim")
    with pytest.raises(ValueError):
        ModemConfig("/dev/null", command_timeout=0.0)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"transport": "pcsc"}, "needs a reader"),
        ({"transport": "pcsc", "reader": " "}, "needs a reader"),
        ({"transport": "pcsc", "reader": "uTrust", "port": "/dev/null"}, "not a serial port"),
        ({"reader": "uTrust", "port": "/dev/null"}, 'only used with transport "pcsc"'),
        ({}, "needs the modem's AT port"),
        ({"transport": "csim", "reader": "uTrust"}, "needs the modem's AT port"),
    ],
)
def test_a_port_for_at_transports_a_reader_for_pcsc(options: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ModemConfig(**options)


class ScriptedPort:
    """An AT port that answers ``AT+CPIN?`` from a script and records every command it was sent."""

    path = "/dev/scripted"
    command_timeout = 1.0

    def __init__(self, cpin: list[str] | AtCommandError, *, opens: bool = True) -> None:
        self.cpin = cpin
        self.opens = opens
        self.connected = False
        self.sent: list[str] = []
        self.on_urc: Callable[[str], None] | None = None
        self.on_state: Callable[[bool], None] | None = None

    def listen(
        self, *, on_urc: Callable[[str], None] | None = None, on_state: Callable[[bool], None] | None = None
    ) -> None:
        self.on_urc, self.on_state = on_urc, on_state

    async def open(self) -> None:
        if not self.opens:
            raise PortGoneError(f"{self.path}: cannot open")
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def command(self, command: at.Command, *, timeout: float | None = None) -> list[str]:
        self.sent.append(command.text)
        if command.text != "AT+CPIN?":
            raise AssertionError(f"unexpected {command.text}")
        if isinstance(self.cpin, AtCommandError):
            raise self.cpin
        return self.cpin


async def test_the_card_listens_to_the_port_it_is_given() -> None:
    port = ScriptedPort(["+CPIN: READY"])
    config = ModemConfig(port.path)
    card = Card(ModemSource(port, config), config)
    events: list[CardEvent] = []
    card.subscribe(events.append)
    assert port.on_urc is not None and port.on_state is not None
    port.on_urc("+CPIN: SIM REMOVED")  # no card known yet: nothing to report
    port.on_state(False)
    assert events == []


@pytest.mark.parametrize(
    ("cpin", "error"),
    [
        (["+CPIN: SIM PIN"], UiccLocked),
        (["+CPIN: SIM PUK"], UiccLocked),
        (["+CPIN: NOT INSERTED"], UiccAbsent),
        (AtCommandError("AT+CPIN", cme=at.CME_SIM_NOT_INSERTED), UiccAbsent),
    ],
)
async def test_a_card_that_is_locked_or_absent_fails_start_up_and_leaves_the_port_closed(
    cpin: list[str] | AtCommandError, error: type[Exception]
) -> None:
    port = ScriptedPort(cpin)
    config = ModemConfig(port.path)
    card = Card(ModemSource(port, config), config)
    with pytest.raises(error):
        await card.start()
    assert not port.connected
    assert port.sent == ["AT+CPIN?"]  # asked once; never a PIN, never a PUK


async def test_a_port_that_does_not_open_is_port_gone() -> None:
    port = ScriptedPort(["+CPIN: READY"], opens=False)
    with pytest.raises(PortGoneError):
        config = ModemConfig(port.path)
        await Card(ModemSource(port, config), config).start()
    assert port.sent == []
