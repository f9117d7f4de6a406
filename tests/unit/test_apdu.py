"""APDU coding, status words, BER-TLV and the T=0 GET RESPONSE procedure."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mn_secd.aka import AuthContext
from mn_secd.errors import ApduParseError, GetResponseLoop
from mn_secd.uicc.apdu import (
    Apdu,
    Done,
    Response,
    Send,
    T0Exchange,
    Tlv,
    channel_of,
    cla_for_channel,
    find_tlv,
    parse_apdu,
    parse_response,
    parse_tlvs,
    sw_meaning,
)
from mn_secd.uicc.auth import build_authenticate

SELECT_MF = Apdu(0x00, 0xA4, 0x00, 0x04, bytes.fromhex("3F00"))


def test_encode_and_parse_all_four_cases() -> None:
    for apdu, wire in [
        (Apdu(0x00, 0x70, 0x80, 0x01), "00708001"),
        (Apdu(0x00, 0x70, 0x00, 0x00, le=1), "0070000001"),
        (SELECT_MF, "00A40004023F00"),
        (Apdu(0x00, 0xA4, 0x04, 0x04, bytes.fromhex("A0000000871002"), le=256), "00A4040407A000000087100200"),
    ]:
        assert apdu.encode() == bytes.fromhex(wire)
        assert parse_apdu(bytes.fromhex(wire)) == apdu


def test_authenticate_round_trips() -> None:
    raw = build_authenticate(bytes(16), bytes(16), AuthContext.UMTS)
    assert parse_apdu(raw).encode() == raw


@pytest.mark.parametrize("wire", ["00A400", "00A40004023F", "00A4000400FF00", "00A40004023F0000FF"])
def test_malformed_apdus(wire: str) -> None:
    with pytest.raises(ApduParseError):
        parse_apdu(bytes.fromhex(wire))


@pytest.mark.parametrize(
    ("cla", "channel", "coded"),
    [(0x00, 0, 0x00), (0x00, 3, 0x03), (0x00, 4, 0x40), (0x00, 19, 0x4F), (0x80, 2, 0x82), (0x80, 5, 0xC1)],
)
def test_cla_for_logical_channels(cla: int, channel: int, coded: int) -> None:
    assert cla_for_channel(cla, channel) == coded
    assert channel_of(coded) == channel


def test_status_words() -> None:
    assert parse_response(bytes.fromhex("019000")) == Response(b"\x01", 0x9000)
    assert sw_meaning(0x9862) == "authentication error, incorrect MAC"
    assert "35" in sw_meaning(0x6123) or "GET RESPONSE" in sw_meaning(0x6123)
    assert sw_meaning(0x6C10).endswith("16")
    assert sw_meaning(0x63C2) == "verification failed, 2 retries left"
    assert sw_meaning(0x1234) == "unknown status word"
    with pytest.raises(ApduParseError):
        parse_response(b"\x90")


def test_response_repr_hides_data() -> None:
    assert "DEADBEEF" not in repr(Response(bytes.fromhex("deadbeef"), 0x9000)).upper()


# --- BER-TLV -----------------------------------------------------------------------------------------------


def test_tlv_forms_and_padding() -> None:
    data = bytes.fromhex("8001AA" + "9F7002BBCC" + "818181" + "00" * 0x81 + "FFFF")
    tlvs = parse_tlvs(data)
    assert tlvs[0] == Tlv(0x80, b"\xaa")
    assert tlvs[1] == Tlv(0x9F70, b"\xbb\xcc")
    assert tlvs[2] == Tlv(0x81, bytes(0x81))
    assert find_tlv(tlvs, 0x9F70) == b"\xbb\xcc" and find_tlv(tlvs, 0x42) is None


@pytest.mark.parametrize("wire", ["8005AA", "9F", "9FFFFF0100", "8084000000", "80", "FF80", "8001AAFF01"])
def test_bad_tlvs(wire: str) -> None:
    with pytest.raises(ApduParseError):
        parse_tlvs(bytes.fromhex(wire))


@given(st.binary(max_size=300))
def test_parsers_only_raise_apdu_parse_error(data: bytes) -> None:
    for parser in (parse_tlvs, parse_apdu, parse_response):
        with contextlib.suppress(ApduParseError):
            parser(data)


@given(st.lists(st.tuples(st.sampled_from([0x80, 0x82, 0x4F, 0x9F70, 0xBF8101]), st.binary(max_size=300))))
def test_tlv_encode_parse_round_trip(objects: list[tuple[int, bytes]]) -> None:
    def encode(tag: int, value: bytes) -> bytes:
        tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
        n = len(value)
        length = bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else bytes([0x82]) + n.to_bytes(2, "big")
        return tag_bytes + length + value

    wire = b"".join(encode(t, v) for t, v in objects)
    assert parse_tlvs(wire) == [Tlv(t, v) for t, v in objects]


# --- T=0 ----------------------------------------------------------------------------------------------------


def test_direct_answer_needs_no_get_response() -> None:
    ex = T0Exchange(SELECT_MF)
    assert ex.start() == SELECT_MF
    assert ex.receive(bytes.fromhex("62039000")) == Done(Response(b"\x62\x03", 0x9000))
    assert ex.get_responses == 0


def test_61xx_fetches_on_the_same_channel_and_chains_data() -> None:
    cmd = Apdu(0x00, 0x88, 0x00, 0x81, bytes(34), le=256).on_channel(2)
    ex = T0Exchange(cmd)
    step = ex.receive(bytes.fromhex("6135"))
    assert step == Send(Apdu(0x02, 0xC0, 0x00, 0x00, le=0x35))
    step = ex.receive(b"\x01" * 0x20 + bytes.fromhex("6115"))
    assert step == Send(Apdu(0x02, 0xC0, 0x00, 0x00, le=0x15))
    assert ex.receive(b"\x02" * 0x15 + bytes.fromhex("9000")) == Done(Response(b"\x01" * 0x20 + b"\x02" * 0x15, 0x9000))


def test_get_response_uses_interindustry_class_for_a_proprietary_command() -> None:
    ex = T0Exchange(Apdu(0x80, 0xF2, 0x00, 0x00, le=256).on_channel(5))
    step = ex.receive(bytes.fromhex("6110"))
    assert isinstance(step, Send) and step.apdu.cla == 0x41 and step.apdu.channel == 5


def test_6cxx_resends_once_with_the_right_le() -> None:
    cmd = Apdu(0x00, 0xB0, 0x00, 0x00, le=256)
    ex = T0Exchange(cmd)
    assert ex.receive(bytes.fromhex("6C09")) == Send(cmd.with_le(9))
    assert ex.receive(bytes.fromhex("6C08")) == Done(Response(b"", 0x6C08))


def test_6cxx_is_never_resent_for_authenticate() -> None:
    ex = T0Exchange(parse_apdu(build_authenticate(bytes(16), bytes(16), AuthContext.UMTS)), may_resend=False)
    assert ex.receive(bytes.fromhex("6C35")) == Done(Response(b"", 0x6C35))


def test_6100_forever_is_capped_with_a_typed_error() -> None:
    ex = T0Exchange(SELECT_MF, max_get_response=4)
    for _ in range(4):
        assert isinstance(ex.receive(bytes.fromhex("6100")), Send)
    with pytest.raises(GetResponseLoop) as info:
        ex.receive(bytes.fromhex("6100"))
    assert info.value.sw == 0x6100 and info.value.culprit == "modem"


def test_finished_exchange_cannot_be_fed() -> None:
    ex = T0Exchange(SELECT_MF)
    ex.receive(bytes.fromhex("9000"))
    with pytest.raises(RuntimeError):
        ex.receive(bytes.fromhex("9000"))


@given(st.lists(st.binary(max_size=40), max_size=12))
def test_t0_only_raises_typed_errors(answers: list[bytes]) -> None:
    ex = T0Exchange(SELECT_MF)
    for raw in answers:
        try:
            if isinstance(ex.receive(raw), Done):
                return
        except (ApduParseError, GetResponseLoop):
            return


def test_which_commands_may_be_sent_again_after_a_lost_answer() -> None:
    """Idempotent: SELECT, READ BINARY, READ RECORD (absolute), STATUS, UPDATE BINARY. Never the rest."""
    from mn_secd.uicc.apdu import idempotent

    again = [Apdu(0, 0xA4, 0, 4, b"\x3f\x00"), Apdu(0, 0xB0, 0, 0, le=9), Apdu(0, 0xB2, 1, 4, le=32)]
    again += [Apdu(0x80, 0xF2, 0, 0x0C), Apdu(0, 0xD6, 0, 0, b"\x00")]
    never = [Apdu(0, 0xB2, 0, 2, le=32), Apdu(0, 0xC0, 0, 0, le=16), Apdu(0, 0x70, 0, 0, le=1)]
    never += [
        Apdu(0, 0x88, 0, 0x81, bytes(34)),
        Apdu(0, 0x20, 0, 1, b"1234\xff\xff\xff\xff"),
        Apdu(0, 0xDC, 1, 4, b"x"),
    ]
    assert all(idempotent(a) for a in again)
    assert not any(idempotent(a) for a in never)
