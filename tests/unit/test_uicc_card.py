"""Card-level pieces that need no modem: URC meanings, argument checks, and start-up over an injected port."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mn_secd.card_identity import CardEvent
from mn_secd.errors import (
    AtCommandError,
    MnSecdError,
    PinRejected,
    PortGoneError,
    UiccAbsent,
    UiccBusy,
    UiccLocked,
)
from mn_secd.secret import SecretBytes
from mn_secd.uicc import at
from mn_secd.uicc.card import Card, ModemSource, urc_presence
from mn_secd.uicc.options import ModemConfig
from mn_secd.uicc.pin import PinKeeper


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
    """An AT port that answers from a script (command line -> lines, or an error; anything else is
    ``ERROR``) and records every command line it was sent."""

    path = "/dev/scripted"
    command_timeout = 1.0

    def __init__(
        self, script: dict[str, list[str] | AtCommandError | list[list[str] | AtCommandError]], *, opens: bool = True
    ) -> None:
        self.script = script
        self.opens = opens
        self.connected = False
        self.sent: list[str] = []
        self.on_urc: Callable[[str], None] | None = None
        self.on_state: Callable[[bool], None] | None = None

    def listen(
        self,
        *,
        on_urc: Callable[[str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_stray: Callable[[], None] | None = None,
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
        answer = self.script.get(command.text, AtCommandError(at.command_name(command.text)))
        if isinstance(answer, list) and answer and isinstance(answer[0], list | AtCommandError):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]  # a sequence of answers; the last repeats
        if isinstance(answer, AtCommandError):
            raise answer
        assert isinstance(answer, list)
        return [str(line) for line in answer]


async def test_the_card_listens_to_the_port_it_is_given() -> None:
    port = ScriptedPort({"AT+CPIN?": ["+CPIN: READY"]})
    config = ModemConfig(port.path)
    card = Card(ModemSource(port, config), config)
    events: list[CardEvent] = []
    card.subscribe(events.append)
    assert port.on_urc is not None and port.on_state is not None
    port.on_urc("+CPIN: SIM REMOVED")  # no card known yet: nothing to report
    port.on_state(False)
    assert events == []


@pytest.mark.parametrize(
    ("cpin", "error", "kind"),
    [
        (["+CPIN: SIM PIN"], UiccLocked, "uicc-locked"),
        (["+CPIN: SIM PUK"], UiccLocked, "uicc-locked"),
        (["+CPIN: PH-NET PIN"], UiccLocked, "uicc-locked"),
        (["+CPIN: NOT INSERTED"], UiccAbsent, "uicc-absent"),
        (AtCommandError("AT+CPIN", cme=at.CME_SIM_NOT_INSERTED), UiccAbsent, "uicc-absent"),
        (AtCommandError("AT+CPIN", cme=at.CME_SIM_BUSY), UiccBusy, "uicc-busy"),
    ],
)
async def test_a_card_that_is_locked_absent_or_busy_fails_start_up_and_leaves_the_port_closed(
    cpin: list[str] | AtCommandError, error: type[Exception], kind: str
) -> None:
    port = ScriptedPort({"AT+CPIN?": cpin, "AT+CPINR": ["+CPINR: SIM PIN,3,3", "+CPINR: SIM PUK,10,10"]})
    config = ModemConfig(port.path)
    card = Card(ModemSource(port, config), config)  # no PIN to enter
    with pytest.raises(error) as raised:
        await card.start()
    assert raised.value.kind == kind
    assert not port.connected
    assert port.sent[0] == "AT+CPIN?"
    assert not any(line.startswith("AT+CPIN=") for line in port.sent)  # never a PIN, never a PUK


PIN = "2468"


def keeper(pin: str | None = PIN) -> PinKeeper:
    return PinKeeper(SecretBytes(pin.encode()) if pin is not None else None)


async def start(port: ScriptedPort, pin: PinKeeper) -> MnSecdError:
    with pytest.raises(MnSecdError) as raised:
        config = ModemConfig(port.path)
        await Card(ModemSource(port, config, pin), config).start()
    return raised.value


async def test_the_pin_is_entered_once_then_start_up_goes_on() -> None:
    port = ScriptedPort(
        {
            "AT+CPIN?": [["+CPIN: SIM PIN"], AtCommandError("AT+CPIN", cme=at.CME_SIM_BUSY), ["+CPIN: READY"]],
            "AT+CPINR": ["+CPINR: SIM PIN,3,3"],
            f'AT+CPIN="{PIN}"': [],
        }
    )
    pin = keeper()
    error = await start(port, pin)  # the scripted modem has no way to the card: stops after the PIN
    assert error.kind == "transport-unavailable"
    assert port.sent[:5] == ["AT+CPIN?", "AT+CPINR", f'AT+CPIN="{PIN}"', "AT+CPIN?", "AT+CPIN?"]
    assert sum(line.startswith("AT+CPIN=") for line in port.sent) == 1
    assert PIN not in str(error)


async def test_a_rejected_pin_is_never_entered_again_until_the_sim_goes() -> None:
    script: dict[str, list[str] | AtCommandError | list[list[str] | AtCommandError]] = {
        "AT+CPIN?": ["+CPIN: SIM PIN"],
        "AT+CPINR": [["+CPINR: SIM PIN,3,3"], ["+CPINR: SIM PIN,2,3"]],
        f'AT+CPIN="{PIN}"': AtCommandError("AT+CPIN", cme=at.CME_INCORRECT_PASSWORD),
    }
    port = ScriptedPort(script)
    pin = keeper()
    error = await start(port, pin)
    assert isinstance(error, PinRejected) and error.retries == 2
    assert "2 attempts left" in str(error) and PIN not in str(error)
    again = await start(port, pin)  # the daemon's next attempt: same SIM, still locked
    assert isinstance(again, PinRejected) and again.retries == 2
    assert sum(line.startswith("AT+CPIN=") for line in port.sent) == 1
    pin.card_absent()  # taken out and put back: one more entry is allowed (2 attempts are left)
    await start(port, pin)
    assert sum(line.startswith("AT+CPIN=") for line in port.sent) == 2


@pytest.mark.parametrize(
    ("counters", "sent_pin", "says"),
    [
        ({"AT+CPINR": ["+CPINR: SIM PIN,1,3"]}, False, "1 PIN attempt left"),
        ({'AT+QPINC="SC"': ['+QPINC: "SC",1,10']}, False, "1 PIN attempt left"),
        ({"AT+CPINC": ["+CPINC: 1,3,10,10"]}, False, "1 PIN attempt left"),
        ({'AT+CSIM=10,"0020000100"': ['+CSIM: 4,"63C1"']}, False, "1 PIN attempt left"),
        ({}, False, "neither the modem nor the card says how many PIN attempts are left"),
        ({'AT+QPINC="SC"': ['+QPINC: "SC",2,10']}, True, ""),
        ({'AT+CSIM=10,"0020000100"': ['+CSIM: 4,"63C3"']}, True, ""),
    ],
)
async def test_the_pin_is_entered_only_with_two_or_more_attempts_left(
    counters: dict[str, list[str]], sent_pin: bool, says: str
) -> None:
    port = ScriptedPort({"AT+CPIN?": ["+CPIN: SIM PIN"], f'AT+CPIN="{PIN}"': [], **counters})
    error = await start(port, keeper())
    assert any(line.startswith("AT+CPIN=") for line in port.sent) is sent_pin
    if says:
        assert isinstance(error, UiccLocked) and says in str(error)


async def test_a_puk_is_never_entered_and_the_remedy_is_named() -> None:
    port = ScriptedPort({"AT+CPIN?": ["+CPIN: SIM PUK"], "AT+CPINR": ["+CPINR: SIM PIN,0,3", "+CPINR: SIM PUK,9,10"]})
    error = await start(port, keeper())
    assert isinstance(error, UiccLocked) and error.retries == 9
    assert "9 PUK attempts left" in str(error) and "never enters a PUK" in str(error)
    assert not any(line.startswith("AT+CPIN=") for line in port.sent)


async def test_a_port_that_does_not_open_is_port_gone() -> None:
    port = ScriptedPort({"AT+CPIN?": ["+CPIN: READY"]}, opens=False)
    with pytest.raises(PortGoneError):
        config = ModemConfig(port.path)
        await Card(ModemSource(port, config), config).start()
    assert port.sent == []
