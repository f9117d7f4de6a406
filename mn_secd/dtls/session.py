"""The remote aiocoap sees for a DTLS peer: one completed handshake, and the claim it proved.

Upstream's DTLS server gives aiocoap one remote per source *address*, records the PSK identity once
per address and raises ("DTLS stack tried accessing different keys") when a second handshake from
the same address and port presents another one: that client is locked out, and for an authorising
server worse, aiocoap's message-ID deduplication would replay a response made for the previous
identity to the new one. Here every completed handshake is a new :class:`Session` carrying the
claim its own PSK lookup returned, and a late response for a session that ended is dropped instead
of being sent to whoever now holds that address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Protocol

from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.numbers import constants

log = logging.getLogger(__name__)


class SessionEnded(coap_error.LibraryShutdown):  # type: ignore[misc]
    """Raised into pending exchanges of a DTLS session that ended (peer closed, evicted, replaced)."""


class Carrier(Protocol):
    """What a session needs of the server holding it (:class:`mn_secd.dtls.table.PeerTable`)."""

    @property
    def hostinfo_local(self) -> str: ...

    def send_to(self, key: Hashable, message: bytes) -> None: ...

    def hold(self, key: Hashable) -> None: ...

    def release(self, key: Hashable) -> None: ...


class Session(interfaces.EndpointAddress):  # type: ignore[misc]
    """One completed DTLS handshake of one peer.

    Equality is identity, so aiocoap's deduplication, block-wise and observation state never spans
    two handshakes, even from the same address and port.
    """

    is_multicast = False
    is_multicast_locally = False
    scheme = "coaps"
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP

    def __init__(self, carrier: Carrier, key: Hashable, hostinfo: str, claim: object) -> None:
        self._carrier = carrier
        self._key: Hashable | None = key
        self._hostinfo = hostinfo
        self._repr = f"<mn_secd.dtls.Session {hostinfo}>"  # aiocoap names a task after it per request
        #: What the credentials map returned for the identity that completed the handshake.
        self.claim = claim

    @property
    def active(self) -> bool:
        return self._key is not None

    def end(self) -> None:
        """The session is over: nothing more is sent for it."""
        self._key = None

    def belongs_to(self, carrier: object) -> bool:
        return self._carrier is carrier

    @property
    def hostinfo(self) -> str:
        return self._hostinfo

    @property
    def hostinfo_local(self) -> str:
        return self._carrier.hostinfo_local

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> list[object]:
        return [self.claim]

    @property
    def blockwise_key(self) -> Session:
        return self

    def send(self, message: bytes) -> None:
        key = self._key
        if key is None:
            log.debug("dropping a message for an ended DTLS session", extra={"event": "dtls.late-send"})
            return
        self._carrier.send_to(key, message)

    def hold(self) -> Callable[[], None]:
        """Keep this session from ending for idleness (while it has an observation, say); returns the release."""
        key = self._key
        if key is None:
            return _nothing
        self._carrier.hold(key)
        released = False

        def release() -> None:
            nonlocal released
            if not released and self._key == key:  # the key may belong to a newer session by now
                self._carrier.release(key)
            released = True

        return release

    def __repr__(self) -> str:
        return self._repr


def _nothing() -> None:
    pass


def authenticated_claim(remote: object) -> object | None:
    """The claim a request's remote was authenticated with, or None if it did not come over DTLS.

    Only our :class:`Session` objects carry one, and only for a completed handshake: this is the
    single source of an AE's (or, on the NAF, a UE's) identity.
    """
    return remote.claim if isinstance(remote, Session) else None


def hold_session(remote: object) -> Callable[[], None]:
    """Keep a request's DTLS session from ending for idleness; returns the release (a no-op elsewhere)."""
    return remote.hold() if isinstance(remote, Session) else _nothing


def claim_label(claim: object) -> str:
    """How a peer is named in logs: an AE identity, or a B-TID's hash, never a key or a whole B-TID."""
    if isinstance(claim, str):
        return f"AE {claim!r}"
    btid_hash = getattr(claim, "btid_hash", None)
    return f"peer btid_hash={btid_hash}" if isinstance(btid_hash, str) else "an unnamed peer"
