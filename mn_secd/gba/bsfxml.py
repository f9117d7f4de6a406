"""The BSF's 200 OK body, ``application/vnd.3gpp.bsf+xml`` (TS 24.109 Annex C): B-TID and lifetime.

Parsing runs expat directly, with every DTD construct refused before it can take effect, and feeds
an :class:`xml.etree.ElementTree.TreeBuilder`. The stock ``ElementTree.fromstring`` would expand
internal entities declared in a DTD, so a hostile BSF could make the daemon build a gigabyte of
text from a kilobyte of input; here a ``<!DOCTYPE`` alone is enough to reject the answer.

The document is read namespace-aware (root ``{uri:3gpp-gba}BootstrappingInfo`` with ``btid`` and
``lifetime``) and extra elements are ignored, so later releases that add elements still parse.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import NamedTuple, NoReturn
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat
from xml.sax.saxutils import escape

from mn_secd.errors import BsfAnswerInvalid

NAMESPACE = "uri:3gpp-gba"
CONTENT_TYPE = "application/vnd.3gpp.bsf+xml"
#: The real document is ~250 octets; anything much larger is not a bootstrapping answer.
MAX_BODY = 16 * 1024
MAX_BTID = 1024

_ROOT = f"{{{NAMESPACE}}}BootstrappingInfo"
_BTID = f"{{{NAMESPACE}}}btid"
_LIFETIME = f"{{{NAMESPACE}}}lifetime"
_DATETIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$", re.ASCII)


class BootstrappingInfo(NamedTuple):
    btid: str
    lifetime: datetime  # timezone-aware, UTC


def _qname(expat_name: str) -> str:
    """expat reports ``uri localname`` (our separator is a space); ElementTree wants ``{uri}localname``."""
    uri, sep, local = expat_name.rpartition(" ")
    return f"{{{uri}}}{local}" if sep else local


def _refuse_dtd(*_args: object) -> NoReturn:
    raise BsfAnswerInvalid("the BSF answer contains a DTD or entity declaration; refused")


def _parse_xml(body: bytes) -> Element:
    builder = TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.UnparsedEntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd
    parser.StartElementHandler = lambda name, attrs: builder.start(
        _qname(name), {_qname(k): v for k, v in attrs.items()}
    )
    parser.EndElementHandler = lambda name: builder.end(_qname(name))
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise BsfAnswerInvalid(f"the BSF answer is not well-formed XML ({expat.ErrorString(exc.code)})") from exc
    return builder.close()


def _only_child(root: Element, tag: str) -> str:
    found = root.findall(tag)
    if len(found) != 1:
        raise BsfAnswerInvalid(f"the BSF answer has {len(found)} <{tag.rpartition('}')[2]}> elements, not 1")
    if len(found[0]):
        raise BsfAnswerInvalid(f"<{tag.rpartition('}')[2]}> must hold text only")
    return (found[0].text or "").strip()


def _check_btid(value: str) -> str:
    local, at, realm = value.rpartition("@")
    if not (at and local and realm and len(value) <= MAX_BTID):
        raise BsfAnswerInvalid("the B-TID is not of the form <id>@<BSF name>")
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise BsfAnswerInvalid("the B-TID holds characters outside printable ASCII")
    return value


def parse_lifetime(text: str) -> datetime:
    """An xs:dateTime as a timezone-aware UTC datetime.

    A value without a zone is read as UTC, which is what TS 24.109 says the BSF sends; fractions
    beyond microseconds are cut.
    """
    m = _DATETIME.match(text.strip())
    if m is None:
        raise BsfAnswerInvalid("the lifetime is not an xs:dateTime")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction = (m.group(7) or "0")[:6].ljust(6, "0")
    zone = m.group(8)
    if zone in (None, "Z"):
        tz = UTC
    else:
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        offset = timedelta(hours=hours, minutes=minutes)
        if offset > timedelta(hours=14) or minutes >= 60:
            raise BsfAnswerInvalid("the lifetime has an impossible zone offset")
        tz = timezone(-offset if zone[0] == "-" else offset)
    try:
        value = datetime(year, month, day, hour, minute, second, int(fraction), tzinfo=tz)
        return value.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise BsfAnswerInvalid("the lifetime is not a valid date and time") from exc


def format_lifetime(when: datetime) -> str:
    """xs:dateTime / RFC 3339 in UTC with a ``Z``, whole seconds (the form BSFs send)."""
    if when.tzinfo is None:
        raise ValueError("the lifetime must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_bootstrapping_info(body: bytes, *, now: datetime | None = None) -> BootstrappingInfo:
    """B-TID and lifetime from the BSF's 200 OK body; :class:`BsfAnswerInvalid` for anything else.

    With ``now``, a lifetime that is not after ``now`` is rejected too: a key that is born expired
    must not be stored.
    """
    if len(body) > MAX_BODY:
        raise BsfAnswerInvalid(f"the BSF answer is {len(body)} octets, more than {MAX_BODY}")
    root = _parse_xml(body)
    if root.tag != _ROOT:
        raise BsfAnswerInvalid(f"the BSF answer's root element is {root.tag!r}, not {_ROOT!r}")
    btid = _check_btid(_only_child(root, _BTID))
    lifetime = parse_lifetime(_only_child(root, _LIFETIME))
    if now is not None and lifetime <= now:
        raise BsfAnswerInvalid(f"the key lifetime {format_lifetime(lifetime)} is already past")
    return BootstrappingInfo(btid, lifetime)


def build_bootstrapping_info(btid: str, lifetime: datetime) -> bytes:
    """The BSF's body, laid out like the TS 24.109 example (the bytes ``rspauth`` is computed over)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<BootstrappingInfo xmlns="{NAMESPACE}">\n'
        f"  <btid>{escape(btid)}</btid>\n"
        f"  <lifetime>{format_lifetime(lifetime)}</lifetime>\n"
        "</BootstrappingInfo>\n"
    ).encode()
