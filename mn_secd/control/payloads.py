"""What goes over the control socket: request and answer codecs, and errors as CoAP codes.

Sans-IO: bytes and content-format numbers in, typed values out, so the server, the client library
and the tests share one definition of the wire format.

Key request (``FETCH``/``POST`` on ``key``; CBOR by default, JSON with Content-Format 50)::

    {"naf": "in-cse.example.net", "ua": "dtls-psk" | "010001c0a8" | h'010001c0a8', "force": false}

``ua`` (default ``dtls-psk``) and ``force`` (default false) are optional; other keys are refused.
``GET key?naf=...&ua=...&force=1`` carries the same in Uri-Query options.

Key answer (CBOR by default, JSON when the request's Accept is 50)::

    {"naf_fqdn": str, "ua_id": "010001c0a8", "naf_id": bytes, "btid": str, "key": bytes,
     "expires": datetime, "gba_mode": "gba-me" | "gba-u"}

In CBOR ``naf_id`` and ``key`` are byte strings and ``expires`` is a tag-0 date/time string; in
JSON the byte strings are lowercase hex and ``expires`` an RFC 3339 string in UTC.

Errors: every :class:`~mn_secd.errors.MnSecdError` maps to one CoAP code in :data:`ERROR_CODES`,
here and nowhere else, with the diagnostic payload ``"<kind>: <message>"`` (UTF-8 text, RFC 7252
5.5.2) and, where waiting helps, a Max-Age as the retry hint.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cbor2
from aiocoap.numbers.codes import Code

from mn_secd import errors
from mn_secd.errors import (
    Culprit,
    MnSecdError,
    NotAcceptable,
    RequestError,
    UnsupportedContentFormat,
    UnsupportedOption,
)
from mn_secd.naf_keys import GbaMode, KeyServiceStatus, NafKey
from mn_secd.ua import UaId, normalise_fqdn

JSON = 50
CBOR = 60
#: Largest request payload accepted; a key request is a few dozen octets.
MAX_REQUEST_SIZE = 512


#: Critical options the key service processes: Uri-Host, Uri-Port, Uri-Path, Uri-Query, Accept,
#: Block2, and Block1 (refused with a reason). Anything else critical (If-Match, OSCORE, Proxy-Uri,
#: unknown numbers) makes a request one the server must not act on.
UNDERSTOOD_CRITICAL = frozenset({3, 7, 11, 15, 17, 23, 27})


def check_critical_options(numbers: Sequence[int]) -> None:
    """Raise :class:`UnsupportedOption` for a critical option not in :data:`UNDERSTOOD_CRITICAL`."""
    for number in numbers:
        if number & 1 and number not in UNDERSTOOD_CRITICAL:
            raise UnsupportedOption(f"critical option {number} is not supported here")


@dataclass(frozen=True, slots=True)
class KeyRequest:
    naf_fqdn: str  # normalised
    ua: UaId
    force: bool = False


# --- key requests --------------------------------------------------------------------------------------


# AEs ask for the same few NAFs over and over: parsing a host name (IDNA, remembered by
# mn_secd.ua itself) and a Ua id is most of the cost of decoding a request, so the results are kept
# (bounded; failures are not cached).
_parse_ua = functools.lru_cache(maxsize=64)(UaId.parse)


def decode_key_request(payload: bytes, content_format: int | None) -> KeyRequest:
    """Parse a FETCH/POST body; raises :class:`RequestError` (or a subclass) on anything malformed."""
    if type(payload) is bytes and len(payload) <= MAX_REQUEST_SIZE:
        # An AE sends the same body over and over (at most 64 of 512 octets kept; failures are not).
        return _decoded_key_request(payload, None if content_format is None else int(content_format))
    return _decode_key_request(payload, content_format)


@functools.lru_cache(maxsize=64)
def _decoded_key_request(payload: bytes, content_format: int | None) -> KeyRequest:
    return _decode_key_request(payload, content_format)


def _decode_key_request(payload: bytes, content_format: int | None) -> KeyRequest:
    fields = _decode_map(payload, content_format)
    unknown = set(fields) - {"naf", "ua", "force"}
    if unknown:
        raise RequestError(f"unknown field(s) in key request: {', '.join(sorted(map(str, unknown)))}")
    naf = fields.get("naf")
    if not isinstance(naf, str):
        raise RequestError('a key request needs "naf": the NAF FQDN as a string')
    force = fields.get("force", False)
    if not isinstance(force, bool):
        raise RequestError('"force" must be true or false')
    return KeyRequest(normalise_fqdn(naf), _ua(fields.get("ua", "dtls-psk")), force)


def key_request_from_query(query: Sequence[str]) -> KeyRequest:
    """Parse ``naf=...&ua=...&force=1`` (Uri-Query options) of a GET."""
    return _key_request_from_query(tuple(query))


@functools.lru_cache(maxsize=64)  # an AE asks with the same query over and over; failures are not kept
def _key_request_from_query(query: tuple[str, ...]) -> KeyRequest:
    values: dict[str, str] = {}
    for item in query:
        name, sep, value = item.partition("=")
        if name not in ("naf", "ua", "force"):
            raise RequestError(f"unknown query parameter {name!r}")
        if name in values:
            raise RequestError(f"query parameter {name!r} given twice")
        values[name] = value if sep else ("1" if name == "force" else "")
    if not values.get("naf"):
        raise RequestError("a key request needs naf=<NAF FQDN>")
    force_text = values.get("force", "0").lower()
    if force_text not in ("0", "1", "true", "false"):
        raise RequestError("force must be 0, 1, true or false")
    return KeyRequest(normalise_fqdn(values["naf"]), _ua(values.get("ua", "dtls-psk")), force_text in ("1", "true"))


def encode_key_request(request: KeyRequest, content_format: int = CBOR) -> bytes:
    fields = {"naf": request.naf_fqdn, "ua": request.ua.hex, "force": request.force}
    return _encode(fields, content_format)


# --- key answers ---------------------------------------------------------------------------------------


def answer_format(accept: int | None) -> int:
    """The content format of an answer: CBOR unless the request's Accept asks for JSON."""
    if accept is None or int(accept) == CBOR:
        return CBOR
    if int(accept) == JSON:
        return JSON
    raise NotAcceptable(f"answers are CBOR ({CBOR}) or JSON ({JSON}), not content format {int(accept)}")


def encode_key_answer(key: NafKey, content_format: int) -> bytes:
    fields: dict[str, Any] = {
        "naf_fqdn": key.naf_fqdn,
        "ua_id": _ua_text(key.ua_id),
        "naf_id": key.naf_id,
        "btid": key.btid,
        "key": key.key,
        "expires": key.expires,
        "gba_mode": key.gba_mode.value,
    }
    return _encode(fields, content_format)


@functools.lru_cache(maxsize=64)
def _ua_text(ua: UaId) -> str:
    return ua.hex


def decode_key_answer(payload: bytes, content_format: int | None) -> NafKey:
    """The client side of :func:`encode_key_answer`; raises :class:`RequestError` if malformed."""
    fields = _decode_map(payload, content_format)
    binary = content_format in (None, CBOR)
    try:
        return NafKey(
            naf_fqdn=_str(fields, "naf_fqdn"),
            ua_id=UaId.parse(_str(fields, "ua_id")),
            naf_id=_bytes(fields, "naf_id", binary),
            btid=_str(fields, "btid"),
            key=_bytes(fields, "key", binary),
            expires=_datetime(fields, "expires"),
            gba_mode=GbaMode(_str(fields, "gba_mode")),
        )
    except (ValueError, MnSecdError) as exc:
        raise RequestError(f"malformed key answer: {exc}") from None


# --- status -------------------------------------------------------------------------------------------


def mask_impi(impi: str | None) -> str | None:
    """Keep what identifies the network (MCC+MNC, the domain), mask the subscriber part."""
    if impi is None:
        return None
    user, at, domain = impi.partition("@")
    keep = 6 if len(user) > 10 else min(2, len(user))
    return user[:keep] + "*" * (len(user) - keep) + at + domain


def encode_status(status: KeyServiceStatus, content_format: int) -> bytes:
    fields: dict[str, Any] = {
        "card_present": status.card_present,
        "impi": mask_impi(status.impi),
        "bootstrapped": status.bootstrapped,
        "btid": status.btid,
        "expires": None if status.expires is None else status.expires.astimezone(UTC),
        "gba_mode": None if status.gba_mode is None else status.gba_mode.value,
        "last_error": status.last_error,
        "warning": status.warning,
    }
    return _encode(fields, content_format)


def decode_status(payload: bytes, content_format: int | None) -> KeyServiceStatus:
    fields = _decode_map(payload, content_format)
    try:
        mode = fields.get("gba_mode")
        return KeyServiceStatus(
            card_present=bool(fields["card_present"]),
            impi=_optional_str(fields, "impi"),
            bootstrapped=bool(fields["bootstrapped"]),
            btid=_optional_str(fields, "btid"),
            expires=None if fields.get("expires") is None else _datetime(fields, "expires"),
            gba_mode=None if mode is None else GbaMode(mode),
            last_error=_optional_str(fields, "last_error"),
            warning=_optional_str(fields, "warning"),  # absent from daemons that predate it
        )
    except (KeyError, ValueError) as exc:
        raise RequestError(f"malformed status answer: {exc}") from None


# --- errors as CoAP codes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    code: Code
    diagnostic: bytes  # "<kind>: <message>", UTF-8
    max_age: int | None = None  # seconds before a retry is worth it


#: Error class -> (CoAP code, Max-Age retry hint). An error maps through its nearest listed ancestor,
#: so a new class under an existing family inherits that family's code; a new family needs an entry.
ERROR_CODES: dict[type[MnSecdError], tuple[Code, int | None]] = {
    MnSecdError: (Code.INTERNAL_SERVER_ERROR, None),
    errors.ConfigError: (Code.INTERNAL_SERVER_ERROR, None),
    RequestError: (Code.BAD_REQUEST, None),
    UnsupportedContentFormat: (Code.UNSUPPORTED_CONTENT_FORMAT, None),
    NotAcceptable: (Code.NOT_ACCEPTABLE, None),
    UnsupportedOption: (Code.BAD_OPTION, None),
    errors.NotAuthorised: (Code.FORBIDDEN, None),
    errors.InvalidNafId: (Code.BAD_REQUEST, None),
    errors.UnsupportedUaProtocol: (Code.BAD_REQUEST, None),
    errors.BootstrapRateLimited: (Code.TOO_MANY_REQUESTS, None),  # Max-Age from retry_after
    errors.OperationTimeout: (Code.GATEWAY_TIMEOUT, None),
    # the modem and its AT port
    errors.ModemError: (Code.SERVICE_UNAVAILABLE, 10),
    errors.AtParseError: (Code.BAD_GATEWAY, None),
    errors.AtCommandError: (Code.BAD_GATEWAY, None),
    errors.PortGoneError: (Code.SERVICE_UNAVAILABLE, 10),
    # the card
    errors.UiccError: (Code.SERVICE_UNAVAILABLE, 30),
    errors.UiccAbsent: (Code.SERVICE_UNAVAILABLE, 30),
    errors.UiccLocked: (Code.SERVICE_UNAVAILABLE, 300),
    errors.ApplicationNotFound: (Code.SERVICE_UNAVAILABLE, 300),
    errors.TransportUnavailable: (Code.SERVICE_UNAVAILABLE, 300),
    errors.ApduParseError: (Code.BAD_GATEWAY, None),
    errors.CardStatusError: (Code.BAD_GATEWAY, None),
    errors.AuthenticateRefused: (Code.BAD_GATEWAY, None),
    # GBA and the BSF
    errors.GbaError: (Code.BAD_GATEWAY, None),
    errors.GbaModeUnavailable: (Code.SERVICE_UNAVAILABLE, 300),
    # Retryable: the BSF is away or failing for now (no answer, or a 5xx status), and the keystore
    # retries by itself; Max-Age says when asking again is worth it.
    errors.BsfUnreachable: (Code.SERVICE_UNAVAILABLE, 60),
    errors.BsfServerError: (Code.SERVICE_UNAVAILABLE, 60),
    errors.BsfAskedToWait: (Code.SERVICE_UNAVAILABLE, None),  # Max-Age: what is left of the BSF's wait
    # Not retryable by waiting: the BSF refused this subscriber or our answer (4xx), or answered
    # something that must not be accepted; the operator has to look.
    errors.BsfRejected: (Code.BAD_GATEWAY, None),
    errors.BsfAnswerInvalid: (Code.BAD_GATEWAY, None),
    errors.DigestParseError: (Code.BAD_GATEWAY, None),
    errors.NetworkAuthenticationFailure: (Code.BAD_GATEWAY, None),
    # the NAF side and the key service client are never behind this server, but must map somewhere
    errors.NafError: (Code.BAD_GATEWAY, None),
    errors.KeyServiceError: (Code.INTERNAL_SERVER_ERROR, None),
    # the local DTLS stack: failures at start-up, never an answer to a request
    errors.DtlsFixMismatch: (Code.INTERNAL_SERVER_ERROR, None),
    errors.BindError: (Code.INTERNAL_SERVER_ERROR, None),
}

#: The largest Max-Age a CoAP option can carry (RFC 7252 5.10.5: a 32-bit unsigned integer).
MAX_AGE_LIMIT = 2**32 - 1
#: Longest diagnostic payload sent (CoAP diagnostics are meant to be short).
MAX_DIAGNOSTIC = 200


def error_answer(exc: MnSecdError) -> ErrorAnswer:
    """The CoAP answer for an error: its code, ``"<kind>: <message>"`` and the retry hint."""
    code, max_age = next(ERROR_CODES[cls] for cls in type(exc).__mro__ if cls in ERROR_CODES)
    if isinstance(exc, errors.BootstrapRateLimited):
        max_age = max(1, math.ceil(exc.retry_after))
    elif isinstance(exc, errors.BsfAskedToWait):
        max_age = min(MAX_AGE_LIMIT, max(1, math.ceil(exc.remaining)))
    text = f"{exc.kind}: {exc}".encode()
    if len(text) > MAX_DIAGNOSTIC:
        text = text[: MAX_DIAGNOSTIC - 3].decode("utf-8", "ignore").encode() + b"..."
    return ErrorAnswer(code, text, max_age)


def error_from_answer(code: Code, payload: bytes, max_age: int | None) -> errors.KeyServiceRejected:
    """The client side: an error answer back into a typed error (kind and culprit from the server)."""
    text = payload.decode("utf-8", "replace")
    kind, sep, message = text.partition(": ")
    if not sep or not kind or " " in kind:
        kind, message = "key-service", text
    return errors.KeyServiceRejected(
        str(code), kind, message, culprit=culprit_of(kind), retry_after=None if max_age is None else float(max_age)
    )


def culprit_of(kind: str) -> Culprit:
    """Who an error kind points at, from the taxonomy (LOCAL for kinds we do not know)."""
    pending: list[type[MnSecdError]] = [MnSecdError]
    while pending:
        cls = pending.pop()
        if cls.__dict__.get("kind") == kind:
            return cls.culprit
        pending.extend(cls.__subclasses__())
    return Culprit.LOCAL


# --- helpers ------------------------------------------------------------------------------------------


def _decode_map(payload: bytes, content_format: int | None) -> dict[Any, Any]:
    if len(payload) > MAX_REQUEST_SIZE:
        raise RequestError(f"payload larger than {MAX_REQUEST_SIZE} octets")
    if not payload:
        raise RequestError("empty payload")
    if content_format is None or int(content_format) == CBOR:
        try:
            value = cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
            raise RequestError(f"not valid CBOR: {type(exc).__name__}") from None
    elif int(content_format) == JSON:
        try:
            value = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RequestError(f"not valid JSON: {type(exc).__name__}") from None
    else:
        raise UnsupportedContentFormat(
            f"content format {int(content_format)} is not supported; use CBOR ({CBOR}) or JSON ({JSON})"
        )
    if not isinstance(value, dict):
        raise RequestError("the payload must be a map")
    return value


def _encode(fields: dict[str, Any], content_format: int) -> bytes:
    if content_format == CBOR:
        # A date and time as RFC 8949 3.4.1 writes it (tag 0, RFC 3339 text): the bytes cbor2 makes
        # of a datetime, without cbor2 importing, at its first datetime, the modules behind every
        # type it can encode (decimal, uuid, email, fractions: ~0.8 MB that would stay in the daemon).
        expires = fields.get("expires")  # the one date any payload here carries
        if isinstance(expires, datetime):
            fields = {**fields, "expires": cbor2.CBORTag(0, _rfc3339(expires))}
        return bytes(cbor2.dumps(fields))
    if content_format == JSON:
        return json.dumps({k: _jsonable(v) for k, v in fields.items()}, separators=(",", ":")).encode()
    raise NotAcceptable(f"cannot encode content format {content_format}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return _rfc3339(value)
    return value


@functools.lru_cache(maxsize=64)  # a key's expiry is written into every answer that carries it
def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ua(value: Any) -> UaId:
    if isinstance(value, bytes):
        return UaId.from_bytes(value)
    if isinstance(value, str):
        return _parse_ua(value)
    raise RequestError('"ua" must be a Ua id: 10 hex digits, a named form, or 5 octets')


def _str(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} missing or not a string")
    return value


def _optional_str(fields: dict[Any, Any], name: str) -> str | None:
    return None if fields.get(name) is None else _str(fields, name)


def _bytes(fields: dict[Any, Any], name: str, binary: bool) -> bytes:
    value = fields.get(name)
    if binary and isinstance(value, bytes):
        return value
    if not binary and isinstance(value, str):
        return bytes.fromhex(value)
    raise ValueError(f"{name} missing or of the wrong type")


def _datetime(fields: dict[Any, Any], name: str) -> datetime:
    value = fields.get(name)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} missing or not a date with a time zone")
    return value.astimezone(UTC)
