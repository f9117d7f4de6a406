"""APDUs, status words, BER-TLV and the T=0 GET RESPONSE procedure, sans-IO (ETSI TS 102 221).

The host side of T=0 lives here rather than in a transport because modems differ: some fetch the
answer internally and return data + ``9000``, others return ``61xx`` and leave GET RESPONSE to us
(``docs/MODEMS.md``). :class:`T0Exchange` handles both, always on the command's own logical
channel, and caps the GET RESPONSE rounds so a modem answering ``6100`` forever cannot hang us.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mn_secd.errors import ApduParseError, GetResponseLoop

SW_OK = 0x9000
INS_GET_RESPONSE = 0xC0
#: Enough for any answer a UICC gives us (the longest, 3G AUTHENTICATE with Kc, is 53 octets).
MAX_GET_RESPONSE = 8

# --- APDUs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apdu:
    """A short command APDU. ``le`` is 1..256 (256 is written as ``00``) or None for no Le."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        if not all(0 <= v <= 0xFF for v in (self.cla, self.ins, self.p1, self.p2)):
            raise ValueError("CLA, INS, P1 and P2 are single octets")
        if len(self.data) > 0xFF:
            raise ValueError("short APDUs carry at most 255 data octets")
        if self.le is not None and not 1 <= self.le <= 256:
            raise ValueError("Le is 1..256")

    def encode(self) -> bytes:
        head = bytes([self.cla, self.ins, self.p1, self.p2])
        body = bytes([len(self.data)]) + self.data if self.data else b""
        tail = bytes([self.le & 0xFF]) if self.le is not None else b""
        return head + body + tail

    def on_channel(self, channel: int) -> Apdu:
        """The same command with the logical channel coded in CLA (§4.9)."""
        return replace(self, cla=cla_for_channel(self.cla, channel))

    def with_le(self, le: int) -> Apdu:
        return replace(self, le=le)

    @property
    def channel(self) -> int:
        return channel_of(self.cla)


def parse_apdu(raw: bytes) -> Apdu:
    """Decode a short command APDU (cases 1-4); extended length is not used with UICCs here."""
    if len(raw) < 4:
        raise ApduParseError(f"command APDU of {len(raw)} octets is shorter than its header")
    cla, ins, p1, p2 = raw[:4]
    if len(raw) == 4:
        return Apdu(cla, ins, p1, p2)
    if len(raw) == 5:
        return Apdu(cla, ins, p1, p2, le=raw[4] or 256)
    lc = raw[4]
    if lc == 0:
        raise ApduParseError("extended-length APDUs are not supported")
    if len(raw) == 5 + lc:
        return Apdu(cla, ins, p1, p2, raw[5:])
    if len(raw) == 6 + lc:
        return Apdu(cla, ins, p1, p2, raw[5:-1], raw[-1] or 256)
    raise ApduParseError(f"Lc {lc} does not match a command APDU of {len(raw)} octets")


def cla_for_channel(cla: int, channel: int) -> int:
    """CLA with logical channel bits: 0..3 in b2b1 (``0x``), 4..19 as ``4x`` (kept for ``8x``/``Cx``)."""
    if not 0 <= channel <= 19:
        raise ValueError("logical channels are 0..19")
    coded = channel if channel < 4 else 0x40 | (channel - 4)
    return (cla & 0x80) | coded


def channel_of(cla: int) -> int:
    """The logical channel a CLA byte addresses."""
    return 4 + (cla & 0x0F) if cla & 0x40 else cla & 0x03


#: Instructions a card answers the same way however often they come, so a command whose answer the
#: modem lost may be sent again: SELECT, READ BINARY, STATUS, and UPDATE BINARY (the same bytes at
#: the same offset). Not GET RESPONSE (it consumes the pending answer), MANAGE CHANNEL (each open
#: takes a new channel), VERIFY (each wrong PIN counts), AUTHENTICATE (each run spends a sequence
#: number), nor UPDATE RECORD.
_IDEMPOTENT_INS = frozenset({0xA4, 0xB0, 0xF2, 0xD6})
INS_READ_RECORD = 0xB2
_RECORD_ABSOLUTE = 0x04


def idempotent(apdu: Apdu) -> bool:
    """True when sending ``apdu`` twice leaves the card as sending it once (a lost answer may be re-asked).

    READ RECORD only in absolute mode: its next/previous modes move the record pointer.
    """
    if apdu.ins == INS_READ_RECORD:
        return apdu.p2 & 0x07 == _RECORD_ABSOLUTE
    return apdu.ins in _IDEMPOTENT_INS


# --- responses and status words ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """A response APDU: data and status word."""

    data: bytes
    sw: int

    @property
    def ok(self) -> bool:
        return self.sw == SW_OK

    def __repr__(self) -> str:  # answers can carry key material: show only the shape
        return f"Response(len={len(self.data)}, sw={self.sw:04X})"


def parse_response(raw: bytes) -> Response:
    if len(raw) < 2:
        raise ApduParseError(f"response APDU of {len(raw)} octets has no status word")
    return Response(raw[:-2], int.from_bytes(raw[-2:], "big"))


_SW_EXACT: dict[int, str] = {
    0x9000: "normal ending",
    0x6200: "warning: no information given, state unchanged",
    0x6281: "warning: part of returned data may be corrupted",
    0x6282: "warning: end of file or record reached before reading Le bytes",
    0x6283: "warning: selected file invalidated",
    0x6285: "warning: selected file in termination state",
    0x62F1: "warning: more data available",
    0x62F2: "warning: more data available and proactive command pending",
    0x62F3: "warning: response data available",
    0x6400: "execution error: no information given, state unchanged",
    0x6581: "execution error: memory problem",
    0x6700: "wrong length",
    0x6800: "functions in CLA not supported",
    0x6881: "logical channel not supported",
    0x6882: "secure messaging not supported",
    0x6981: "command incompatible with file structure",
    0x6982: "security status not satisfied",
    0x6983: "authentication/PIN method blocked",
    0x6984: "referenced data invalidated",
    0x6985: "conditions of use not satisfied",
    0x6986: "command not allowed (no EF selected)",
    0x6A80: "incorrect parameters in the data field",
    0x6A81: "function not supported",
    0x6A82: "file or application not found",
    0x6A83: "record not found",
    0x6A84: "not enough memory space",
    0x6A86: "incorrect parameters P1 to P2",
    0x6A87: "Lc inconsistent with P1 to P2",
    0x6A88: "referenced data not found",
    0x6B00: "wrong parameters P1-P2",
    0x6D00: "instruction code not supported or invalid",
    0x6E00: "class not supported",
    0x6F00: "technical problem, no precise diagnosis",
    0x9240: "memory problem",
    0x9850: "increase cannot be performed, maximum value reached",
    0x9862: "authentication error, incorrect MAC",
    0x9863: "security session or association expired",
    0x9864: "authentication error, security context not supported",
    0x9865: "key freshness failure",
    0x9866: "authentication error, no memory space available",
    0x9867: "authentication error, no memory space available in EF_MUK",
}


def sw_meaning(sw: int) -> str:
    """What a status word means (TS 102 221 §10.2, TS 31.102 §7.3), for logs and error texts."""
    if sw in _SW_EXACT:
        return _SW_EXACT[sw]
    sw1, sw2 = sw >> 8, sw & 0xFF
    if sw1 == 0x61:
        return f"{sw2 or 256} response bytes available (GET RESPONSE)"
    if sw1 == 0x9F:
        return f"{sw2 or 256} response bytes available (2G GET RESPONSE)"
    if sw1 == 0x6C:
        return f"wrong Le, exact length is {sw2 or 256}"
    if sw1 == 0x91:
        return f"normal ending, proactive command of {sw2} bytes pending"
    if sw1 == 0x92 and sw2 < 0x10:
        return f"normal ending after {sw2} internal retries"
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return f"verification failed, {sw2 & 0x0F} retries left"
    return "unknown status word"


# --- BER-TLV --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tlv:
    tag: int
    value: bytes


def _tag(data: bytes, offset: int) -> tuple[int, int]:
    first = data[offset]
    tag, offset = first, offset + 1
    if first & 0x1F == 0x1F:  # multi-byte tag: continue while b8 is set, at most 3 octets in all
        for _ in range(2):
            if offset >= len(data):
                raise ApduParseError("BER-TLV tag truncated")
            byte = data[offset]
            tag, offset = (tag << 8) | byte, offset + 1
            if not byte & 0x80:
                return tag, offset
        raise ApduParseError("BER-TLV tag longer than 3 octets")
    return tag, offset


def _length(data: bytes, offset: int) -> tuple[int, int]:
    if offset >= len(data):
        raise ApduParseError("BER-TLV length missing")
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    if not 1 <= count <= 3:
        raise ApduParseError(f"BER-TLV length form {first:02X} not supported")
    if offset + 1 + count > len(data):
        raise ApduParseError("BER-TLV length truncated")
    return int.from_bytes(data[offset + 1 : offset + 1 + count], "big"), offset + 1 + count


def parse_tlvs(data: bytes) -> list[Tlv]:
    """Parse consecutive BER-TLV objects. Trailing ``FF``/``00`` padding (records, EFs) ends the list."""
    out: list[Tlv] = []
    offset = 0
    while offset < len(data):
        if data[offset] in (0x00, 0xFF):
            if any(b not in (0x00, 0xFF) for b in data[offset:]):
                raise ApduParseError("BER-TLV padding followed by data")
            break
        tag, offset = _tag(data, offset)
        length, offset = _length(data, offset)
        if offset + length > len(data):
            raise ApduParseError(f"BER-TLV value of tag {tag:X} truncated ({length} > {len(data) - offset})")
        out.append(Tlv(tag, data[offset : offset + length]))
        offset += length
    return out


def find_tlv(tlvs: list[Tlv], tag: int) -> bytes | None:
    """The value of the first object with ``tag``."""
    return next((t.value for t in tlvs if t.tag == tag), None)


# --- T=0 procedure ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Transmit this APDU next and feed its raw answer to :meth:`T0Exchange.receive`."""

    apdu: Apdu


@dataclass(frozen=True, slots=True)
class Done:
    """The exchange is over: the whole response."""

    response: Response


class T0Exchange:
    """One command and its GET RESPONSE / wrong-Le follow-ups, as a small state machine.

    ``61xx`` (and 2G ``9Fxx``) -> GET RESPONSE with Le = xx on the command's channel, data chained;
    ``6Cxx`` -> the last command once more with Le = xx, unless ``may_resend`` is False (AUTHENTICATE:
    resending could consume a second sequence number, so the ``6Cxx`` is handed back instead).
    """

    def __init__(self, command: Apdu, *, may_resend: bool = True, max_get_response: int = MAX_GET_RESPONSE) -> None:
        self._command = command
        self._last = command
        self._may_resend = may_resend
        self._max_get_response = max_get_response
        self._get_responses = 0
        self._resent = False
        self._data = b""
        self._done = False

    def start(self) -> Apdu:
        return self._command

    @property
    def get_responses(self) -> int:
        """GET RESPONSE commands issued so far."""
        return self._get_responses

    def receive(self, raw: bytes) -> Send | Done:
        """Feed the raw answer (data + SW) to the last APDU sent."""
        if self._done:
            raise RuntimeError("T=0 exchange already finished")
        response = parse_response(raw)
        sw1, sw2 = response.sw >> 8, response.sw & 0xFF
        if sw1 in (0x61, 0x9F):
            self._data += response.data
            if self._get_responses >= self._max_get_response:
                raise GetResponseLoop(f"GET RESPONSE after {self._get_responses} rounds", response.sw)
            self._get_responses += 1
            self._last = Apdu(cla_for_channel(0x00, self._command.channel), INS_GET_RESPONSE, 0, 0, le=sw2 or 256)
            return Send(self._last)
        if sw1 == 0x6C and self._may_resend and not self._resent:
            self._resent = True
            self._last = self._last.with_le(sw2 or 256)
            return Send(self._last)
        self._done = True
        return Done(Response(self._data + response.data, response.sw))
