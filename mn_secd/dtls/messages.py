"""Message deduplication for the DTLS server, bounded per session and dropped with it.

RFC 7252 4.5 asks a server to answer a retransmitted Confirmable request with the response it
already sent, for EXCHANGE_LIFETIME (247 s). aiocoap keeps every request's response Message (with
the request attached) and an event-loop timer per message for that long, whatever the sender: at a
few KiB each, an authenticated AE sending a thousand requests a second would hold hundreds of MiB,
and the NAF keys in those answers would outlive a wipe for minutes. Here a session keeps the
encoded responses of its last :data:`PER_SESSION` messages (expired lazily, no timers), and all of
them go when the session ends. A duplicate older than that is processed again, which is harmless
for the key service (GET and FETCH are safe, forced bootstraps are rate-limited).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.types import CON

R = TypeVar("R", bound=Hashable)

#: Messages remembered per session (an AE has a handful of exchanges in flight).
PER_SESSION = 32
#: RFC 7252 4.8.2 with the default transmission parameters.
EXCHANGE_LIFETIME = 247.0


class RecentMessages(Generic[R]):
    """Which message IDs a remote sent lately, and the encoded answer to each (a sans-IO store)."""

    def __init__(self, *, lifetime: float = EXCHANGE_LIFETIME, per_remote: int = PER_SESSION) -> None:
        self.lifetime = lifetime
        self.per_remote = per_remote
        self._by_remote: dict[R, OrderedDict[int, tuple[float, bytes | None]]] = {}

    def __len__(self) -> int:
        return sum(len(messages) for messages in self._by_remote.values())

    def seen(self, remote: R, mid: int, now: float) -> tuple[bool, bytes | None]:
        """(True, the answer if any) for a duplicate; otherwise records the message and returns (False, None)."""
        messages = self._by_remote.setdefault(remote, OrderedDict())
        while messages and now - next(iter(messages.values()))[0] >= self.lifetime:
            messages.popitem(last=False)
        known = messages.get(mid)
        if known is not None:
            return True, known[1]
        while len(messages) >= self.per_remote:
            messages.popitem(last=False)
        messages[mid] = (now, None)
        return False, None

    def knows(self, remote: R, mid: int) -> bool:
        messages = self._by_remote.get(remote)
        return messages is not None and mid in messages

    def answer(self, remote: R, mid: int, response: bytes) -> None:
        """Keep the response to a message :meth:`seen` recorded (nothing if it is no longer known)."""
        messages = self._by_remote.get(remote)
        known = messages.get(mid) if messages is not None else None
        if messages is not None and known is not None:
            messages[mid] = (known[0], response)

    def forget(self, remote: R) -> None:
        self._by_remote.pop(remote, None)


class SessionMessageManager(MessageManager):  # type: ignore[misc]
    """aiocoap's MessageManager with :class:`RecentMessages` in place of its unbounded store."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, token_manager: Any) -> None:
        super().__init__(token_manager)
        self._recent = RecentMessages[Any]()

    def _deduplicate_message(self, message: Any) -> bool:
        duplicate, answer = self._recent.seen(message.remote, message.mid, self.clock())
        if duplicate and message.mtype is CON and answer is not None:
            message.remote.send(answer)  # the same datagram again (RFC 7252 4.5)
        return duplicate

    def _store_response_for_duplicates(self, message: Any) -> None:
        if self._recent.knows(message.remote, message.mid):  # a response to a request (piggybacked)
            self._recent.answer(message.remote, message.mid, message.encode())

    def forget(self, remote: Any) -> None:
        """The session ended: no duplicate can come from it any more."""
        self._recent.forget(remote)
