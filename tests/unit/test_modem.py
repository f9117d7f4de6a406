"""The AT modem emulator, over a real pseudo-terminal, talked to with plain os.read/os.write.

These tests stand alone: they use neither the daemon's AT layer nor the software UICC, but a small
fake card, so what they pin down is the emulator's wire behaviour (what the daemon will face).
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mn_secd.sim.modem import ModemEmulator, Quirks, cla_for_channel

IMSI = "001010000000001"
USIM_AID = bytes.fromhex("A0000000871002FFFFFFFF8907090000")
FCP = bytes.fromhex("6210820278218410A0000000871002FFFFFFFF8907090000")
AUTH_DATA = bytes([0xDB, 0x08]) + bytes(range(8)) + bytes([0x10]) + bytes(16) + bytes([0x10]) + bytes(16)
AUTH_APDU = "0088008122" + "10" + "11" * 16 + "10" + "22" * 16 + "00"
FINAL = re.compile(r"^(OK|ERROR|\+CME ERROR:.*)$")


@dataclass
class FakeProfile:
    imsi: str = IMSI


@dataclass
class FakeCard:
    """A tiny T=0 card: logical channels 1-3, SELECT of the USIM by (partial) AID, AUTHENTICATE."""

    profile: FakeProfile = field(default_factory=FakeProfile)
    apdus: list[bytes] = field(default_factory=list)
    open_channels: set[int] = field(default_factory=set)
    pending: dict[int, bytes] = field(default_factory=dict)
    crash: bool = False

    def process_apdu(self, apdu: bytes) -> bytes:
        if self.crash:
            raise RuntimeError("card bug")
        self.apdus.append(apdu)
        cla, ins, p1, p2 = apdu[:4]
        channel = cla & 0x03
        if channel and channel not in self.open_channels:
            return b"\x68\x81"
        if ins == 0x70:
            if p1 == 0x00:
                free = [c for c in (1, 2, 3) if c not in self.open_channels]
                if not free:
                    return b"\x6a\x81"
                self.open_channels.add(free[0])
                return bytes([free[0]]) + b"\x90\x00"
            if p2 not in self.open_channels:
                return b"\x68\x81"
            self.open_channels.discard(p2)
            return b"\x90\x00"
        if ins == 0xA4:
            aid = apdu[5 : 5 + apdu[4]]
            if p1 != 0x04 or not USIM_AID.startswith(aid):
                return b"\x6a\x82"
            return self._pending(channel, FCP)
        if ins == 0x88:
            return self._pending(channel, AUTH_DATA)
        if ins == 0xC0:
            data = self.pending.pop(channel, None)
            if data is None:
                return b"\x69\x85"
            if apdu[4] != len(data):
                self.pending[channel] = data
                return bytes([0x6C, len(data)])
            return data + b"\x90\x00"
        return b"\x90\x00"

    def _pending(self, channel: int, data: bytes) -> bytes:
        self.pending[channel] = data
        return bytes([0x61, len(data)])

    def seen(self, ins: int) -> list[bytes]:
        return [a for a in self.apdus if a[1] == ins]


class Port:
    """The host side: the pty slave opened like a serial port, read with select() and timeouts."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buf = b""

    def close(self) -> None:
        os.close(self.fd)

    def send(self, line: str | bytes) -> None:
        os.write(self.fd, (line.encode() if isinstance(line, str) else line) + b"\r")

    def read_some(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        return os.read(self.fd, 4096)

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not done(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer; got {self.buf!r}")
            self.buf += self.read_some(left)
        out, self.buf = self.buf, b""
        return out

    def answer_raw(self, timeout: float = 3.0) -> bytes:
        def complete(buf: bytes) -> bool:
            lines = _lines(buf)
            return buf.endswith(b"\r\n") and bool(lines) and bool(FINAL.match(lines[-1]))

        return self.read_until(complete, timeout)

    def command(self, line: str, timeout: float = 3.0) -> list[str]:
        self.send(line)
        return _lines(self.answer_raw(timeout))

    def quiet(self, seconds: float = 0.15) -> bytes:
        """Whatever arrives within ``seconds`` (for asserting that nothing does)."""
        deadline = time.monotonic() + seconds
        got = b""
        while (left := deadline - time.monotonic()) > 0:
            got += self.read_some(left)
        return got


def _lines(raw: bytes) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", raw.decode("latin-1")) if line]


@pytest.fixture
def card() -> FakeCard:
    return FakeCard()


@pytest.fixture
def make_modem(card: FakeCard) -> Iterator[Callable[..., tuple[ModemEmulator, Port]]]:
    started: list[tuple[ModemEmulator, Port]] = []

    def make(
        quirks: Quirks | None = None, *, sim: FakeCard | None = card, cmee: int | None = 1
    ) -> tuple[ModemEmulator, Port]:
        modem = ModemEmulator(sim, quirks)
        port = Port(modem.start())
        started.append((modem, port))
        if cmee is not None:
            assert port.command(f"AT+CMEE={cmee}")[-1] == "OK"
        return modem, port

    yield make
    for modem, port in started:
        modem.stop()
        port.close()


# --- plain commands ------------------------------------------------------------------------------


def test_basic_commands(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem()
    port.send("AT")
    assert port.answer_raw() == b"\r\nOK\r\n"
    assert port.command("ati")[-1] == "OK"
    assert port.command("AT+CIMI") == [IMSI, "OK"]
    assert port.command("AT+CPIN?") == ["+CPIN: READY", "OK"]
    assert port.command("AT+CMEE?") == ["+CMEE: 1", "OK"]
    assert port.command("AT+CMEE=?") == ["+CMEE: (0-2)", "OK"]
    assert port.command("AT+NOSUCH") == ["ERROR"]
    assert port.command("AT+CIMI?") == ["ERROR"]
    assert port.command("ATX9") == ["ERROR"]


def test_lines_without_at_are_ignored_and_lf_crlf_terminators_work(
    make_modem: Callable[..., tuple[ModemEmulator, Port]],
) -> None:
    modem, port = make_modem()
    port.send("hello")
    assert port.quiet() == b""
    os.write(port.fd, b"AT\r\nAT+CIMI\n")
    assert _lines(port.read_until(lambda b: b.count(b"OK") == 2)) == ["OK", IMSI, "OK"]
    os.write(port.fd, b"X" * 5000 + b"\r")  # an overlong line is dropped, the next command still works
    assert port.command("AT") == ["OK"]
    assert "hello" in modem.log


@pytest.mark.parametrize("test_form", ["+CSIM", "+CCHO", "+CCHC", "+CGLA", "+CIMI", "+CPIN"])
def test_test_forms_answer_ok(make_modem: Callable[..., tuple[ModemEmulator, Port]], test_form: str) -> None:
    _, port = make_modem()
    assert port.command(f"AT{test_form}=?") == ["OK"]


def test_echo_commands(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem()
    assert port.command("ATE1") == ["OK"]
    port.send("AT+CIMI")
    assert port.answer_raw() == f"AT+CIMI\r\r\n{IMSI}\r\n\r\nOK\r\n".encode()
    port.send("ATE0")
    assert port.answer_raw() == b"ATE0\r\r\nOK\r\n"
    port.send("AT")
    assert port.answer_raw() == b"\r\nOK\r\n"


def test_cmee_modes(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(cmee=None)
    bad = 'AT+CSIM=4,"00A404"'  # length does not match the hex
    assert port.command(bad) == ["ERROR"]
    assert port.command("AT+CMEE=1") == ["OK"]
    assert port.command(bad) == ["+CME ERROR: 50"]
    assert port.command("AT+CMEE=2") == ["OK"]
    assert port.command(bad) == ["+CME ERROR: Incorrect parameters"]
    assert port.command("AT+CMEE=3") == ["+CME ERROR: Incorrect parameters"]
    assert port.command('AT+CMEE="1"') == ["+CME ERROR: Incorrect parameters"]
    assert port.command("AT+CMEE") == ["OK"]
    assert port.command("AT+CMEE?") == ["+CMEE: 0", "OK"]


# --- AT+CSIM ---------------------------------------------------------------------------------------


def test_csim_select_and_get_response(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem()
    select_apdu = "00A4040410" + USIM_AID.hex().upper()
    assert port.command(f'AT+CSIM={len(select_apdu)},"{select_apdu}"') == ['+CSIM: 4,"6118"', "OK"]
    assert port.command('AT+CSIM=10,"00C0000018"') == [f'+CSIM: 52,"{FCP.hex().upper()}9000"', "OK"]
    assert card.apdus == [bytes.fromhex(select_apdu), bytes.fromhex("00C0000018")]


@pytest.mark.parametrize(
    "args",
    [
        '4,"00A404"',  # length counts hex characters: 6 here
        '5,"00A4040"',  # odd number of hex digits
        '8,"00A4G400"',  # not hex
        "8,00A40400",  # hex not quoted
        '"8","00A40400"',  # length quoted
        '6,"00A404"',  # shorter than a header
        '8,"00A40400',  # unterminated quote
        '8,"00A40400",1',  # too many parameters
        '"00A40400"',  # too few
        'x,"00A40400"',  # length not a number
        f'524,"{"00" * 262}"',  # longer than AT+CSIM takes
    ],
)
def test_csim_bad_parameters(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard, args: str) -> None:
    _, port = make_modem()
    assert port.command(f"AT+CSIM={args}") == ["+CME ERROR: 50"]
    assert card.apdus == []


def test_card_failure_is_cme_13(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem()
    card.crash = True
    assert port.command('AT+CSIM=8,"80F20000"') == ["+CME ERROR: 13"]
    card.crash = False
    assert port.command('AT+CSIM=8,"80F20000"') == ['+CSIM: 4,"9000"', "OK"]


# --- logical channels ------------------------------------------------------------------------------


def _ccho(aid: bytes = USIM_AID) -> str:
    return f'AT+CCHO="{aid.hex().upper()}"'


def test_ccho_cgla_cchc(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem()
    assert port.command(_ccho()) == ["+CCHO: 1", "OK"]
    # The modem opened a channel and selected the AID on it (fetching the FCP itself).
    assert card.apdus[0] == bytes.fromhex("0070000001")
    assert card.apdus[1] == bytes.fromhex("01A4040410") + USIM_AID
    assert card.apdus[2] == bytes.fromhex("01C0000018")
    # AT+CGLA: the host sends CLA with channel bits 0, the modem sets them.
    assert port.command(f'AT+CGLA=1,{len(AUTH_APDU)},"{AUTH_APDU}"') == ['+CGLA: 4,"612C"', "OK"]
    assert card.apdus[-1] == bytes.fromhex("01" + AUTH_APDU[2:])
    assert port.command('AT+CGLA=1,10,"00C000002C"') == [f'+CGLA: 92,"{AUTH_DATA.hex().upper()}9000"', "OK"]
    assert card.apdus[-1] == bytes.fromhex("01C000002C")
    assert port.command('AT+CGLA=1,8,"80F20000"')[0] == '+CGLA: 4,"9000"'
    assert card.apdus[-1] == bytes.fromhex("81F20000")
    assert port.command("AT+CCHC=1") == ["OK"]
    assert card.apdus[-1] == bytes.fromhex("00708001")
    assert card.open_channels == set()
    assert port.command("AT+CCHC=1") == ["+CME ERROR: 21"]
    assert port.command('AT+CGLA=1,8,"80F20000"') == ["+CME ERROR: 21"]


def test_ccho_errors(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem()
    assert port.command(_ccho(bytes.fromhex("A000000063"))) == ["+CME ERROR: 22"]
    assert card.open_channels == set()  # the channel opened for the unknown AID was closed again
    assert [port.command(_ccho())[0] for _ in range(3)] == ["+CCHO: 1", "+CCHO: 2", "+CCHO: 3"]
    assert port.command(_ccho()) == ["+CME ERROR: 20"]
    assert port.command('AT+CCHO="A00"') == ["+CME ERROR: 50"]
    assert port.command("AT+CCHO=A0000000871002") == ["+CME ERROR: 50"]
    assert port.command('AT+CCHO=""') == ["+CME ERROR: 50"]
    assert port.command('AT+CGLA=9,8,"80F20000"') == ["+CME ERROR: 21"]
    assert port.command('AT+CGLA=x,8,"80F20000"') == ["+CME ERROR: 50"]
    assert port.command('AT+CGLA=1,4,"80F20000"') == ["+CME ERROR: 50"]
    assert port.command("AT+CCHC=") == ["+CME ERROR: 50"]


def test_cla_for_channel() -> None:
    assert cla_for_channel(0x00, 2) == 0x02
    assert cla_for_channel(0x80, 3) == 0x83
    assert cla_for_channel(0x00, 4) == 0x40
    assert cla_for_channel(0x80, 19) == 0xCF
    assert cla_for_channel(0x03, 1) == 0x01


def test_no_sim(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(sim=None)
    for command in ("AT+CIMI", "AT+CPIN?", 'AT+CSIM=8,"80F20000"', _ccho(), 'AT+CGLA=1,8,"80F20000"', "AT+CCHC=1"):
        assert port.command(command) == ["+CME ERROR: 10"], command
    assert port.command("AT") == ["OK"]


# --- quirks ----------------------------------------------------------------------------------------


def test_quirk_echo_at_power_on_and_at_run_time(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, port = make_modem(Quirks(echo=True), cmee=None)
    port.send("AT")
    assert port.answer_raw() == b"AT\r\r\nOK\r\n"  # what pySim's echo probe looks for
    port.send("ATE0")
    assert port.answer_raw() == b"ATE0\r\r\nOK\r\n"
    port.send("AT")
    assert port.answer_raw() == b"\r\nOK\r\n"
    modem.set_quirks(echo=True)
    port.send('AT+CSIM=8,"80F20000"')
    assert port.answer_raw() == b'AT+CSIM=8,"80F20000"\r\r\n+CSIM: 4,"9000"\r\n\r\nOK\r\n'


def test_quirk_urcs_between_and_inside(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, port = make_modem(Quirks(urcs_between=True))
    assert port.command("AT+CIMI") == ["RING", IMSI, "OK"]  # 1st URC went to AT+CMEE=1's answer
    assert port.command("AT+CPIN?") == ["+CEREG: 1", "+CPIN: READY", "OK"]
    modem.set_quirks(urcs_between=False, urcs_inside=True, urc_lines=("+CREG: 1,5",))
    port.send('AT+CSIM=8,"80F20000"')
    assert port.answer_raw() == b'\r\n+CSIM: 4,"9000"\r\n\r\n+CREG: 1,5\r\n\r\nOK\r\n'
    assert port.command("AT") == ["+CREG: 1,5", "OK"]
    assert port.command("AT+NOSUCH") == ["+CREG: 1,5", "ERROR"]


def test_quirk_split_writes(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(Quirks(split_writes=True, split_size=2, split_delay=0.01))
    port.send("AT+CIMI")
    expected = f"\r\n{IMSI}\r\n\r\nOK\r\n".encode()
    started = time.monotonic()
    reads: list[bytes] = []
    while b"".join(reads) != expected:
        chunk = port.read_some(2.0)
        assert chunk, b"".join(reads)
        reads.append(chunk)
    pieces = (len(expected) + 1) // 2
    assert time.monotonic() - started >= (pieces - 1) * 0.01 * 0.9
    assert len(reads) > 3


def test_quirk_reject_lowercase_hex(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem(Quirks(reject_lowercase_hex=True), cmee=2)
    assert port.command('AT+CSIM=8,"80f20000"') == ["ERROR"]
    assert port.command(f'AT+CCHO="{USIM_AID.hex()}"') == ["ERROR"]
    assert card.apdus == []
    assert port.command('AT+CSIM=8,"80F20000"') == ['+CSIM: 4,"9000"', "OK"]


def test_lowercase_hex_accepted_without_quirk(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem()
    assert port.command('AT+CSIM=8,"80f20000"') == ['+CSIM: 4,"9000"', "OK"]


def test_quirk_no_space_after_colon(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(Quirks(no_space_after_colon=True))
    assert port.command("AT+CPIN?") == ["+CPIN:READY", "OK"]
    assert port.command('AT+CSIM=8,"80F20000"') == ['+CSIM:4,"9000"', "OK"]
    assert port.command(_ccho()) == ["+CCHO:1", "OK"]
    assert port.command('AT+CGLA=1,8,"80F20000"') == ['+CGLA:4,"9000"', "OK"]


def test_quirk_sierra_session_handle(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem(Quirks(ccho_style="session_handle"))
    assert port.command(_ccho()) == ["+CCHO: 000000000385A7CF", "OK"]
    assert port.command('AT+CGLA=000000000385A7CF,8,"80F20000"') == ['+CGLA: 4,"9000"', "OK"]
    assert card.apdus[-1] == bytes.fromhex("81F20000")
    assert port.command('AT+CGLA=000000000385a7cf,8,"80F20000"')[-1] == "OK"
    assert port.command('AT+CGLA=1,8,"80F20000"') == ["+CME ERROR: 21"]  # the channel number is not the handle
    assert port.command("AT+CCHC=000000000385A7CF") == ["OK"]
    assert card.open_channels == set()


def test_quirk_fibocom_bare_number(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(Quirks(ccho_style="bare"))
    port.send(_ccho())
    assert port.answer_raw() == b"\r\n1\r\n\r\nOK\r\n"
    assert port.command('AT+CGLA=1,8,"80F20000"') == ['+CGLA: 4,"9000"', "OK"]


def test_quirk_no_logical_channels(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem(Quirks(no_logical_channels=True))
    assert port.command(_ccho()) == ["+CME ERROR: 4"]
    assert port.command('AT+CSIM=10,"0070000001"') == ["+CME ERROR: 4"]
    assert port.command('AT+CGLA=1,8,"80F20000"') == ["+CME ERROR: 4"]
    assert port.command("AT+CCHC=1") == ["+CME ERROR: 4"]
    assert card.seen(0x70) == []
    assert port.command('AT+CSIM=8,"80F20000"') == ['+CSIM: 4,"9000"', "OK"]


def test_manage_channel_through_csim(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem()
    assert port.command('AT+CSIM=10,"0070000001"') == ['+CSIM: 6,"019000"', "OK"]
    assert port.command('AT+CSIM=8,"81F20000"') == ['+CSIM: 4,"9000"', "OK"]
    assert port.command('AT+CSIM=8,"00708001"') == ['+CSIM: 4,"9000"', "OK"]
    assert card.open_channels == set()


def test_quirk_no_test_commands(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    _, port = make_modem(Quirks(no_test_commands=True))
    for name in ("+CSIM", "+CGLA", "+CCHO", "+CMEE"):
        assert port.command(f"AT{name}=?") == ["ERROR"]
    assert port.command(_ccho()) == ["+CCHO: 1", "OK"]


def test_quirk_get_response_loop(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    _, port = make_modem(Quirks(get_response_loop=True))
    assert port.command(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"') == ['+CSIM: 4,"612C"', "OK"]
    for _ in range(5):
        assert port.command('AT+CSIM=10,"00C0000000"') == ['+CSIM: 4,"6100"', "OK"]
    assert card.seen(0xC0) == []
    assert port.command(_ccho()) == ["+CCHO: 1", "OK"]  # the modem's own fetches are unaffected
    assert port.command('AT+CGLA=1,10,"00C0000000"') == ['+CGLA: 4,"6100"', "OK"]


def test_quirk_refuse_authenticate(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    modem, port = make_modem(Quirks(refuse_authenticate=True))
    assert port.command(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"') == ["+CME ERROR: 3"]
    assert port.command(_ccho())[0] == "+CCHO: 1"
    assert port.command(f'AT+CGLA=1,{len(AUTH_APDU)},"{AUTH_APDU}"') == ["+CME ERROR: 3"]
    assert card.seen(0x88) == []
    assert modem.apdu_count(0x88) == 2  # both were on the wire
    assert port.command('AT+CSIM=8,"80F20000"') == ['+CSIM: 4,"9000"', "OK"]


def test_quirk_internal_get_response(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    modem, port = make_modem(Quirks(internal_get_response=True))
    expected = f'+CSIM: {len(AUTH_DATA) * 2 + 4},"{AUTH_DATA.hex().upper()}9000"'
    assert port.command(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"') == [expected, "OK"]
    assert card.apdus[-1] == bytes.fromhex("00C000002C")
    assert port.command(_ccho())[0] == "+CCHO: 1"
    answer = port.command(f'AT+CGLA=1,{len(AUTH_APDU)},"{AUTH_APDU}"')
    assert answer == [expected.replace("CSIM", "CGLA"), "OK"]
    assert card.apdus[-1] == bytes.fromhex("01C000002C")  # fetched on the command's own channel
    assert modem.apdu_count(0xC0) == 0  # the host never sent one


def test_quirk_latency(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, port = make_modem(Quirks(latency=0.3))
    started = time.monotonic()
    assert port.command("AT") == ["OK"]
    assert time.monotonic() - started >= 0.29
    modem.set_quirks(latency=0.0)
    started = time.monotonic()
    assert port.command("AT") == ["OK"]
    assert time.monotonic() - started < 0.25


def test_quirk_auth_latency_lets_a_host_time_out_exactly_there(
    make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard
) -> None:
    modem, port = make_modem(Quirks(auth_latency=0.6))
    started = time.monotonic()
    assert port.command('AT+CSIM=8,"80F20000"')[-1] == "OK"
    assert time.monotonic() - started < 0.4
    port.send(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"')
    with pytest.raises(TimeoutError):
        port.answer_raw(timeout=0.2)
    # The card has already run it: the one AUTHENTICATE on the wire is in the log and counts.
    assert len(card.seen(0x88)) == 1
    assert modem.apdu_count(0x88) == 1
    assert modem.count("AT+CSIM=80") == 1
    assert port.answer_raw(timeout=2.0).endswith(b'+CSIM: 4,"612C"\r\n\r\nOK\r\n')


def test_quirks_validation_and_set_quirks(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    with pytest.raises(ValueError):
        Quirks(ccho_style="sierra")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Quirks(latency=-1)
    with pytest.raises(ValueError):
        Quirks(split_size=0)
    with pytest.raises(ValueError):
        Quirks(urcs_inside=True, urc_lines=())
    modem, _ = make_modem()
    with pytest.raises(TypeError):
        modem.set_quirks(no_such_quirk=True)
    assert modem.set_quirks(Quirks(echo=True)) == Quirks(echo=True)
    assert modem.set_quirks(latency=0.5) == Quirks(echo=True, latency=0.5)
    assert modem.quirks == Quirks(echo=True, latency=0.5)


def test_set_quirks_from_another_thread_while_serving(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, port = make_modem()
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            modem.set_quirks(no_space_after_colon=not modem.quirks.no_space_after_colon)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for _ in range(50):
            assert port.command("AT+CPIN?")[0] in ("+CPIN: READY", "+CPIN:READY")
    finally:
        stop.set()
        flipper.join()


# --- SIM removal, port loss ------------------------------------------------------------------------


def test_remove_and_insert_sim(make_modem: Callable[..., tuple[ModemEmulator, Port]], card: FakeCard) -> None:
    modem, port = make_modem()
    assert port.command(_ccho()) == ["+CCHO: 1", "OK"]
    modem.remove_sim()
    urcs = port.read_until(lambda b: b"NOT AVAILABLE\r\n" in b)
    assert _lines(urcs) == ["+CPIN: NOT READY", "+SIMCARD: NOT AVAILABLE"]
    assert modem.card is None
    assert port.command('AT+CSIM=8,"80F20000"') == ["+CME ERROR: 10"]
    assert port.command("AT+CPIN?") == ["+CME ERROR: 10"]
    fresh = FakeCard()
    modem.insert_sim(fresh)
    assert _lines(port.read_until(lambda b: b.endswith(b"READY\r\n"))) == ["+CPIN: READY"]
    assert port.command('AT+CGLA=1,8,"80F20000"') == ["+CME ERROR: 21"]  # channels did not survive
    assert port.command(_ccho()) == ["+CCHO: 1", "OK"]
    assert fresh.seen(0x70) == [bytes.fromhex("0070000001")]


def _wait_for_hangup(port: Port) -> None:
    """A reader of a vanished port sees hang-up: EOF or EIO on read, EIO on write."""
    deadline = time.monotonic() + 2.0
    poller = select.poll()
    poller.register(port.fd, select.POLLIN)
    while time.monotonic() < deadline:
        events = poller.poll(100)
        if events and events[0][1] & (select.POLLHUP | select.POLLERR):
            break
        if events:
            try:
                if os.read(port.fd, 4096) == b"":
                    break
            except OSError as exc:
                assert exc.errno == errno.EIO
                break
    else:
        pytest.fail("the port did not hang up")
    with pytest.raises(OSError) as write_error:
        os.write(port.fd, b"AT\r")
    assert write_error.value.errno == errno.EIO


def test_vanish_and_restore_at_the_same_link(tmp_path: Path, card: FakeCard) -> None:
    link = str(tmp_path / "ttyMODEM")
    modem = ModemEmulator(card, link=link)
    assert modem.start() == link
    first_pts = modem.slave_path
    assert first_pts is not None and os.readlink(link) == first_pts
    port = Port(link)
    try:
        assert port.command("AT+CMEE=1") == ["OK"]
        assert port.command(_ccho()) == ["+CCHO: 1", "OK"]
        modem.vanish()
        assert modem.path is None
        assert not os.path.lexists(link)
        _wait_for_hangup(port)
        assert card.open_channels == set()  # the rebooting modem closed its channel on the card
        with pytest.raises(RuntimeError):
            modem.vanish()
        assert modem.restore() == link
        assert modem.path == link
    finally:
        port.close()
    port = Port(link)
    try:
        assert port.command('AT+CSIM=4,"00"') == ["ERROR"]  # power-on default again: AT+CMEE=0
        assert port.command("AT+CIMI") == [IMSI, "OK"]
        assert port.command('AT+CGLA=1,8,"80F20000"') == ["ERROR"]
    finally:
        port.close()
        modem.stop()
    assert not os.path.lexists(link)


def test_vanish_and_restore_without_link(card: FakeCard) -> None:
    modem = ModemEmulator(card)
    port = Port(modem.start())
    try:
        modem.remove_sim()  # queued URCs are dropped with the port
        modem.vanish()
        _wait_for_hangup(port)
        modem.post_urc("RING")  # nobody to hear it
        new_path = modem.restore()
        assert modem.path == new_path and new_path.startswith("/dev/")
    finally:
        port.close()
    port = Port(new_path)
    try:
        assert port.command("AT") == ["OK"]
        assert port.quiet() == b""
    finally:
        port.close()
        modem.stop()


def test_link_does_not_replace_a_regular_file(tmp_path: Path, card: FakeCard) -> None:
    occupied = tmp_path / "ttyUSB2"
    occupied.write_text("not mine")
    with pytest.raises(FileExistsError):
        ModemEmulator(card, link=str(occupied)).start()
    assert occupied.read_text() == "not mine"


def test_double_start_refused(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, _ = make_modem()
    with pytest.raises(RuntimeError):
        modem.start()


# --- log, counts, stopping -------------------------------------------------------------------------


def test_log_and_counts(make_modem: Callable[..., tuple[ModemEmulator, Port]]) -> None:
    modem, port = make_modem()
    port.command("AT+CIMI")
    port.command('AT+CSIM=8,"80F20000"')
    port.command(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"')
    port.command('at+csim=10,"00C000002C"')
    port.command('AT+CSIM=4,"00"')  # malformed: logged, but no APDU
    assert modem.log == [
        "AT+CMEE=1",
        "AT+CIMI",
        'AT+CSIM=8,"80F20000"',
        f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"',
        'at+csim=10,"00C000002C"',
        'AT+CSIM=4,"00"',
    ]
    assert modem.count("AT+CSIM") == 4
    assert modem.count("AT+CIMI") == 1
    assert modem.count("AT+CCHO") == 0
    assert (modem.apdu_count(0xF2), modem.apdu_count(0x88), modem.apdu_count(0xC0)) == (1, 1, 1)
    modem.clear_log()
    assert modem.log == [] and modem.apdu_count(0x88) == 0


def _serving_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "modem-emulator")


def test_stop_is_prompt_even_mid_latency_and_when_nobody_reads(card: FakeCard) -> None:
    before = _serving_threads()
    modem = ModemEmulator(card, Quirks(auth_latency=30.0))
    port = Port(modem.start())
    port.send(f'AT+CSIM={len(AUTH_APDU)},"{AUTH_APDU}"')
    assert _wait(lambda: modem.apdu_count(0x88) == 1)
    started = time.monotonic()
    modem.stop()
    assert time.monotonic() - started < 1.0
    assert _serving_threads() == before
    modem.stop()  # idempotent
    port.close()

    # A host that never reads: the pty fills up, the emulator must still stop at once.
    modem = ModemEmulator(card)
    port = Port(modem.start())
    for _ in range(400):
        port.send("ATI")
    time.sleep(0.3)
    started = time.monotonic()
    modem.stop()
    assert time.monotonic() - started < 1.0
    assert _serving_threads() == before
    port.close()


def test_context_manager(card: FakeCard) -> None:
    with ModemEmulator(card) as modem:
        path = modem.path
        assert path is not None
        port = Port(path)
        assert port.command("AT") == ["OK"]
        port.close()
    assert modem.path is None


def _wait(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- the command line ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_every_quirk_has_a_flag() -> None:
    from mn_secd.cli import build_parser
    from mn_secd.sim.modem_cli import quirks_from_args

    parser = build_parser("sim")
    args = parser.parse_args(["sim", "modem", "--card", "x.toml"])
    assert quirks_from_args(args) == Quirks()
    flags = """--echo --urcs-between --urcs-inside --urc-line RING --urc-line +CREG:0 --split-writes
        --split-size 5 --split-delay 0.1 --reject-lowercase-hex --no-space-after-colon --ccho-style session-handle
        --no-logical-channels --no-test-commands --get-response-loop --refuse-authenticate --internal-get-response
        --latency 0.25 --auth-latency 3 --pin-counter qpinc --boot-no-sim 1.5 --boot-sim-busy 2 --csim-restricted
        --reselect-mf --cme0-every 3 --drop-answer-every 4 --wrong-le 1 --foreign-answers 0.5"""
    args = parser.parse_args(["sim", "modem", "--card", "x.toml", "--link", "/tmp/x", *flags.split()])
    assert args.link == "/tmp/x"
    assert quirks_from_args(args) == Quirks(
        echo=True,
        urcs_between=True,
        urcs_inside=True,
        urc_lines=("RING", "+CREG:0"),
        split_writes=True,
        split_size=5,
        split_delay=0.1,
        reject_lowercase_hex=True,
        no_space_after_colon=True,
        ccho_style="session_handle",
        no_logical_channels=True,
        no_test_commands=True,
        get_response_loop=True,
        refuse_authenticate=True,
        internal_get_response=True,
        latency=0.25,
        auth_latency=3.0,
        pin_counter="qpinc",
        boot_no_sim=1.5,
        boot_sim_busy=2.0,
        csim_restricted=True,
        reselect_mf=True,
        cme0_every=3,
        drop_answer_every=4,
        wrong_le=1,
        foreign_answers=0.5,
    )


class ModemProcess:
    """``python -m mn_secd sim modem`` as a subprocess, with its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mn_secd", "sim", "modem", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no line from the modem process"
        return self.proc.stdout.readline().strip()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)


def test_sim_modem_command(tmp_path: Path) -> None:
    from mn_secd.sim.milenage import Milenage, generate_autn

    shipped = REPO / "etc" / "sim" / "card-isim.toml"
    profile = tmp_path / "card.toml"  # a copy: the card writes its SQN state back
    profile.write_text(shipped.read_text())
    doc = tomllib.loads(shipped.read_text())
    link = tmp_path / "ttyMODEM"
    modem = ModemProcess("--card", str(profile), "--link", str(link), "--no-space-after-colon")
    try:
        assert modem.line() == str(link)
        port = Port(str(link))
        assert port.command("AT+CMEE=1") == ["OK"]
        assert port.command("AT+CIMI") == [doc["imsi"], "OK"]
        assert port.command(_ccho()) == ["+CCHO:1", "OK"]

        # One AUTHENTICATE through the real software USIM: RES as Milenage says, SQN state saved.
        milenage = Milenage(bytes.fromhex(doc["k"]), bytes.fromhex(doc["opc"]))
        rand, sqn = bytes(range(16)), (1 << doc["card_state"]["ind_len"]).to_bytes(6, "big")
        autn = generate_autn(milenage, rand, sqn, bytes.fromhex(doc["amf"]))
        apdu = (bytes.fromhex("0088008122") + b"\x10" + rand + b"\x10" + autn + b"\x00").hex().upper()
        answer = port.command(f'AT+CGLA=1,{len(apdu)},"{apdu}"')
        match = re.fullmatch(r'\+CGLA:4,"61([0-9A-F]{2})"', answer[0])
        assert match, answer
        answer = port.command(f'AT+CGLA=1,10,"00C00000{match.group(1)}"')
        data = bytes.fromhex(answer[0].split('"')[1])
        res = milenage.f2345(rand)[0]
        assert data[:2] == bytes([0xDB, len(res)]) and data[2 : 2 + len(res)] == res and data[-2:] == b"\x90\x00"
        assert tomllib.loads(profile.read_text())["card_state"]["seq_ms"][0] == 1

        modem.signal(signal.SIGUSR1)  # SIM out
        assert _lines(port.read_until(lambda b: b"NOT AVAILABLE\r\n" in b)) == [
            "+CPIN: NOT READY",
            "+SIMCARD: NOT AVAILABLE",
        ]
        assert port.command("AT+CIMI") == ["+CME ERROR: 10"]
        modem.signal(signal.SIGUSR1)  # SIM back in, freshly reset
        assert _lines(port.read_until(lambda b: b.endswith(b"READY\r\n"))) == ["+CPIN: READY"]
        assert port.command(_ccho()) == ["+CCHO:1", "OK"]

        modem.signal(signal.SIGUSR2)  # the port vanishes ...
        _wait_for_hangup(port)
        port.close()
        assert _wait(lambda: not os.path.lexists(link))
        modem.signal(signal.SIGUSR2)  # ... and comes back at the same path
        assert modem.line() == str(link)
        port = Port(str(link))
        assert port.command("AT+CPIN?") == ["+CPIN:READY", "OK"]
        port.close()

        modem.signal(signal.SIGTERM)
        assert modem.proc.wait(timeout=5) == 0
        assert not os.path.lexists(link)
        assert modem.proc.stderr is not None
        assert modem.proc.stderr.read().count("AUTHENTICATE (3G context): 61") == 1  # the emulator's log
    finally:
        modem.close()


def test_sim_modem_command_errors(tmp_path: Path) -> None:
    missing = ModemProcess("--card", str(tmp_path / "nope.toml"))
    try:
        assert missing.proc.wait(timeout=10) == 1
    finally:
        missing.close()
    occupied = tmp_path / "ttyUSB0"
    occupied.write_text("")
    busy = ModemProcess("--card", str(REPO / "etc" / "sim" / "card-isim.toml"), "--link", str(occupied))
    try:
        assert busy.proc.wait(timeout=10) == 2
    finally:
        busy.close()
