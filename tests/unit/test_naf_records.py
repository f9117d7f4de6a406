"""Finding a DTLS client's psk_identity in a datagram (mn_secd.naf.records)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mn_secd.naf.records import client_key_exchange_identity


def record(content_type: int, body: bytes, *, epoch: int = 0, seq: int = 0) -> bytes:
    return (
        bytes([content_type, 0xFE, 0xFD])
        + epoch.to_bytes(2, "big")
        + seq.to_bytes(6, "big")
        + len(body).to_bytes(2, "big")
        + body
    )


def handshake(msg_type: int, message: bytes, *, fragment_offset: int = 0, fragment: bytes | None = None) -> bytes:
    part = message if fragment is None else fragment
    return (
        bytes([msg_type])
        + len(message).to_bytes(3, "big")
        + (2).to_bytes(2, "big")
        + fragment_offset.to_bytes(3, "big")
        + len(part).to_bytes(3, "big")
        + part
    )


def cke(identity: bytes) -> bytes:
    return record(22, handshake(16, len(identity).to_bytes(2, "big") + identity), seq=2)


def test_identity_of_a_lone_client_key_exchange() -> None:
    assert client_key_exchange_identity(cke(b"I1U8vpY3qJ0hiuZNrke/NQ==")) == b"I1U8vpY3qJ0hiuZNrke/NQ=="


def test_identity_when_the_whole_flight_shares_one_datagram() -> None:
    flight = cke(b"ae1") + record(20, b"\x01", seq=3) + record(22, b"\x00" * 40, epoch=1)
    assert client_key_exchange_identity(flight) == b"ae1"
    # ... and when something precedes it in the datagram
    assert client_key_exchange_identity(record(21, b"\x01\x00") + cke(b"x")) == b"x"


def test_empty_identity_is_still_an_identity() -> None:
    assert client_key_exchange_identity(cke(b"")) == b""


def test_not_a_client_key_exchange() -> None:
    client_hello = record(22, handshake(1, b"\xfe\xfd" + bytes(40)))
    assert client_key_exchange_identity(client_hello) is None
    assert client_key_exchange_identity(record(23, b"\x00" * 30, epoch=1)) is None  # application data
    assert client_key_exchange_identity(b"") is None


def test_encrypted_or_damaged_records_are_ignored() -> None:
    body = handshake(16, b"\x00\x03ae1")
    assert client_key_exchange_identity(record(22, body, epoch=1)) is None  # epoch 1 is ciphertext
    assert client_key_exchange_identity(cke(b"ae1")[:-1]) is None  # truncated
    wrong_length = handshake(16, b"\x00\x09ae1")  # identity length beyond the message
    assert client_key_exchange_identity(record(22, wrong_length)) is None


def test_fragmented_client_key_exchange_is_left_to_tinydtls() -> None:
    message = b"\x00\x03ae1"
    first = record(22, handshake(16, message, fragment=message[:3]))
    second = record(22, handshake(16, message, fragment_offset=3, fragment=message[3:]))
    assert client_key_exchange_identity(first) is None
    assert client_key_exchange_identity(second) is None


@given(st.binary(max_size=300))
def test_never_raises(data: bytes) -> None:
    result = client_key_exchange_identity(data)
    assert result is None or isinstance(result, bytes)
