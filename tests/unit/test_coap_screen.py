"""mn_secd.dtls.coap_screen: RFC 7252 message format errors and malformed options, before aiocoap decodes."""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import OpaqueOption
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.dtls.coap_screen import Deliver, Reject, encode_options, option_problem, screen

GET_KEY = bytes([0x42, 0x01, 0x12, 0x34]) + b"t1" + bytes([0xB3]) + b"key"  # CON GET /key, token "t1"


def test_a_good_request_is_delivered_untouched() -> None:
    assert screen(GET_KEY) == Deliver(GET_KEY)


def test_a_path_that_is_not_utf8_in_a_con_request_gets_4_02() -> None:
    verdict = screen(bytes([0x42, 0x01, 0x12, 0x34]) + b"t1" + bytes([0xB2, 0xFF, 0xFE]))
    assert isinstance(verdict, Reject) and verdict.reply is not None
    answer = aiocoap.Message.decode(verdict.reply)
    assert (answer.mtype, answer.code, answer.mid, answer.token) == (Type.ACK, Code.BAD_OPTION, 0x1234, b"t1")
    assert answer.payload == b"bad-option: Uri-Path (11) is not UTF-8"


def test_a_bad_critical_option_elsewhere_is_a_reset_or_nothing() -> None:
    con_response = bytes([0x42, 0x45, 0x00, 0x07]) + b"t1" + bytes([0xB2, 0xFF, 0xFE])  # CON 2.05
    assert screen(con_response) == Reject("Uri-Path (11) is not UTF-8", bytes([0x70, 0x00, 0x00, 0x07]))
    non_request = bytes([0x52, 0x01, 0x00, 0x07]) + b"t1" + bytes([0xB2, 0xFF, 0xFE])
    assert screen(non_request) == Reject("Uri-Path (11) is not UTF-8")


@pytest.mark.parametrize("token_length", range(9, 16))
def test_a_reserved_token_length_is_a_format_error(token_length: int) -> None:
    con = bytes([0x40 | token_length, 0x01, 0xAB, 0xCD]) + bytes(token_length) + b"\xb3key"
    verdict = screen(con)
    assert isinstance(verdict, Reject) and "token length" in verdict.reason
    assert verdict.reply == bytes([0x70, 0x00, 0xAB, 0xCD])  # Reset
    assert screen(bytes([0x50 | token_length]) + con[1:]) == Reject(verdict.reason)  # NON: ignored


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (bytes([0x40, 0x01, 0, 1, 0xF0]), "reserved option nibble 15"),
        (bytes([0x40, 0x01, 0, 1, 0xD1]), "truncated option header"),
        (bytes([0x40, 0x01, 0, 1, 0xB5, 0x61]), "truncated option"),
        (bytes([0x40, 0x01, 0, 1, 0xFF]), "a payload marker without payload"),
        (bytes([0x41, 0x00, 0, 1]) + b"x", "an Empty message with a token or content"),
        (bytes([0x40, 0x00, 0, 1, 0xFF, 0x00]), "an Empty message with a token or content"),
        (bytes([0x42, 0x01, 0, 1]) + b"x", "truncated token"),
        (bytes([0x40, 0x21, 0, 1]), "code class 1 is reserved"),
        (bytes([0x40, 0xE0, 0, 1]), "code class 7 is reserved"),
        (bytes([0x40, 0x01, 0, 1, 0xE0, 0xFF, 0xFF, 0xE0, 0xFF, 0xFF]), "option number beyond 65535"),
    ],
)
def test_message_format_errors_get_a_reset(datagram: bytes, reason: str) -> None:
    assert screen(datagram) == Reject(f"message format error: {reason}", bytes([0x70, 0x00, 0, 1]))


def test_unknown_versions_and_runts_are_ignored() -> None:
    assert screen(bytes([0x80, 0x01, 0, 1])) == Reject("CoAP version 2")
    assert screen(b"\x40\x01") == Reject("shorter than a CoAP header")


def test_a_malformed_elective_option_is_dropped_and_the_rest_delivered() -> None:
    # CON GET, Uri-Path "key" (11), Content-Format of 3 octets (12, elective, 0-2 allowed), payload
    datagram = bytes([0x40, 0x01, 0, 1, 0xB3]) + b"key" + bytes([0x13, 1, 2, 3, 0xFF]) + b"body"
    verdict = screen(datagram)
    assert verdict == Deliver(bytes([0x40, 0x01, 0, 1, 0xB3]) + b"key" + bytes([0xFF]) + b"body", verdict.dropped)
    assert verdict.dropped == ("Content-Format (12) of 3 octets (allowed 0 to 2)",)
    message = aiocoap.Message.decode(verdict.datagram)
    assert message.opt.uri_path == ("key",) and message.opt.content_format is None and message.payload == b"body"


@pytest.mark.parametrize(
    ("number", "value", "problem"),
    [
        (3, b"", "Uri-Host (3) of 0 octets (allowed 1 to 255)"),
        (4, bytes(9), "ETag (4) of 9 octets (allowed 1 to 8)"),
        (5, b"x", "If-None-Match (5) of 1 octets (allowed 0 to 0)"),
        (6, bytes(4), "Observe (6) of 4 octets (allowed 0 to 3)"),
        (15, b"\xc3\x28", "Uri-Query (15) is not UTF-8"),
        (2049, b"\xff", None),  # unknown: left for the resource's critical-option check
        (11, "ünï".encode(), None),
    ],
)
def test_option_formats(number: int, value: bytes, problem: str | None) -> None:
    assert option_problem(number, value) == problem


#: Option numbers aiocoap keeps as opaque bytes, so that what it decodes can be compared byte for byte.
_OPAQUE = st.integers(0, 3000).filter(lambda n: OptionNumber(n).format is OpaqueOption)


@given(st.lists(st.tuples(_OPAQUE, st.binary(max_size=300)), max_size=6))
def test_options_encode_as_aiocoap_decodes_them(options: list[tuple[int, bytes]]) -> None:
    datagram = bytes([0x40, 0x01, 0, 1]) + encode_options(options)
    decoded = [(int(o.number), o.value) for o in aiocoap.Message.decode(datagram).opt.option_list()]
    assert sorted(decoded) == sorted(options)


@given(st.binary(max_size=80))
def test_anything_either_delivers_what_aiocoap_decodes_or_rejects(datagram: bytes) -> None:
    verdict = screen(datagram)
    if isinstance(verdict, Deliver):
        aiocoap.Message.decode(verdict.datagram)  # never raises
    elif verdict.reply is not None:
        aiocoap.Message.decode(verdict.reply)
