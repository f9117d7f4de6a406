"""The NAF's PSK lookup for aiocoap's DTLS server: psk_identity -> B-TID -> Zn -> Ks_(ext)_NAF.

tinydtls asks for the PSK *synchronously*, in the middle of processing the ClientKeyExchange, on the
event loop's thread. A Zn round trip cannot happen there without stalling every other peer, and it
cannot happen at all when the BSF is served by the same event loop (in-process tests, the demo):
the loop would wait for itself. Measured on loopback (aiocoap 0.4.17, a shared 2-core box): a blocking Zn
request from inside the lookup took 70-100 ms per new B-TID and timed out every time with an
in-process BSF, while fetching *before* tinydtls sees the identity costs about 4 ms and works with
any BSF. So the lookup here answers from the cache only (:meth:`GbaPskCredentials.find_dtls_psk`),
and :mod:`mn_secd.naf.gate` holds a ClientKeyExchange with an unseen identity until
:meth:`GbaPskCredentials.fetch` has asked Zn, then lets tinydtls continue with the key in the cache.
An unknown or expired B-TID leaves the cache empty, so the lookup fails and so does the handshake
(tinydtls sends a fatal alert at once), which tells the MN to bootstrap again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiocoap.credentials import CredentialsMap

from mn_secd.dtls import MAX_PSK_LENGTH
from mn_secd.errors import BtidUnknown, MnSecdError, NafError
from mn_secd.logs import btid_hash
from mn_secd.naf.cache import NafKeyCache
from mn_secd.naf.zn import ZnAnswer, ZnClient
from mn_secd.psk_identity import IdentityForm, PskIdentity, decode_psk_identity, dtls_psk
from mn_secd.ua import UaId, naf_id, normalise_fqdn

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class NafClaim:
    """Who an authenticated DTLS peer is: the claim aiocoap records for the session.

    ``impi`` is the private identity the BSF vouched for over Zn (None if the BSF's policy withholds
    it); resources log it and may authorise by it. ``expires`` is the key's expiry: a session must
    not outlive it.
    """

    btid: str
    impi: str | None
    naf_id: bytes
    expires: datetime
    form: IdentityForm

    @property
    def btid_hash(self) -> str:
        return btid_hash(self.btid)


class GbaPskCredentials(CredentialsMap):  # type: ignore[misc]
    """aiocoap server credentials resolving GBA psk_identities through a key cache filled over Zn.

    ``naf_fqdn`` and ``ua`` make this NAF's NAF_Id (by default FQDN ‖ ``01 00 01 C0 A8``, oneM2M's
    DTLS suite). Every psk_identity form of :mod:`mn_secd.psk_identity` is accepted, with the
    32-octet NAF key as PSK. ``max_psk_length`` is what the DTLS stack can hold (64 octets for our
    patched tinydtls); a key it cannot hold is refused here rather than handed to C.
    ``max_fetches`` bounds concurrent Zn requests, so a flood of made-up identities cannot turn the
    NAF into a load generator for the BSF.
    """

    def __init__(
        self,
        zn: ZnClient,
        naf_fqdn: str,
        *,
        ua: UaId | None = None,
        cache: NafKeyCache | None = None,
        max_psk_length: int = MAX_PSK_LENGTH,
        max_fetches: int = 64,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        super().__init__()
        self.zn = zn
        self.naf_fqdn = normalise_fqdn(naf_fqdn)
        self.ua = ua if ua is not None else UaId.dtls_psk()
        self.naf_id = naf_id(self.naf_fqdn, self.ua)
        self.cache = cache if cache is not None else NafKeyCache()
        self.max_psk_length = max_psk_length
        self.max_fetches = max_fetches
        self._clock = clock
        self._inflight: dict[str, asyncio.Future[ZnAnswer]] = {}
        #: Zn requests made (not counting those answered by joining one already in flight).
        self.zn_requests = 0

    def __bool__(self) -> bool:
        # aiocoap substitutes a fresh map for a falsy one (``server_credentials or CredentialsMap()``),
        # and this map holds no static entries.
        return True

    # --- the synchronous side: called by tinydtls during the handshake ---------------------------------

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, NafClaim]:
        """(PSK, claim) for a psk_identity from the cache; KeyError (the only error allowed) otherwise."""
        decoded = self._decode(identity)
        if decoded is None:
            raise KeyError(identity)
        answer = self.cache.get(decoded.btid, self.naf_id, self._clock())
        if answer is None:
            raise KeyError(identity)
        psk = dtls_psk(answer.key)
        if len(psk) > self.max_psk_length:
            log.warning(
                "refusing a %s psk_identity: its %d-octet PSK does not fit the DTLS stack (%d)",
                decoded.form,
                len(psk),
                self.max_psk_length,
                extra={"event": "naf.psk-too-long", "btid_hash": btid_hash(decoded.btid)},
            )
            raise KeyError(identity)
        return psk, NafClaim(decoded.btid, answer.impi, self.naf_id, answer.expires, decoded.form)

    # --- the asynchronous side: filling the cache ---------------------------------------------------

    def needs_fetch(self, identity: bytes) -> bool:
        """True if ``identity`` names a B-TID whose key is not in the cache (so Zn must be asked)."""
        decoded = self._decode(identity)
        return decoded is not None and self.cache.get(decoded.btid, self.naf_id, self._clock()) is None

    async def fetch(self, identity: bytes) -> None:
        """Ask Zn for the key of ``identity``'s B-TID and cache it. Never raises: failures are logged
        and leave the cache without the key, so the handshake that follows fails."""
        decoded = self._decode(identity)
        if decoded is None:
            return
        try:
            await self.resolve(decoded.btid)
        except BtidUnknown as exc:
            log.info(
                "refusing a B-TID the BSF does not vouch for: %s",
                exc,
                extra={"event": "naf.btid-refused", "btid_hash": btid_hash(decoded.btid)},
            )
        except MnSecdError as exc:
            log.warning(
                "Zn key retrieval failed: %s",
                exc,
                extra={"event": "naf.zn-failed", "kind": exc.kind, "btid_hash": btid_hash(decoded.btid)},
            )

    async def resolve(self, btid: str) -> ZnAnswer:
        """The live key for ``btid`` at this NAF: from the cache, or from Zn (one request per B-TID at a time)."""
        cached = self.cache.get(btid, self.naf_id, self._clock())
        if cached is not None:
            return cached
        pending = self._inflight.get(btid)
        if pending is None:
            if len(self._inflight) >= self.max_fetches:
                raise NafError(f"too many Zn requests in flight ({self.max_fetches}); refusing another")
            pending = asyncio.ensure_future(self._retrieve(btid))
            self._inflight[btid] = pending
            pending.add_done_callback(lambda done: self._settled(btid, done))
        # Shielded: a caller that gives up must not cancel the request others are waiting for.
        return await asyncio.shield(pending)

    def _settled(self, btid: str, done: asyncio.Future[ZnAnswer]) -> None:
        self._inflight.pop(btid, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a request nobody awaits any more is not reported as lost

    async def _retrieve(self, btid: str) -> ZnAnswer:
        self.zn_requests += 1
        answer = await self.zn.retrieve(btid, self.naf_fqdn, self.ua)
        if not self.cache.put(answer, self._clock()):
            raise BtidUnknown("the BSF's key for this B-TID has already expired")
        return answer

    def _decode(self, identity: bytes) -> PskIdentity | None:
        try:
            return decode_psk_identity(identity)
        except ValueError:
            return None
