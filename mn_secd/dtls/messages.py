"""Message deduplication for the DTLS server, bounded per session and dropped with it.

RFC 7252 4.5 asks a server to answer a retransmitted Confirmable request with the response it
already sent, for EXCHANGE_LIFETIME (247 s). aiocoap keeps every request's response Message (with
the request attached) and an event-loop timer per message for that long, whatever the sender: at a
few KiB each, an authenticated AE sending a thousand requests a second would hold hundreds of MiB,
and the NAF keys in those answers would outlive a wipe for minutes. Here a session keeps the
encoded responses of its last :data:`PER_SESSION` messages (expired lazily, no timers), and all of
them go when the session ends. A duplicate older than that is processed again, which is harmless
for the key service (GET and FETCH are safe, forced bootstraps are rate-limited).

The encoded responses are kept in ``bytearray`` buffers that are zeroed when they go, and the owner
of the server can drop them all at once (:meth:`SessionMessageManager.forget_answers`): the key
service does so when keys are wiped, so that no answer carrying a NAF key outlives the wipe. A
duplicate of a message whose answer was dropped is processed again, as above.

A Confirmable request whose answer is not ready within EMPTY_ACK_DELAY gets an empty ACK first
(RFC 7252 5.2.2). aiocoap set an event-loop timer per request for that, and cancelled it for nearly
every one; here one timer serves them all, set for the earliest deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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
        self._by_remote: dict[R, OrderedDict[int, tuple[float, bytearray | None]]] = {}

    def __len__(self) -> int:
        return sum(len(messages) for messages in self._by_remote.values())

    def seen(self, remote: R, mid: int, now: float) -> tuple[bool, bytes | None]:
        """(True, the answer if any) for a duplicate; otherwise records the message and returns (False, None)."""
        messages = self._by_remote.get(remote)
        if messages is None:  # (setdefault would make a new OrderedDict for every message)
            messages = self._by_remote[remote] = OrderedDict()
        while messages and now - next(iter(messages.values()))[0] >= self.lifetime:
            _zero(messages.popitem(last=False)[1][1])
        known = messages.get(mid)
        if known is not None:
            return True, None if known[1] is None else bytes(known[1])
        while len(messages) >= self.per_remote:
            _zero(messages.popitem(last=False)[1][1])
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
            _zero(known[1])
            messages[mid] = (known[0], bytearray(response))

    def forget(self, remote: R) -> None:
        for _, response in self._by_remote.pop(remote, {}).values():
            _zero(response)

    def forget_answers(self) -> int:
        """Zero and drop every stored answer, of every remote; returns how many there were.

        The messages they answered are forgotten with them, so a late duplicate is processed again
        rather than ignored.
        """
        dropped = 0
        for messages in self._by_remote.values():
            for mid in [mid for mid, (_, response) in messages.items() if response is not None]:
                _zero(messages.pop(mid)[1])
                dropped += 1
        return dropped


def _zero(buffer: bytearray | None) -> None:
    if buffer is not None:
        buffer[:] = bytes(len(buffer))
        buffer.clear()


class _AckDue:
    """What a piggyback opportunity holds in place of aiocoap's timer: ``cancel()`` is all it needs."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SessionMessageManager(MessageManager):  # type: ignore[misc]
    """aiocoap's MessageManager with :class:`RecentMessages` in place of its unbounded store, and one
    timer for the empty ACKs of every pending Confirmable request instead of one per request."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, token_manager: Any) -> None:
        super().__init__(token_manager)
        self._recent = RecentMessages[Any]()
        #: A response to a request and its datagram, from aiocoap asking to keep it for duplicates
        #: to the transport sending it (one right after the other): it is encoded only once.
        self._wire: tuple[Any, bytes] | None = None
        #: (deadline, sequence, (remote, token), due) of each Confirmable request not answered yet,
        #: earliest first; the timer is set for the first of them.
        self._acks_due: list[tuple[float, int, tuple[Any, bytes], _AckDue]] = []
        self._ack_sequence = itertools.count()
        self._ack_timer: asyncio.TimerHandle | None = None

    def _process_request(self, request: Any) -> None:
        """Upstream's, with the empty-ACK deadline in :attr:`_acks_due` rather than a timer of its own.

        RFC 7252 5.2.2: a response that is not ready within EMPTY_ACK_DELAY is preceded by an empty
        ACK, so the client stops retransmitting; a response in time rides on the ACK. aiocoap set
        (and, nearly always, cancelled) an event-loop timer per request for that.
        """
        if request.mtype is CON:
            key = (request.remote, request.token)
            previous = self._piggyback_opportunities.pop(key, None)
            if previous is not None:
                self.log.warning(
                    "New request came in while old request not ACKed yet. Possible mismatch between"
                    " EMPTY_ACK_DELAY and EXCHANGE_LIFETIME. Cancelling ACK to ward off any further confusion."
                )
                previous[1].cancel()
            due = _AckDue()
            self._piggyback_opportunities[key] = (request.mid, due)
            deadline = self.loop.time() + request.transport_tuning.EMPTY_ACK_DELAY
            heapq.heappush(self._acks_due, (deadline, next(self._ack_sequence), key, due))
            if self._ack_timer is None or deadline < self._ack_timer.when():
                self._arm_ack_timer()
        self.token_manager.process_request(request)

    def _arm_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._ack_timer = self.loop.call_at(self._acks_due[0][0], self._send_acks_due) if self._acks_due else None

    def _send_acks_due(self) -> None:
        """An empty ACK for each request whose deadline passed unanswered (upstream's on_timeout)."""
        self._ack_timer = None
        now = self.loop.time()
        while self._acks_due and (self._acks_due[0][0] <= now or self._acks_due[0][3].cancelled):
            _, _, key, due = heapq.heappop(self._acks_due)
            opportunity = self._piggyback_opportunities.get(key)
            if due.cancelled or opportunity is None or opportunity[1] is not due:
                continue
            del self._piggyback_opportunities[key]
            self._send_empty_ack(key[0], opportunity[0], "Response took too long to prepare")
        self._arm_ack_timer()

    async def shutdown(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        await super().shutdown()

    def _deduplicate_message(self, message: Any) -> bool:
        duplicate, answer = self._recent.seen(message.remote, message.mid, self.clock())
        if duplicate and message.mtype is CON and answer is not None:
            message.remote.send(answer)  # the same datagram again (RFC 7252 4.5)
        return duplicate

    def _store_response_for_duplicates(self, message: Any) -> None:
        # aiocoap calls this right before handing the message to the transport, which calls
        # transmit(): the datagram is kept there, once it is on its way.
        self._wire = None
        if self._recent.knows(message.remote, message.mid):  # a response to a request (piggybacked)
            self._wire = (message, message.encode())

    def transmit(self, message: Any, send: Callable[[bytes], None]) -> None:
        """Encode ``message`` (once) and ``send`` it; a response to a request is then kept for its
        duplicates (after sending, so that keeping it adds nothing to the answer's latency)."""
        wire, self._wire = self._wire, None
        if wire is None or wire[0] is not message:
            send(bytes(message.encode()))
            return
        send(wire[1])
        self._recent.answer(message.remote, message.mid, wire[1])

    def forget(self, remote: Any) -> None:
        """The session ended: no duplicate can come from it any more."""
        self._recent.forget(remote)

    def forget_answers(self) -> int:
        """Drop (zeroed) every stored response of every session; returns how many there were."""
        return self._recent.forget_answers()
