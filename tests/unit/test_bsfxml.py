"""The BSF's bootstrapping-info body: namespace-aware, tolerant of extensions, closed to DTD tricks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from mn_secd.errors import BsfAnswerInvalid
from mn_secd.gba import bsfxml

BTID = "I1U8vpY3qJ0hiuZNrke/NQ==@bsf.mnc001.mcc001.pub.3gppnetwork.org"


def _doc(inner: str, root: str = '<BootstrappingInfo xmlns="uri:3gpp-gba">') -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{root}{inner}</{root[1:].split()[0].rstrip(">")}>'.encode()


def test_vector_body(gba_vectors: dict[str, dict[str, Any]]) -> None:
    info = bsfxml.parse_bootstrapping_info(gba_vectors["ub-http-digest-akav1-md5"]["bsf_200_body_utf8"].encode())
    assert info.btid == BTID
    assert info.lifetime == datetime(2030, 1, 1, tzinfo=UTC)
    assert info.lifetime.tzinfo is UTC
    btid, lifetime = info  # the contract's tuple form
    assert (btid, lifetime) == (info.btid, info.lifetime)


def test_prefixed_namespace_extra_elements_and_attributes() -> None:
    body = (
        b'<g:BootstrappingInfo xmlns:g="uri:3gpp-gba" xmlns:x="urn:example" x:a="1">'
        b"<x:ext><g:btid>not-this@one</g:btid></x:ext>"
        b"<g:lifetime>\n 2031-02-03T04:05:06.123456789+02:30 </g:lifetime>"
        b"<g:future-element>ok</g:future-element><!-- comment --><?pi data?>"
        b"<g:btid> a@b </g:btid></g:BootstrappingInfo>"
    )
    info = bsfxml.parse_bootstrapping_info(body)
    assert info.btid == "a@b"
    assert info.lifetime == datetime(2031, 2, 3, 1, 35, 6, 123456, tzinfo=UTC)


def test_lifetime_without_zone_is_utc_and_negative_offsets() -> None:
    assert bsfxml.parse_lifetime("2030-01-01T00:00:00") == datetime(2030, 1, 1, tzinfo=UTC)
    assert bsfxml.parse_lifetime("2030-01-01T00:00:00-05:00") == datetime(2030, 1, 1, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml",
        b"<BootstrappingInfo xmlns='uri:3gpp-gba'><btid>a@b</btid>",  # truncated
        _doc("<btid>a@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>", "<BootstrappingInfo>"),  # no namespace
        _doc("<btid>a@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>", '<Other xmlns="uri:3gpp-gba">'),
        _doc("<lifetime>2030-01-01T00:00:00Z</lifetime>"),  # no btid
        _doc("<btid>a@b</btid>"),  # no lifetime
        _doc("<btid>a@b</btid><btid>c@d</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime><lifetime>2031-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>nobtid</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>a b@c</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>a@b<x/></btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>é@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>tomorrow</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>2030-02-30T00:00:00Z</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>2030-01-01T24:00:00Z</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>2030-01-01T00:00:00+15:00</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>9999-12-31T23:59:59-01:00</lifetime>"),
        _doc("<btid>a@b</btid><lifetime>2030-01-01</lifetime>"),
        b"<BootstrappingInfo xmlns='uri:3gpp-gba'><btid>a@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>"
        b"</BootstrappingInfo><again/>",
        b"x" * (bsfxml.MAX_BODY + 1),
    ],
)
def test_rejected_bodies(body: bytes) -> None:
    with pytest.raises(BsfAnswerInvalid):
        bsfxml.parse_bootstrapping_info(body)


@pytest.mark.parametrize(
    "body",
    [
        # billion laughs: must be refused at the DOCTYPE, before any expansion
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(
            b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10)
        )
        + b']><BootstrappingInfo xmlns="uri:3gpp-gba"><btid>&lol9;@b</btid>'
        b"<lifetime>2030-01-01T00:00:00Z</lifetime></BootstrappingInfo>",
        # external entity
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<BootstrappingInfo xmlns="uri:3gpp-gba"><btid>&x;@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>'
        b"</BootstrappingInfo>",
        # a bare DOCTYPE with an external DTD
        b'<!DOCTYPE BootstrappingInfo SYSTEM "http://evil.example/x.dtd"><BootstrappingInfo xmlns="uri:3gpp-gba">'
        b"<btid>a@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime></BootstrappingInfo>",
        # an undeclared entity
        b'<BootstrappingInfo xmlns="uri:3gpp-gba"><btid>&x;@b</btid><lifetime>2030-01-01T00:00:00Z</lifetime>'
        b"</BootstrappingInfo>",
    ],
)
def test_dtds_and_entities_refused(body: bytes) -> None:
    with pytest.raises(BsfAnswerInvalid):
        bsfxml.parse_bootstrapping_info(body)


def test_predefined_entities_still_work() -> None:
    body = bsfxml.build_bootstrapping_info("a&b<c>@bsf", datetime(2030, 1, 1, tzinfo=UTC))
    assert b"a&amp;b&lt;c&gt;@bsf" in body
    assert bsfxml.parse_bootstrapping_info(body).btid == "a&b<c>@bsf"


def test_lifetime_in_the_past_rejected_with_now() -> None:
    body = bsfxml.build_bootstrapping_info(BTID, datetime(2030, 1, 1, tzinfo=UTC))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(BsfAnswerInvalid):
        bsfxml.parse_bootstrapping_info(body, now=now)
    assert bsfxml.parse_bootstrapping_info(body, now=now - timedelta(seconds=1)).btid == BTID


def test_build_round_trip_converts_to_utc() -> None:
    when = datetime(2030, 6, 1, 12, 0, 0, 999, tzinfo=timezone(timedelta(hours=2)))
    body = bsfxml.build_bootstrapping_info(BTID, when)
    assert b"<lifetime>2030-06-01T10:00:00Z</lifetime>" in body
    assert bsfxml.parse_bootstrapping_info(body) == (BTID, datetime(2030, 6, 1, 10, tzinfo=UTC))
    with pytest.raises(ValueError):
        bsfxml.build_bootstrapping_info(BTID, datetime(2030, 1, 1))


def test_other_encodings_declared_in_prolog() -> None:
    text = '<?xml version="1.0" encoding="UTF-16"?><BootstrappingInfo xmlns="uri:3gpp-gba"><btid>a@b</btid>'
    text += "<lifetime>2030-01-01T00:00:00Z</lifetime></BootstrappingInfo>"
    assert bsfxml.parse_bootstrapping_info(text.encode("utf-16")).btid == "a@b"
