"""Read a DTLS 1.2 client's psk_identity off the wire before the DTLS stack sees it (sans-IO).

tinydtls asks for the PSK synchronously while it processes the ClientKeyExchange, and a NAF that
has never seen the B-TID must first ask the BSF over Zn, which takes a network round trip. Finding
the identity in the datagram lets the NAF hold that datagram, fetch the key, and only then hand it
to tinydtls (see :mod:`mn_secd.naf.gate`). The ClientKeyExchange travels in epoch 0, before
ChangeCipherSpec, so it is plaintext (RFC 6347 4.1, RFC 4279 2).
"""

from __future__ import annotations

_RECORD_HEADER = 13  # type, version(2), epoch(2), sequence number(6), length(2)
_HANDSHAKE_HEADER = 12  # type, length(3), message_seq(2), fragment_offset(3), fragment_length(3)
_CONTENT_HANDSHAKE = 22
_CLIENT_KEY_EXCHANGE = 16


def client_key_exchange_identity(datagram: bytes) -> bytes | None:
    """The psk_identity of a PSK ClientKeyExchange in ``datagram``, or None if there is none.

    Never raises: anything truncated, fragmented or not a handshake in epoch 0 is simply not a
    ClientKeyExchange as far as this function is concerned (tinydtls will judge it).
    """
    offset = 0
    while offset + _RECORD_HEADER <= len(datagram):
        header = datagram[offset : offset + _RECORD_HEADER]
        length = int.from_bytes(header[11:13], "big")
        body = datagram[offset + _RECORD_HEADER : offset + _RECORD_HEADER + length]
        offset += _RECORD_HEADER + length
        if len(body) < length:
            return None
        if header[0] != _CONTENT_HANDSHAKE or header[3:5] != b"\x00\x00":
            continue
        identity = _identity_in_handshake(body)
        if identity is not None:
            return identity
    return None


def _identity_in_handshake(body: bytes) -> bytes | None:
    if len(body) < _HANDSHAKE_HEADER + 2 or body[0] != _CLIENT_KEY_EXCHANGE:
        return None
    message_length = int.from_bytes(body[1:4], "big")
    fragment_offset = int.from_bytes(body[6:9], "big")
    fragment_length = int.from_bytes(body[9:12], "big")
    if fragment_offset != 0 or fragment_length != message_length:
        return None  # fragmented: the identity may not be whole here
    message = body[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + fragment_length]
    if len(message) != fragment_length or len(message) < 2:
        return None
    identity_length = int.from_bytes(message[:2], "big")
    if 2 + identity_length != len(message):
        return None
    return message[2:]
