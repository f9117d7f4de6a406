"""What the DTLS server does with a decrypted CoAP datagram before aiocoap sees it (RFC 7252).

aiocoap's decoder trusts its input in ways a hostile peer can exploit: a reserved token length
(9 to 15) is read as a long token, and an option that must be UTF-8 but is not raises
``UnicodeDecodeError`` from inside tinydtls's C callback. Here every datagram is parsed first,
as a pure function, and either handed on (possibly without an elective option whose value is
malformed) or rejected as RFC 7252 says, with the bytes of the answer to send, if any:

* a message format error (reserved token length, truncated token or option, reserved option
  nibble, payload marker without payload, an Empty message with content, a reserved code class
  1, 6 or 7) rejects the message (3, 4.2, 4.3): a Confirmable one gets a Reset, any other is
  silently ignored;
* an unknown version is silently ignored (3);
* an option value outside its format or length (5.4.3) is treated like an unrecognised option
  (5.4.1): elective ones are dropped from the message, a critical one in a Confirmable request is
  answered 4.02 (Bad Option) with a diagnostic, in any other Confirmable message a Reset, and in a
  Non-confirmable one nothing.

Options this module does not know are left for the resources (unknown critical ones get 4.02
there, see :mod:`mn_secd.control.payloads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_VERSION = 1
_CON, _NON, _ACK, _RST = 0, 1, 2, 3
_BAD_OPTION = (4 << 5) | 2
_PAYLOAD_MARKER = 0xFF
_MAX_TOKEN = 8

_Format = Literal["empty", "opaque", "uint", "string"]

#: Option formats and lengths: RFC 7252 5.10, RFC 7641 2 (Observe), RFC 7959 2.1 (Block, Size2),
#: RFC 7967 2 (No-Response).
OPTION_FORMATS: dict[int, tuple[str, _Format, int, int]] = {
    1: ("If-Match", "opaque", 0, 8),
    3: ("Uri-Host", "string", 1, 255),
    4: ("ETag", "opaque", 1, 8),
    5: ("If-None-Match", "empty", 0, 0),
    6: ("Observe", "uint", 0, 3),
    7: ("Uri-Port", "uint", 0, 2),
    8: ("Location-Path", "string", 0, 255),
    11: ("Uri-Path", "string", 0, 255),
    12: ("Content-Format", "uint", 0, 2),
    14: ("Max-Age", "uint", 0, 4),
    15: ("Uri-Query", "string", 0, 255),
    17: ("Accept", "uint", 0, 2),
    20: ("Location-Query", "string", 0, 255),
    23: ("Block2", "uint", 0, 3),
    27: ("Block1", "uint", 0, 3),
    28: ("Size2", "uint", 0, 4),
    35: ("Proxy-Uri", "string", 1, 1034),
    39: ("Proxy-Scheme", "string", 1, 255),
    60: ("Size1", "uint", 0, 4),
    258: ("No-Response", "uint", 0, 1),
}


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``datagram`` to aiocoap (without the malformed elective options named in ``dropped``)."""

    datagram: bytes
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject:
    """Do not process the message; send ``reply`` (a Reset or a 4.02) if there is one."""

    reason: str
    reply: bytes | None = None


Verdict = Deliver | Reject


class _FormatError(Exception):
    pass


def screen(datagram: bytes) -> Verdict:
    """Decide what happens to one decrypted CoAP-over-UDP datagram."""
    if len(datagram) < 4:
        return Reject("shorter than a CoAP header")
    first, code = datagram[0], datagram[1]
    version, mtype, token_length = first >> 6, (first >> 4) & 3, first & 0x0F
    if version != _VERSION:
        return Reject(f"CoAP version {version}")
    try:
        options, payload_at, bad = _parse(datagram, token_length, code)
    except _FormatError as exc:
        return Reject(f"message format error: {exc}", _reset(datagram[2:4]) if mtype == _CON else None)
    if not bad:
        return Deliver(datagram)
    critical = [problem for number, problem in bad if number & 1]
    if critical:
        reason = "; ".join(critical)
        if mtype != _CON:
            return Reject(reason)
        if code >> 5 == 0:  # a request
            return Reject(reason, _bad_option(datagram[2:4], datagram[4 : 4 + token_length], reason))
        return Reject(reason, _reset(datagram[2:4]))
    kept = [(number, value) for number, value in options if not option_problem(number, value)]
    rebuilt = datagram[: 4 + token_length] + encode_options(kept) + datagram[payload_at:]
    return Deliver(rebuilt, tuple(problem for _, problem in bad))


def _parse(datagram: bytes, token_length: int, code: int) -> tuple[list[tuple[int, bytes]], int, list[tuple[int, str]]]:
    """Options (number, value), the offset of the payload marker (or the end), and the options whose
    value is malformed (number, why); raises _FormatError."""
    if token_length > _MAX_TOKEN:
        raise _FormatError(f"token length {token_length} (9 to 15 are reserved)")
    end = len(datagram)
    position = 4 + token_length
    if position > end:
        raise _FormatError("truncated token")
    if code == 0:
        if token_length or end > 4:
            raise _FormatError("an Empty message with a token or content")
        return [], end, []
    if code >> 5 in (1, 6, 7):
        raise _FormatError(f"code class {code >> 5} is reserved")
    options: list[tuple[int, bytes]] = []
    bad: list[tuple[int, str]] = []
    number = 0
    while position < end:
        if datagram[position] == _PAYLOAD_MARKER:
            if position + 1 == end:
                raise _FormatError("a payload marker without payload")
            return options, position, bad
        delta, length = datagram[position] >> 4, datagram[position] & 0x0F
        position += 1
        if delta >= 13:  # most options need no extended fields: no call for them
            delta, position = _extended(datagram, delta, position)
        if length >= 13:
            length, position = _extended(datagram, length, position)
        number += delta
        if number > 0xFFFF:
            raise _FormatError("option number beyond 65535")
        if position + length > end:
            raise _FormatError("truncated option")
        value = datagram[position : position + length]
        options.append((number, value))
        if (problem := option_problem(number, value)) is not None:
            bad.append((number, problem))
        position += length
    return options, end, bad


def _extended(datagram: bytes, nibble: int, position: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, position
    if nibble == 15:
        raise _FormatError("reserved option nibble 15")
    size = 1 if nibble == 13 else 2
    if position + size > len(datagram):
        raise _FormatError("truncated option header")
    value = int.from_bytes(datagram[position : position + size], "big")
    return value + (13 if nibble == 13 else 269), position + size


def option_problem(number: int, value: bytes) -> str | None:
    """Why a known option's value is malformed (RFC 7252 5.4.3), or None (also for unknown options)."""
    known = OPTION_FORMATS.get(number)
    if known is None:
        return None
    name, form, shortest, longest = known
    if not shortest <= len(value) <= longest:
        return f"{name} ({number}) of {len(value)} octets (allowed {shortest} to {longest})"
    if form == "string" and not value.isascii():  # ASCII is UTF-8; anything else is decoded to know
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return f"{name} ({number}) is not UTF-8"
    return None


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options in ascending order of number, encoded with deltas (RFC 7252 3.1)."""
    out = bytearray()
    previous = 0
    for number, value in sorted(options, key=lambda option: option[0]):
        delta_nibble, delta_ext = _nibble(number - previous)
        length_nibble, length_ext = _nibble(len(value))
        out.append(delta_nibble << 4 | length_nibble)
        out += delta_ext + length_ext + value
        previous = number
    return bytes(out)


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, (value - 269).to_bytes(2, "big")


def _reset(mid: bytes) -> bytes:
    return bytes([_VERSION << 6 | _RST << 4, 0]) + mid


def _bad_option(mid: bytes, token: bytes, reason: str) -> bytes:
    header = bytes([_VERSION << 6 | _ACK << 4 | len(token), _BAD_OPTION]) + mid + token
    return header + bytes([_PAYLOAD_MARKER]) + f"bad-option: {reason}".encode()[:200]
