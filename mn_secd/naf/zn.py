"""Zn: the NAF asks the BSF for the key of a B-TID (TS 29.309 Nbsp_GBA over HTTP/JSON).

``POST {bsf}/nbsp-gba/v1/bootstrapping-info-retrieval`` with the B-TID and the NAF_Id (FQDN and
Ua security protocol id); the BSF answers with Ks_(ext)_NAF, its expiry and the IMPI it vouches
for. Every way this can go wrong maps to one typed error, because the NAF's reaction differs:
an unknown or expired B-TID (:class:`BtidUnknown`) is the UE's problem and fails its handshake,
while an unreachable or misbehaving BSF (:class:`BsfUnreachable`, :class:`ZnRejected`,
:class:`ZnAnswerInvalid`) is the operator's.

The NAF is GBA_U-unaware here (``gbaUAware`` false): it uses the ME key, which is what an MN that
runs DTLS outside the UICC holds.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from mn_secd.errors import BsfUnreachable, BtidUnknown, ZnAnswerInvalid, ZnRejected
from mn_secd.logs import btid_hash
from mn_secd.ua import UaId, naf_id, normalise_fqdn

log = logging.getLogger(__name__)

ZN_PATH = "/nbsp-gba/v1/bootstrapping-info-retrieval"
_KEY_HEX = re.compile(r"^[0-9A-Fa-f]{64}$")


@dataclass(frozen=True, slots=True)
class ZnAnswer:
    """What the BSF vouches for about one B-TID at one NAF."""

    btid: str
    naf_id: bytes
    key: bytes = field(repr=False)  # Ks_NAF (GBA_ME) or Ks_ext_NAF (GBA_U), 32 octets
    expires: datetime  # timezone-aware
    impi: str | None
    gba_type: str | None


class ZnClient:
    """An async Zn client for one BSF.

    ``timeout`` bounds each whole exchange (connect, send, answer): a NAF holds a DTLS handshake
    open while it waits, so a slow BSF must fail fast rather than stall the peer.
    """

    def __init__(self, bsf_url: str, *, timeout: float = 2.0) -> None:
        if timeout <= 0:
            raise ValueError("the Zn timeout must be positive")
        self.bsf_url = bsf_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout)

    async def retrieve(self, btid: str, naf_fqdn: str, ua: UaId) -> ZnAnswer:
        """The NAF key for (B-TID, NAF_Id); raises BtidUnknown, ZnRejected, ZnAnswerInvalid, BsfUnreachable."""
        fqdn = normalise_fqdn(naf_fqdn)
        body = {"btId": btid, "nafId": {"nafFqdn": fqdn, "uaSecProtId": ua.hex}, "gbaUAware": False}
        tag = btid_hash(btid)
        try:
            response = await self._http.post(self.bsf_url + ZN_PATH, json=body)
        except httpx.TimeoutException as exc:
            raise BsfUnreachable(f"Zn to {self.bsf_url}: no answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise BsfUnreachable(f"Zn to {self.bsf_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            log.info("B-TID unknown at the BSF", extra={"event": "zn.btid-unknown", "btid_hash": tag})
            raise BtidUnknown(f"the BSF does not know the B-TID ({_problem_detail(response)})")
        if response.status_code != 200:
            raise ZnRejected(response.status_code, _problem_detail(response))
        answer = _parse_answer(response.content, btid, naf_id(fqdn, ua))
        log.debug("Zn key retrieved", extra={"event": "zn.key", "btid_hash": tag, "naf_fqdn": fqdn})
        return answer

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ZnClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _problem_detail(response: httpx.Response) -> str:
    """A short reason from a TS 29.571 ProblemDetails body, or the HTTP reason phrase."""
    try:
        doc = json.loads(response.content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if isinstance(doc, dict):
        parts = [str(doc[k]) for k in ("detail", "cause") if isinstance(doc.get(k), str)]
        if parts:
            return "; ".join(parts)[:200]
    return response.reason_phrase or "no reason given"


def _parse_answer(content: bytes, btid: str, nid: bytes) -> ZnAnswer:
    try:
        doc: Any = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ZnAnswerInvalid("the Zn answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ZnAnswerInvalid("the Zn answer is not a JSON object")
    material = doc.get("meKeyMaterial")
    if not isinstance(material, str) or not _KEY_HEX.fullmatch(material):
        raise ZnAnswerInvalid("meKeyMaterial must be 64 hex digits")
    expires = _timestamp(doc.get("keyExpiryTime"), "keyExpiryTime")
    impi = doc.get("impi")
    gba_type = doc.get("gbaType")
    if impi is not None and not isinstance(impi, str):
        raise ZnAnswerInvalid("impi must be a string")
    if gba_type is not None and not isinstance(gba_type, str):
        raise ZnAnswerInvalid("gbaType must be a string")
    return ZnAnswer(btid, nid, bytes.fromhex(material), expires, impi, gba_type)


def _timestamp(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise ZnAnswerInvalid(f"{name} is missing")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ZnAnswerInvalid(f"{name} is not an RFC 3339 date-time") from None
    if when.tzinfo is None:
        raise ZnAnswerInvalid(f"{name} has no time zone")
    return when.astimezone(UTC)
