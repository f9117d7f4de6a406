"""mn_secd.control.payloads: the wire format and the error-to-CoAP-code mapping."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
from datetime import UTC, datetime, timedelta, timezone

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import given
from hypothesis import strategies as st

import mn_secd
from mn_secd import errors
from mn_secd.control import payloads
from mn_secd.control.payloads import (
    CBOR,
    JSON,
    KeyRequest,
    answer_format,
    decode_key_answer,
    decode_key_request,
    decode_status,
    encode_key_answer,
    encode_key_request,
    encode_status,
    error_answer,
    error_from_answer,
    key_request_from_query,
    mask_impi,
)
from mn_secd.errors import Culprit, MnSecdError, NotAcceptable, RequestError, UnsupportedContentFormat
from mn_secd.naf_keys import GbaMode, KeyServiceStatus, NafKey
from mn_secd.ua import UaId, naf_id

EXPIRES = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
KEY = NafKey(
    naf_fqdn="in-cse.example.net",
    ua_id=UaId.dtls_psk(),
    naf_id=naf_id("in-cse.example.net", UaId.dtls_psk()),
    btid="AbCd==@bsf.mnc001.mcc001.pub.3gppnetwork.org",
    key=bytes(range(32)),
    expires=EXPIRES,
    gba_mode=GbaMode.GBA_U,
)


def test_key_request_cbor_defaults() -> None:
    request = decode_key_request(cbor2.dumps({"naf": "IN-CSE.Example.net."}), None)
    assert request == KeyRequest("in-cse.example.net", UaId.dtls_psk(), False)


@pytest.mark.parametrize("ua", ["010001c0a8", "dtls-psk", "tls:C0A8", bytes.fromhex("010001c0a8")])
def test_key_request_ua_forms(ua: str | bytes) -> None:
    request = decode_key_request(cbor2.dumps({"naf": "a.example", "ua": ua, "force": True}), CBOR)
    assert request.ua == UaId.dtls_psk() and request.force


def test_key_request_json_and_round_trip() -> None:
    request = KeyRequest("in-cse.example.net", UaId.http_digest(), True)
    for fmt in (CBOR, JSON):
        assert decode_key_request(encode_key_request(request, fmt), fmt) == request
    assert decode_key_request(b'{"naf": "x.example"}', JSON).naf_fqdn == "x.example"


@pytest.mark.parametrize(
    ("payload", "fmt", "error", "match"),
    [
        (b"", CBOR, RequestError, "empty"),
        (b"\xff\x00", CBOR, RequestError, "not valid CBOR"),
        (cbor2.dumps(["naf"]), CBOR, RequestError, "must be a map"),
        (cbor2.dumps({}), CBOR, RequestError, '"naf"'),
        (cbor2.dumps({"naf": 3}), CBOR, RequestError, '"naf"'),
        (cbor2.dumps({"naf": "a.b", "extra": 1}), CBOR, RequestError, "unknown field"),
        (cbor2.dumps({"naf": "a.b", "force": "yes"}), CBOR, RequestError, "force"),
        (cbor2.dumps({"naf": "a.b", "ua": 7}), CBOR, RequestError, "ua"),
        (cbor2.dumps({"naf": "a.b", "ua": "nonsense"}), CBOR, errors.UnsupportedUaProtocol, "Ua"),
        (cbor2.dumps({"naf": "not a host"}), CBOR, errors.InvalidNafId, "host name"),
        (b"{", JSON, RequestError, "not valid JSON"),
        (b"\xff", JSON, RequestError, "not valid JSON"),
        (b'{"naf": "a.b"}', 0, UnsupportedContentFormat, "content format 0"),
        (b"x" * 600, CBOR, RequestError, "larger than"),
    ],
)
def test_bad_key_requests(payload: bytes, fmt: int, error: type[MnSecdError], match: str) -> None:
    with pytest.raises(error, match=match):
        decode_key_request(payload, fmt)


def test_key_request_from_query() -> None:
    assert key_request_from_query(["naf=In-Cse.example.net"]) == KeyRequest("in-cse.example.net", UaId.dtls_psk())
    assert key_request_from_query(["naf=a.example", "ua=0100000002", "force"]) == KeyRequest(
        "a.example", UaId.http_digest(), True
    )
    assert not key_request_from_query(["naf=a.example", "force=false"]).force
    for query, match in [
        ([], "naf="),
        (["naf="], "naf="),
        (["naf=a.b", "naf=c.d"], "twice"),
        (["naf=a.b", "who=me"], "unknown"),
        (["naf=a.b", "force=maybe"], "force"),
    ]:
        with pytest.raises(RequestError, match=match):
            key_request_from_query(query)


def test_answer_format() -> None:
    assert answer_format(None) == CBOR
    assert answer_format(CBOR) == CBOR
    assert answer_format(JSON) == JSON
    with pytest.raises(NotAcceptable):
        answer_format(0)


def test_key_answer_cbor() -> None:
    raw = cbor2.loads(encode_key_answer(KEY, CBOR))
    assert raw["key"] == bytes(range(32)) and raw["naf_id"] == KEY.naf_id
    assert raw["ua_id"] == "010001c0a8" and raw["gba_mode"] == "gba-u"
    assert raw["expires"] == EXPIRES
    assert decode_key_answer(encode_key_answer(KEY, CBOR), CBOR) == KEY


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))]),
    )
)
def test_cbor_dates_are_the_bytes_cbor2_makes_of_a_datetime(expires: datetime) -> None:
    """Tag 0 with RFC 3339 text, written without handing cbor2 a datetime (see payloads._encode)."""
    key = dataclasses.replace(KEY, expires=expires)
    fields = {
        "naf_fqdn": key.naf_fqdn,
        "ua_id": key.ua_id.hex,
        "naf_id": key.naf_id,
        "btid": key.btid,
        "key": key.key,
        "expires": expires.astimezone(UTC),
        "gba_mode": key.gba_mode.value,
    }
    assert encode_key_answer(key, CBOR) == cbor2.dumps(fields)
    assert decode_key_answer(encode_key_answer(key, CBOR), CBOR).expires == expires


def test_key_answer_json() -> None:
    raw = json.loads(encode_key_answer(KEY, JSON))
    assert raw["key"] == bytes(range(32)).hex()
    assert raw["naf_id"] == KEY.naf_id.hex()
    assert raw["expires"] == "2026-11-28T12:00:00Z"
    assert decode_key_answer(encode_key_answer(KEY, JSON), JSON) == KEY


def test_key_answer_in_another_zone_is_utc() -> None:
    local = dataclasses.replace(KEY, expires=EXPIRES.astimezone(timezone(timedelta(hours=2))))
    assert json.loads(encode_key_answer(local, JSON))["expires"] == "2026-11-28T12:00:00Z"


def test_malformed_key_answer() -> None:
    with pytest.raises(RequestError, match="malformed key answer"):
        decode_key_answer(cbor2.dumps({"naf_fqdn": "x"}), CBOR)


def test_status_masks_the_impi_and_round_trips() -> None:
    status = KeyServiceStatus(
        card_present=True,
        impi="001010123456789@ims.mnc001.mcc001.3gppnetwork.org",
        bootstrapped=True,
        btid="tid@bsf",
        expires=EXPIRES,
        gba_mode=GbaMode.GBA_ME,
        last_error=None,
        warning="accepted without rspauth",
    )
    for fmt in (CBOR, JSON):
        back = decode_status(encode_status(status, fmt), fmt)
        assert back.impi == "001010*********@ims.mnc001.mcc001.3gppnetwork.org"
        assert back.expires == EXPIRES and back.gba_mode is GbaMode.GBA_ME and back.btid == "tid@bsf"
        assert back.warning == "accepted without rspauth"
    empty = KeyServiceStatus(False, None, False, None, None, None, "uicc-absent: no card")
    assert decode_status(encode_status(empty, CBOR), CBOR) == empty
    older = cbor2.loads(encode_status(empty, CBOR))
    del older["warning"]  # a daemon from before the field
    assert decode_status(cbor2.dumps(older), CBOR) == empty


def test_mask_impi_short_user_parts() -> None:
    assert mask_impi("alice@example.org") == "al***@example.org"
    assert mask_impi("x") == "x"
    assert mask_impi(None) is None


# --- errors -----------------------------------------------------------------------------------------


def _taxonomy() -> list[type[MnSecdError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, MnSecdError) and cls.__module__ == errors.__name__
    ]


def test_every_error_class_is_defined_in_errors_py() -> None:
    """The table and :func:`culprit_of` see every error class whatever was imported before."""
    for module in pkgutil.walk_packages(mn_secd.__path__, "mn_secd."):
        if module.name != "mn_secd.__main__":  # that one runs the command line
            importlib.import_module(module.name)
    classes, stray = [MnSecdError], []
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls.__module__.startswith("mn_secd.") and cls.__module__ != errors.__name__:  # tests may add their own
            stray.append(f"{cls.__module__}.{cls.__qualname__}")
    assert stray == []


def test_every_error_family_has_a_deliberate_code() -> None:
    """A class under a listed family inherits its code; a new direct family must be listed."""
    for cls in _taxonomy():
        nearest = next(c for c in cls.__mro__ if c in payloads.ERROR_CODES)
        assert nearest is not MnSecdError or cls is MnSecdError, f"{cls.__name__} needs an entry in ERROR_CODES"


@pytest.mark.parametrize(
    ("exc", "code", "max_age"),
    [
        (errors.NotAuthorised("AE 'ae1' is not authorised for NAF x"), Code.FORBIDDEN, None),
        (RequestError("bad"), Code.BAD_REQUEST, None),
        (errors.InvalidNafId("bad name"), Code.BAD_REQUEST, None),
        (errors.UnsupportedUaProtocol("bad ua"), Code.BAD_REQUEST, None),
        (UnsupportedContentFormat("cf 0"), Code.UNSUPPORTED_CONTENT_FORMAT, None),
        (NotAcceptable("accept 0"), Code.NOT_ACCEPTABLE, None),
        (errors.UiccAbsent("no card"), Code.SERVICE_UNAVAILABLE, 30),
        (errors.BsfUnreachable("connection refused"), Code.SERVICE_UNAVAILABLE, 60),
        (errors.OperationTimeout("slow"), Code.GATEWAY_TIMEOUT, None),
        (errors.ModemTimeout("AT+CSIM"), Code.GATEWAY_TIMEOUT, None),
        (errors.AuthenticateOutcomeUnknown("no answer"), Code.GATEWAY_TIMEOUT, None),
        (errors.BootstrapRateLimited(12.2), Code.TOO_MANY_REQUESTS, 13),
        (errors.BsfRejected(403, "Forbidden"), Code.BAD_GATEWAY, None),
        # a 5xx from the BSF is worth retrying, like no answer at all
        (errors.BsfServerError(500, "Internal Server Error"), Code.SERVICE_UNAVAILABLE, 60),
        (errors.BsfServerError(503, "Service Unavailable"), Code.SERVICE_UNAVAILABLE, 60),
        (errors.ConfigError("f", "k", "p"), Code.INTERNAL_SERVER_ERROR, None),
    ],
)
def test_error_answers(exc: MnSecdError, code: Code, max_age: int | None) -> None:
    answer = error_answer(exc)
    assert (answer.code, answer.max_age) == (code, max_age)
    assert answer.diagnostic.decode().startswith(f"{exc.kind}: ")


def test_unknown_critical_options_are_refused() -> None:
    payloads.check_critical_options([3, 11, 15, 17, 12, 6, 2048, 60])  # understood, or elective
    for number in (1, 5, 9, 35, 2049):
        with pytest.raises(errors.UnsupportedOption, match=f"critical option {number} ") as info:
            payloads.check_critical_options([11, number])
        assert error_answer(info.value).code == Code.BAD_OPTION


def test_diagnostic_is_bounded() -> None:
    answer = error_answer(errors.NotAuthorised("x" * 1000))
    assert len(answer.diagnostic) <= payloads.MAX_DIAGNOSTIC


def test_error_round_trip_to_the_client() -> None:
    answer = error_answer(errors.UiccAbsent("no card in the modem"))
    back = error_from_answer(answer.code, answer.diagnostic, answer.max_age)
    assert isinstance(back, errors.KeyServiceRejected)
    assert (back.kind, back.culprit, back.retry_after) == ("uicc-absent", Culprit.CARD, 30.0)
    assert str(back) == "5.03 Service Unavailable: no card in the modem"
    other = error_from_answer(Code.NOT_FOUND, b"", None)
    assert (other.kind, other.culprit, str(other)) == ("key-service", Culprit.LOCAL, "4.04 Not Found")


# --- fuzzing ----------------------------------------------------------------------------------------

_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=20) | st.floats(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@given(st.binary(max_size=700), st.sampled_from([None, CBOR, JSON, 0, 40, 11542, 65535]))
def test_any_bytes_give_a_4xx_or_a_request(payload: bytes, fmt: int | None) -> None:
    try:
        decode_key_request(payload, fmt)
    except MnSecdError as exc:
        assert error_answer(exc).code.class_ == 4


@given(
    st.dictionaries(st.sampled_from(["naf", "ua", "force", "x"]), _cbor_values, max_size=4),
    st.sampled_from([CBOR, JSON]),
)
def test_any_structure_gives_a_4xx_or_a_request(fields: dict[str, object], fmt: int) -> None:
    try:
        payload = cbor2.dumps(fields) if fmt == CBOR else json.dumps(fields).encode()
    except (ValueError, TypeError):
        return
    try:
        request = decode_key_request(payload, fmt)
    except MnSecdError as exc:
        assert error_answer(exc).code.class_ == 4
    else:
        assert request.naf_fqdn and isinstance(request.force, bool)


@given(st.lists(st.text(max_size=30), max_size=5))
def test_any_query_gives_a_4xx_or_a_request(query: list[str]) -> None:
    try:
        key_request_from_query(query)
    except MnSecdError as exc:
        assert error_answer(exc).code.class_ == 4
