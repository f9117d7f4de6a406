"""mn_secd.dtls.records and .messages: reading record headers, and the bounded deduplication store."""

from __future__ import annotations

from dtls_peer import client_hello

from mn_secd.dtls.messages import RecentMessages
from mn_secd.dtls.records import HandshakeType, handshake_type, is_alert, is_client_hello, plaintext_alert

HEADER = bytes([0, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2])  # type set per case, epoch 0, length 2


def record(content_type: int, *body: int, epoch: int = 0) -> bytes:
    return bytes([content_type]) + HEADER[1:3] + epoch.to_bytes(2, "big") + HEADER[5:] + bytes(body)


def test_handshake_records_of_epoch_0() -> None:
    assert is_client_hello(client_hello())
    assert handshake_type(record(22, HandshakeType.SERVER_HELLO, 0)) == HandshakeType.SERVER_HELLO
    assert handshake_type(record(22, HandshakeType.HELLO_VERIFY_REQUEST, 0)) == HandshakeType.HELLO_VERIFY_REQUEST
    assert handshake_type(record(22, 1, 0, epoch=1)) is None  # encrypted: unreadable
    assert not is_client_hello(record(23, 1, 0)) and not is_client_hello(client_hello()[:13])


def test_alerts() -> None:
    assert plaintext_alert(record(21, 2, 40)) == (2, 40)
    assert plaintext_alert(record(21, 2, 40, epoch=1)) is None and is_alert(record(21, 9, 9, epoch=1))
    assert plaintext_alert(record(21, 2)) is None and not is_alert(record(22, 2, 40))


def test_recent_messages_answer_duplicates_within_their_lifetime() -> None:
    recent = RecentMessages[str](lifetime=10.0, per_remote=4)
    assert recent.seen("ae", 1, 0.0) == (False, None)
    assert recent.seen("ae", 1, 1.0) == (True, None)  # no answer yet
    recent.answer("ae", 1, b"ack")
    assert recent.seen("ae", 1, 2.0) == (True, b"ack")
    assert recent.seen("other", 1, 2.0) == (False, None)  # per remote
    assert recent.seen("ae", 2, 10.0) == (False, None)  # message 1 expired meanwhile ...
    assert recent.seen("ae", 1, 10.5) == (False, None)  # ... so it counts as new


def test_recent_messages_are_bounded_per_remote_and_forgotten_with_it() -> None:
    recent = RecentMessages[str](lifetime=100.0, per_remote=4)
    for mid in range(1000):
        recent.seen("flooder", mid, 0.0)
        recent.answer("flooder", mid, b"x" * 100)
    assert len(recent) == 4 and recent.knows("flooder", 999) and not recent.knows("flooder", 995)
    recent.answer("flooder", 1, b"late")  # forgotten: nothing is stored
    assert not recent.knows("flooder", 1)
    recent.forget("flooder")
    assert len(recent) == 0


def test_stored_answers_can_all_be_dropped_and_are_zeroed_when_they_go() -> None:
    """The key service drops every stored answer when keys are wiped: no key outlives the wipe there."""
    recent = RecentMessages[str](lifetime=100.0, per_remote=4)
    for remote in ("ae1", "ae2"):
        for mid in (1, 2):
            recent.seen(remote, mid, 0.0)
    recent.seen("ae1", 3, 0.0)  # not answered yet
    recent.answer("ae1", 1, b"key-bearing answer 1")
    recent.answer("ae2", 2, b"key-bearing answer 2")
    buffers = [recent._by_remote["ae1"][1][1], recent._by_remote["ae2"][2][1]]  # the store's own buffers
    assert recent.forget_answers() == 2
    assert all(b is not None and b == bytearray() for b in buffers)  # zeroed and emptied in place
    assert recent.seen("ae1", 1, 1.0) == (False, None)  # its duplicate is processed again
    assert recent.knows("ae1", 3) and recent.knows("ae2", 1)  # unanswered messages stay known
    recent.answer("ae1", 3, b"another")
    kept = recent._by_remote["ae1"][3][1]
    recent.forget("ae1")
    assert kept == bytearray()
