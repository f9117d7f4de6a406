"""MN side of the MN-IN security association: CoAP over DTLS-PSK to a NAF with a GBA key.

An AE on the Middle Node asks the daemon for the key of a NAF (B-TID, Ks_(ext)_NAF), then talks
``coaps://`` to the NAF with psk_identity = the bare B-TID and PSK = the whole 32-octet key, as
oneM2M TS-0003 has it (our patched tinydtls carries both, see :mod:`mn_secd.psk_identity`).

When the NAF refuses the handshake, the usual reason is that it no longer accepts the B-TID (the
BSF forgot it or it expired), which TS 33.222 resolves by bootstrapping again. The association does
that by itself, once per request: it asks the daemon for the current key and, if that is still the
one the NAF refused, for a forced re-bootstrap, then retries on a fresh DTLS session. A second
refusal is reported, so a NAF that will never take our keys (a key for another NAF_Id, say) costs
one bootstrap per request at most, and the daemon rate-limits those.

Failures are fast and typed. The NAF answers an unknown identity with a fatal alert at once, but
tinydtls drops a handshake with a wrong key silently, and aiocoap would only give up after its
CoAP retransmissions (about 90 s); every exchange here is bounded by ``timeout`` instead. A NAF
that sent its ServerHello and then nothing within it did not take our key
(:class:`~mn_secd.errors.NafHandshakeFailed`, which re-keys once); a NAF that never answered the
handshake at all, or only its cookie exchange, is not there or busy (:class:`~mn_secd.errors.NafError`,
no re-key: a new key would not help); no answer on an established session is
:class:`~mn_secd.errors.NafTimeout` (the session is dropped, so the next request handshakes anew).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiocoap
import aiocoap.error
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.transports.tinydtls import FatalDTLSError
from aiocoap.util import hostportjoin

from mn_secd import dtls
from mn_secd.errors import NafError, NafHandshakeFailed, NafRejected, NafTimeout
from mn_secd.logs import btid_hash
from mn_secd.psk_identity import IdentityForm, dtls_psk, encode_psk_identity
from mn_secd.ua import normalise_fqdn

log = logging.getLogger(__name__)

#: The form this client presents: the bare B-TID (KpsaID = B-TID in TS-0003).
IDENTITY_FORM = IdentityForm.BTID


class NafKeyAnswer(Protocol):
    """What the association needs of the daemon's key answer."""

    @property
    def btid(self) -> str: ...

    @property
    def key(self) -> bytes: ...


class KeySource(Protocol):
    """The daemon's key service as an AE sees it (:class:`mn_secd.client.keys.KeyServiceClient`)."""

    async def get_key(self, naf_fqdn: str, ua: str = "dtls-psk", force: bool = False) -> NafKeyAnswer: ...


@dataclass(frozen=True, slots=True)
class _Session:
    """One aiocoap client context bound to one (B-TID, key)."""

    context: aiocoap.Context
    btid: str
    identity: bytes


class NafAssociation:
    """CoAP requests to one NAF over GBA-keyed DTLS, re-keying once per request when refused.

    ``naf_fqdn`` names the NAF for the key (NAF_Id); ``host`` and ``port`` are where it listens
    (default: the FQDN itself, port 5684). ``ua`` is the Ua security protocol id the daemon derives
    the key for; it must match the NAF's (oneM2M's DTLS suite by default).
    """

    def __init__(
        self,
        keys: KeySource,
        naf_fqdn: str,
        *,
        host: str | None = None,
        port: int = 5684,
        ua: str = "dtls-psk",
        timeout: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the request timeout must be positive")
        self.keys = keys
        self.naf_fqdn = normalise_fqdn(naf_fqdn)
        self.host = host if host is not None else self.naf_fqdn
        self.port = port
        self.ua = ua
        self.timeout = timeout
        self._session: _Session | None = None
        #: Forced re-bootstraps this association asked the daemon for.
        self.forced_bootstraps = 0
        #: Handshakes the NAF refused (each followed by at most one re-key).
        self.refusals = 0

    @property
    def base_uri(self) -> str:
        return "coaps://" + str(hostportjoin(self.host, self.port))

    @property
    def btid(self) -> str | None:
        """The B-TID of the current session, if one was opened."""
        return self._session.btid if self._session is not None else None

    async def request(
        self,
        code: aiocoap.Code,
        path: Sequence[str],
        payload: bytes = b"",
        *,
        content_format: int | None = None,
    ) -> aiocoap.Message:
        """Send one request and return the NAF's response (any code but 4.01, which means re-key).

        Raises NafHandshakeFailed (refused twice, the second time after a fresh key), NafTimeout,
        NafError (the NAF is unreachable), or what the daemon's key service raises.
        """
        refused_btid: str | None = None
        while True:
            session = await self._ensure_session(refused_btid)
            try:
                response = await self._exchange(session, code, path, payload, content_format)
            except NafHandshakeFailed:
                if refused_btid is not None:
                    raise
                refused_btid = session.btid
            else:
                if response.code != aiocoap.UNAUTHORIZED:
                    return response
                if refused_btid is not None:
                    raise NafHandshakeFailed("the NAF refused the fresh key too (4.01 Unauthorized)")
                refused_btid = session.btid
            self.refusals += 1
            log.info(
                "the NAF refused our B-TID; fetching a fresh key",
                extra={"event": "association.refused", "naf_fqdn": self.naf_fqdn, "btid_hash": btid_hash(refused_btid)},
            )
            await self._drop_session()

    async def close(self) -> None:
        await self._drop_session()

    async def __aenter__(self) -> NafAssociation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals ---------------------------------------------------------------------------------

    async def _ensure_session(self, refused_btid: str | None) -> _Session:
        if self._session is not None:
            return self._session
        answer = await self.keys.get_key(self.naf_fqdn, self.ua)
        if refused_btid is not None and answer.btid == refused_btid:
            # The daemon still holds the key the NAF refused: only a new bootstrap can help.
            self.forced_bootstraps += 1
            answer = await self.keys.get_key(self.naf_fqdn, self.ua, force=True)
        self._session = await self._open(answer)
        return self._session

    async def _open(self, answer: NafKeyAnswer) -> _Session:
        identity = encode_psk_identity(answer.btid, IDENTITY_FORM)
        psk = dtls.check_psk(dtls_psk(answer.key))
        if len(identity) > dtls.MAX_IDENTITY_LENGTH:
            raise NafError(f"this B-TID is {len(identity)} octets, more than our tinydtls carries")
        context = await dtls.create_dtls_client_context()
        context.client_credentials.load_from_dict(
            {self.base_uri + "/*": {"dtls": {"psk": psk, "client-identity": identity}}}
        )
        return _Session(context, answer.btid, identity)

    async def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.context.shutdown()

    async def _exchange(
        self,
        session: _Session,
        code: aiocoap.Code,
        path: Sequence[str],
        payload: bytes,
        content_format: int | None,
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=code, payload=payload, uri=self.base_uri)
        message.opt.uri_path = tuple(path)
        if content_format is not None:
            message.opt.content_format = content_format
        try:
            async with asyncio.timeout(self.timeout):
                response: aiocoap.Message = await session.context.request(message).response
        except TimeoutError:
            progress = dtls.client_handshake_progress(session.context, self.host, self.port, session.identity)
            await self._drop_session()  # whatever went wrong, the next attempt starts a fresh session
            if progress is dtls.HandshakeProgress.CONNECTED:
                raise NafTimeout(f"no answer from the NAF within {self.timeout:g} s") from None
            if progress is dtls.HandshakeProgress.SERVER_HELLO:
                raise NafHandshakeFailed(
                    f"no DTLS handshake with the NAF within {self.timeout:g} s: it holds another key for"
                    " this B-TID (e.g. one derived for another NAF_Id)"
                ) from None
            heard = "only its cookie exchange" if progress is dtls.HandshakeProgress.COOKIE else "nothing"
            raise NafError(
                f"no DTLS handshake with the NAF at {self.base_uri} within {self.timeout:g} s, {heard} came back:"
                " it is not there, or too busy"
            ) from None
        except aiocoap.error.NetworkError as exc:
            await self._drop_session()
            if isinstance(exc.__cause__, FatalDTLSError):
                raise NafHandshakeFailed(f"the NAF refused the DTLS handshake (alert {exc.__cause__})") from exc
            raise NafError(f"cannot reach the NAF at {self.base_uri}: {exc}") from exc
        return response


# --- oneM2M-flavoured helpers for the reference IN-CSE ---------------------------------------------


@dataclass(frozen=True, slots=True)
class AeRegistration:
    ae_id: str
    created: bool  # False: the IN-CSE already had this AE (registered by the same subscriber)


def _json(response: aiocoap.Message, root: str) -> dict[str, Any]:
    try:
        doc = json.loads(response.payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NafRejected(str(response.code), "the answer is not JSON") from None
    inner = doc.get(root) if isinstance(doc, dict) else None
    if not isinstance(inner, dict):
        raise NafRejected(str(response.code), f"the answer has no {root}")
    return inner


def _check(response: aiocoap.Message, *expected: aiocoap.Code) -> None:
    if response.code not in expected:
        detail = response.payload.decode("utf-8", "replace")[:200] if response.payload else ""
        raise NafRejected(str(response.code), detail)


async def register_ae(association: NafAssociation, name: str, app_id: str = "Nmn-secd") -> AeRegistration:
    """Register an AE at the IN-CSE (``POST /cse``); returns its AE-ID."""
    body = json.dumps({"m2m:ae": {"rn": name, "api": app_id}}).encode()
    response = await association.request(aiocoap.POST, ("cse",), body, content_format=ContentFormat.JSON)
    _check(response, aiocoap.CREATED, aiocoap.CHANGED)
    ae_id = _json(response, "m2m:ae").get("aei")
    if not isinstance(ae_id, str):
        raise NafRejected(str(response.code), "the answer names no AE-ID")
    return AeRegistration(ae_id, response.code == aiocoap.CREATED)


async def post_data(association: NafAssociation, ae_id: str, content: str) -> str:
    """Store a content instance under the AE (``POST /cse/AE-ID/data``); returns its resource id."""
    body = json.dumps({"m2m:cin": {"con": content}}).encode()
    response = await association.request(aiocoap.POST, ("cse", ae_id, "data"), body, content_format=ContentFormat.JSON)
    _check(response, aiocoap.CREATED)
    ri = _json(response, "m2m:cin").get("ri")
    if not isinstance(ri, str):
        raise NafRejected(str(response.code), "the answer names no resource id")
    return ri


async def latest_data(association: NafAssociation, ae_id: str) -> str:
    """The content of the AE's latest content instance (``GET /cse/AE-ID/data``)."""
    response = await association.request(aiocoap.GET, ("cse", ae_id, "data"))
    _check(response, aiocoap.CONTENT)
    con = _json(response, "m2m:cin").get("con")
    if not isinstance(con, str):
        raise NafRejected(str(response.code), "the answer has no content")
    return con
