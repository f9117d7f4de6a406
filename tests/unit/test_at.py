"""The sans-IO AT codec: command formatting, answer parsing and every quirk listed in docs/MODEMS.md."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.errors import AtParseError
from mn_secd.uicc import at
from mn_secd.uicc.at import (
    NEED_DATA,
    AtConnection,
    Command,
    Discarded,
    Echo,
    Error,
    Event,
    Info,
    Ok,
    Stray,
    Urc,
)


def run(conn: AtConnection, *chunks: bytes) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            assert not isinstance(event, at.Need)
            events.append(event)
    return events


# --- formatting -----------------------------------------------------------------------------------------


def test_csim_command_uses_uppercase_hex_and_counts_hex_characters() -> None:
    cmd = at.csim(bytes.fromhex("00a40004023f00"))
    assert cmd.text == 'AT+CSIM=14,"00A40004023F00"'
    assert AtConnection().send(cmd) == b'AT+CSIM=14,"00A40004023F00"\r'


def test_cgla_passes_a_sierra_session_handle_through_exactly() -> None:
    cmd = at.cgla("000000000385a7cf", bytes.fromhex("80f2000000"))
    assert cmd.text == 'AT+CGLA=000000000385a7cf,10,"80F2000000"'


def test_ccho_and_cchc() -> None:
    assert at.ccho(bytes.fromhex("a0000000871002")).text == 'AT+CCHO="A0000000871002"'
    assert at.cchc("2").text == "AT+CCHC=2"
    with pytest.raises(ValueError):
        at.cgla('1",0,"00', b"\x00")
    with pytest.raises(ValueError):
        Command("AT\rATZ")


# --- answer parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ['+CSIM: 4,"9000"', '+CSIM:4,"9000"', "+CSIM: 4,9000", '+csim: 4, "9000"', "+CSIM:4,9000"],
)
def test_csim_answer_variants(line: str) -> None:
    assert at.parse_csim([line]) == bytes.fromhex("9000")


def test_lowercase_hex_in_answers_is_accepted() -> None:
    assert at.parse_cgla(['+CGLA: 6,"6a9000"']) == bytes.fromhex("6a9000")


@pytest.mark.parametrize(
    "lines",
    [
        ['+CSIM: 6,"9000"'],  # length mismatch
        ['+CSIM: 3,"900"'],  # odd
        ['+CSIM: 2,"90"'],  # no room for SW1 SW2
        ['+CSIM: 4,"90G0"'],
        ['+CSIM: 4,"9000'],  # unbalanced quote
        [],
        ['+CSIM: 4,"9000"', '+CSIM: 4,"9000"'],
        ['+CSIM: 99999999999999999999,"9000"'],
    ],
)
def test_bad_csim_answers_raise_the_typed_error(lines: list[str]) -> None:
    with pytest.raises(AtParseError):
        at.parse_csim(lines)


@pytest.mark.parametrize(
    ("lines", "session"),
    [
        (["+CCHO: 1"], "1"),
        (["+CCHO:2"], "2"),
        (["3"], "3"),  # Fibocom: bare number
        (["+CCHO: 000000000385a7cf"], "000000000385a7cf"),  # Sierra: session handle, leading zeros kept
        (['+CCHO: "4294967297"'], "4294967297"),
    ],
)
def test_ccho_answer_variants(lines: list[str], session: str) -> None:
    assert at.parse_ccho(lines) == session


def test_cimi_and_cpin() -> None:
    assert at.parse_cimi(["001010000000001"]) == "001010000000001"
    assert at.parse_cpin(["+CPIN: SIM PIN"]) == "SIM PIN"
    with pytest.raises(AtParseError):
        at.parse_cimi(["ERRORISH"])
    with pytest.raises(AtParseError):
        at.parse_cpin([])


def test_cpin_with_a_cpin_urc_inside_its_answer_takes_the_newest_line() -> None:
    """A ``+CPIN:`` URC inside the answer has the answer's shape; the last line is the newest state."""
    assert at.parse_cpin(["+CPIN: READY", "+CPIN: READY"]) == "READY"
    assert at.parse_cpin(["+CPIN: SIM PIN", "+CPIN: READY"]) == "READY"
    assert at.parse_cpin(["+CPIN: READY", "+CPIN: NOT READY"]) == "NOT READY"


# --- the connection ---------------------------------------------------------------------------------------


def test_plain_answer() -> None:
    conn = AtConnection()
    conn.send(at.csim(bytes.fromhex("80F2000000")))
    assert run(conn, b'\r\n+CSIM: 4,"6A82"\r\n\r\nOK\r\n') == [Info('+CSIM: 4,"6A82"'), Ok()]
    assert conn.pending is None


def test_echo_urcs_odd_line_ends_and_byte_by_byte_delivery() -> None:
    conn = AtConnection()
    cmd = at.csim(bytes.fromhex("00A40004023F00"))
    conn.send(cmd)
    wire = (
        cmd.text.encode() + b"\r"  # echo, CR only
        + b"\r\n+CREG: 1,\"00C3\",\"1A2B\",7\r\n"  # URC between echo and answer
        + b"\n+CSIM:4,6110\n"  # LF only, no space, unquoted
        + b"RING\r\n"  # bare URC inside the answer
        + b"\r\nOK\r\n"
    )  # fmt: skip
    events = run(conn, *[bytes([b]) for b in wire])
    assert events == [
        Echo(cmd.text),
        Urc('+CREG: 1,"00C3","1A2B",7'),
        Info("+CSIM:4,6110"),
        Urc("RING"),
        Ok(),
    ]


def test_cme_errors_numeric_and_verbose() -> None:
    conn = AtConnection()
    conn.send(at.ccho(bytes.fromhex("A0000000871002")))
    assert run(conn, b"\r\n+CME ERROR: 4\r\n") == [Error(cme=4)]
    conn.send(at.plain("AT+CCHC=1"))
    assert run(conn, b"\r\n+CME ERROR: SIM not inserted\r\n") == [Error(cme=10)]
    conn.send(at.plain("AT+CCHC=1"))
    assert run(conn, b"+CME ERROR: Parameters error\r\n") == [Error(text="Parameters error")]
    conn.send(at.plain("AT"))
    assert run(conn, b"ERROR\r\n") == [Error()]


def test_bare_session_id_is_claimed_only_by_ccho() -> None:
    conn = AtConnection()
    assert run(conn, b"1\r\n") == [Urc("1")]  # nothing outstanding
    conn.send(at.ccho(bytes.fromhex("A0000000871002")))
    assert run(conn, b"\r\n1\r\n\r\nOK\r\n") == [Info("1"), Ok()]


def test_imsi_digits_are_info_for_cimi_only() -> None:
    conn = AtConnection()
    conn.send(at.cimi())
    assert run(conn, b"\r\n+CEREG: 1\r\n001010123456789\r\nOK\r\n") == [
        Urc("+CEREG: 1"),
        Info("001010123456789"),
        Ok(),
    ]


def test_late_answer_of_an_abandoned_command_is_discarded_not_misattributed() -> None:
    conn = AtConnection()
    conn.send(at.csim(bytes(5)))
    run(conn, b"\r\n")
    conn.abandon()
    assert conn.has_stale and conn.pending is None
    conn.send(at.query("AT+CPIN?", "+CPIN:"))
    events = run(conn, b'+CSIM: 4,"9000"\r\nOK\r\n+CREG: 2\r\n+CPIN: READY\r\nOK\r\n')
    assert events == [Discarded('+CSIM: 4,"9000"'), Discarded("OK"), Urc("+CREG: 2"), Info("+CPIN: READY"), Ok()]
    assert not conn.has_stale


def test_garbage_line_is_a_typed_error_and_the_stream_recovers() -> None:
    conn = AtConnection()
    conn.send(at.plain("AT"))
    conn.receive_data(b"\xff\xfe\x01junk\r\nOK\r\n")
    with pytest.raises(AtParseError):
        conn.next_event()
    assert conn.next_event() == Ok()


def test_overlong_line_is_a_typed_error() -> None:
    conn = AtConnection()
    conn.receive_data(b"A" * (at.MAX_LINE + 1))
    with pytest.raises(AtParseError):
        conn.next_event()
    assert run(conn, b"\r\nRING\r\n") == [Urc("RING")]


def test_a_final_without_a_command_is_a_stray_answer() -> None:
    """An OK nobody of ours asked for: another program talks on the port."""
    assert run(AtConnection(), b"OK\r\n") == [Stray("OK")]


def test_an_echoed_command_line_that_is_not_ours_is_a_stray() -> None:
    conn = AtConnection()
    conn.send(at.query("AT+CPIN?", "+CPIN:"))
    events = run(conn, b"AT+CPIN?\r\r\nAT+COPS?\r\r\n+CPIN: READY\r\n\r\nOK\r\n")
    assert events == [Echo("AT+CPIN?"), Stray("AT+COPS?"), Info("+CPIN: READY"), Ok()]
    assert run(conn, b"AT+CSQ\r\r\n+CSQ: 19,99\r\n\r\nOK\r\n") == [Stray("AT+CSQ"), Urc("+CSQ: 19,99"), Stray("OK")]


def test_the_late_final_of_a_forgotten_command_is_not_a_stray() -> None:
    conn = AtConnection()
    conn.send(at.plain("AT+CFUN=1"))
    conn.abandon()
    conn.forget_stale()
    assert run(conn, b"\r\nOK\r\n\r\nOK\r\n") == [Discarded("OK"), Stray("OK")]


def test_echo_of_the_pending_command_while_an_abandoned_one_is_expected() -> None:
    conn = AtConnection()
    conn.send(at.plain("AT+CFUN=1"))
    conn.abandon()
    conn.send(at.query("AT+CPIN?", "+CPIN:"))
    events = run(conn, b"AT+CPIN?\r\r\nOK\r\n+CPIN: READY\r\nOK\r\n")
    assert events == [Urc("AT+CPIN?"), Discarded("OK"), Info("+CPIN: READY"), Ok()]


def test_a_secret_command_never_shows_its_text() -> None:
    command = at.enter_pin("1234")
    assert command.text == 'AT+CPIN="1234"'
    assert "1234" not in repr(command) and "AT+CPIN" in repr(command)
    assert "1234" not in repr(Stray('AT+CPIN="1234"'))
    for bad in ("123", "123456789", "12a4", "１２３４"):
        with pytest.raises(ValueError):
            at.enter_pin(bad)


def test_two_commands_at_once_is_a_programming_error() -> None:
    conn = AtConnection()
    conn.send(at.plain("AT"))
    with pytest.raises(RuntimeError):
        conn.send(at.plain("AT"))


# --- properties ----------------------------------------------------------------------------------------

COMMANDS = [
    at.csim(bytes.fromhex("00A40004023F00")),
    at.cgla("1", bytes.fromhex("80F2000000")),
    at.ccho(bytes.fromhex("A0000000871002")),
    at.cimi(),
    at.query("AT+CPIN?", "+CPIN:"),
    None,
]


def drain(conn: AtConnection) -> list[Event | str]:
    out: list[Event | str] = []
    while True:
        try:
            event = conn.next_event()
        except AtParseError:
            out.append("parse-error")
            continue
        if event is NEED_DATA:
            return out
        assert not isinstance(event, at.Need)
        out.append(event)


@given(st.binary(max_size=600), st.sampled_from(COMMANDS), st.booleans())
def test_arbitrary_bytes_only_ever_raise_at_parse_error(data: bytes, command: Command | None, abandon: bool) -> None:
    conn = AtConnection()
    if command is not None:
        conn.send(command)
        if abandon:
            conn.abandon()
    conn.receive_data(data)
    drain(conn)


ANSWER_LINES = st.sampled_from(
    [b'+CSIM: 4,"9000"', b"OK", b"ERROR", b"+CME ERROR: 10", b"RING", b"+CREG: 1", b"1", b"", b"\xff\x00"]
)


@given(st.lists(ANSWER_LINES, max_size=8), st.sampled_from([b"\r\n", b"\r", b"\n"]), st.data())
def test_events_do_not_depend_on_how_the_bytes_are_split(lines: list[bytes], eol: bytes, data: st.DataObject) -> None:
    wire = b"".join(line + eol for line in lines)
    whole = AtConnection()
    whole.send(at.csim(bytes(5)))
    whole.receive_data(wire)
    expected = drain(whole)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    split = AtConnection()
    split.send(at.csim(bytes(5)))
    got: list[Event | str] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        split.receive_data(wire[start:end])
        got += drain(split)
    assert got == expected


@given(st.lists(st.text(max_size=80), max_size=4))
def test_answer_parsers_only_raise_at_parse_error(lines: list[str]) -> None:
    for parser in (at.parse_csim, at.parse_cgla, at.parse_ccho, at.parse_cimi, at.parse_cpin):
        with contextlib.suppress(AtParseError):
            parser(lines)


# --- V.250 numeric result codes (a modem whose stored profile says ATV0) -----------------------------------


def test_atv1_takes_a_bare_0_as_ok_and_4_as_error() -> None:
    conn = AtConnection()
    conn.send(at.verbose_results())
    assert run(conn, b"ATV1\r0\r") == [Echo("ATV1"), Ok()]  # echo on and V0: both in the profile
    conn.send(at.verbose_results())
    assert run(conn, b"\r\nOK\r\n") == [Ok()]  # a modem in V1 already
    conn.send(at.verbose_results())
    assert run(conn, b"4\r") == [Error()]
    assert conn.pending is None


def test_a_bare_digit_is_never_a_final_result_outside_atv1() -> None:
    conn = AtConnection()
    conn.send(at.plain("ATE0"))
    assert run(conn, b"0\r") == [Urc("0")]  # not OK: the command is still outstanding
    assert conn.pending is not None
    conn.abandon()
    conn.forget_stale()
    conn.send(at.ccho(bytes.fromhex("A0000000871002")))
    assert run(conn, b"0\r\n4\r\n") == [Info("0"), Info("4")]  # Fibocom's bare channel number(s)
    assert conn.pending is not None
    assert run(conn, b"\r\nOK\r\n") == [Ok()]
    assert run(conn, b"0\r") == [Urc("0")]  # nothing outstanding: no stray final either
