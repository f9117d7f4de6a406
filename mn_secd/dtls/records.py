"""What a DTLS datagram's first record says before any decryption (RFC 6347 4.1, 4.2.2).

The transports look at the unencrypted record header of each datagram (and, for epoch 0, at the
first handshake or alert message) to know where a handshake stands without asking tinydtls, which
does not tell: a server sees that tinydtls accepted a cookie when it writes a ServerHello, and a
client knows whether the server said anything at all. Pure functions on bytes.
"""

from __future__ import annotations

from enum import IntEnum

RECORD_HEADER_LENGTH = 13


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    HELLO_VERIFY_REQUEST = 3


#: Alert levels (RFC 5246 7.2).
ALERT_WARNING = 1
ALERT_FATAL = 2


def _epoch0(datagram: bytes, content_type: ContentType) -> bool:
    return len(datagram) > RECORD_HEADER_LENGTH and datagram[0] == content_type and datagram[3:5] == b"\0\0"


def handshake_type(datagram: bytes) -> int | None:
    """The type of the first handshake message, if the datagram starts with an epoch-0 handshake record."""
    return datagram[RECORD_HEADER_LENGTH] if _epoch0(datagram, ContentType.HANDSHAKE) else None


def is_client_hello(datagram: bytes) -> bool:
    """True for a datagram that starts with a ClientHello in epoch 0: the only start of a session."""
    return handshake_type(datagram) == HandshakeType.CLIENT_HELLO


def plaintext_alert(datagram: bytes) -> tuple[int, int] | None:
    """(level, description) of an unencrypted (epoch 0) alert, e.g. a refused handshake."""
    if _epoch0(datagram, ContentType.ALERT) and len(datagram) >= RECORD_HEADER_LENGTH + 2:
        return datagram[RECORD_HEADER_LENGTH], datagram[RECORD_HEADER_LENGTH + 1]
    return None


def is_alert(datagram: bytes) -> bool:
    """True for a datagram starting with an alert record of any epoch (encrypted ones included)."""
    return len(datagram) > RECORD_HEADER_LENGTH and datagram[0] == ContentType.ALERT
