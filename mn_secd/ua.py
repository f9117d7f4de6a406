"""NAF_Id and typed Ua security protocol identifiers (TS 33.220 Annex H).

A NAF key is bound to the NAF's FQDN *and* to the protocol the key will be used with on Ua, so the
identifier is part of every key request, cache entry and Zn lookup. Both ends must build the same
bytes, which is why the FQDN is normalised here and nowhere else.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from mn_secd.errors import InvalidNafId, UnsupportedUaProtocol

#: Organisation octets (TS 33.220 H.2): none, 3GPP, 3GPP2, OMA, GSMA, local/experimental.
KNOWN_ORGANISATIONS = frozenset({0x00, 0x01, 0x02, 0x03, 0x04, 0xFF})
ORG_3GPP = 0x01

#: IANA code points of the PSK cipher suites that matter for oneM2M and TS 33.222.
CIPHER_SUITES: dict[str, int] = {
    "TLS_PSK_WITH_AES_128_CBC_SHA256": 0x00AE,
    "TLS_PSK_WITH_AES_128_GCM_SHA256": 0x00A8,
    "TLS_PSK_WITH_AES_128_CCM": 0xC0A4,
    "TLS_PSK_WITH_AES_128_CCM_8": 0xC0A8,
}

_HEX10 = re.compile(r"^[0-9A-Fa-f]{10}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class UaId:
    """A 5-byte Ua security protocol identifier: 1 organisation octet and 4 protocol octets."""

    organisation: int
    protocol: int

    def __post_init__(self) -> None:
        if self.organisation not in KNOWN_ORGANISATIONS:
            raise UnsupportedUaProtocol(f"unknown Ua organisation octet {self.organisation:#04x}")
        if not 0 <= self.protocol <= 0xFFFFFFFF:
            raise UnsupportedUaProtocol("Ua protocol id must fit in 4 octets")

    @classmethod
    def from_bytes(cls, raw: bytes) -> UaId:
        if len(raw) != 5:
            raise UnsupportedUaProtocol(f"a Ua id is 5 octets, got {len(raw)}")
        return cls(raw[0], int.from_bytes(raw[1:], "big"))

    @classmethod
    def http_digest(cls) -> UaId:
        """HTTP digest authentication per TS 24.109 (``01 00 00 00 02``)."""
        return cls(ORG_3GPP, 0x00000002)

    @classmethod
    def tls(cls, suite: int) -> UaId:
        """Shared-key TLS/DTLS per TS 33.222 5.4 with the negotiated cipher suite (``01 00 01 yy zz``)."""
        if not 0 <= suite <= 0xFFFF:
            raise UnsupportedUaProtocol("a TLS cipher suite is 2 octets")
        return cls(ORG_3GPP, 0x00010000 | suite)

    @classmethod
    def dtls_psk(cls) -> UaId:
        """oneM2M's mandatory DTLS suite TLS_PSK_WITH_AES_128_CCM_8 (``01 00 01 C0 A8``)."""
        return cls.tls(CIPHER_SUITES["TLS_PSK_WITH_AES_128_CCM_8"])

    @classmethod
    def parse(cls, text: str) -> UaId:
        """Parse 10 hex digits or a named form.

        Named forms: ``http-digest``; ``dtls-psk`` (TLS_PSK_WITH_AES_128_CCM_8); ``tls-psk``
        (TLS_PSK_WITH_AES_128_CBC_SHA256, oneM2M's mandatory TLS suite); ``tls:<suite>`` where the
        suite is 4 hex digits or an IANA name from :data:`CIPHER_SUITES`.
        """
        value = text.strip()
        if _HEX10.match(value):
            return cls.from_bytes(bytes.fromhex(value))
        lowered = value.lower()
        if lowered == "http-digest":
            return cls.http_digest()
        if lowered == "dtls-psk":
            return cls.dtls_psk()
        if lowered == "tls-psk":
            return cls.tls(CIPHER_SUITES["TLS_PSK_WITH_AES_128_CBC_SHA256"])
        if lowered.startswith("tls:"):
            suite = value[4:].strip()
            if suite.upper() in CIPHER_SUITES:
                return cls.tls(CIPHER_SUITES[suite.upper()])
            if re.fullmatch(r"(0x)?[0-9A-Fa-f]{4}", suite):
                return cls.tls(int(suite, 16))
            raise UnsupportedUaProtocol(f"unknown TLS cipher suite {suite!r}")
        raise UnsupportedUaProtocol(f"not a Ua security protocol id: {text!r}")

    def to_bytes(self) -> bytes:
        return bytes([self.organisation]) + self.protocol.to_bytes(4, "big")

    @property
    def hex(self) -> str:
        """Lowercase hex, the form TS 29.309 uses for ``uaSecProtId``."""
        return self.to_bytes().hex()

    def __str__(self) -> str:
        return self.hex


#: Names and NAF_Ids remembered by the two functions below: every key request normalises its
#: NAF's name several times (request, ACL, cache), and a daemon serves a handful of NAFs. A failure
#: is not remembered, and the bound keeps a peer sending many names from growing it.
_CACHED_NAMES = 256


@functools.lru_cache(maxsize=_CACHED_NAMES)
def normalise_fqdn(fqdn: str) -> str:
    """The NAF FQDN exactly as it goes into NAF_Id: lowercase, no trailing dot, no port.

    Raises :class:`InvalidNafId` for anything that is not a DNS host name, so an AE cannot make the
    daemon derive keys for strings that no NAF could ever present.
    """
    name = fqdn.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InvalidNafId(f"not a valid host name: {fqdn!r}") from exc
    if not name or len(name) > 253:
        raise InvalidNafId(f"not a valid host name: {fqdn!r}")
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise InvalidNafId(f"not a valid host name: {fqdn!r}")
    return name


@functools.lru_cache(maxsize=_CACHED_NAMES)
def naf_id(fqdn: str, ua: UaId) -> bytes:
    """NAF_Id = FQDN (UTF-8) ‖ Ua security protocol id, with no separator (TS 33.220 H.1)."""
    return normalise_fqdn(fqdn).encode("ascii") + ua.to_bytes()
