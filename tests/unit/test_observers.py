"""The shared event-callback list: one failing subscriber never silences the others."""

from __future__ import annotations

import logging

import pytest

from mn_secd.observers import Subscribers


def test_failing_subscriber_is_logged_and_others_still_hear(caplog: pytest.LogCaptureFixture) -> None:
    subs = Subscribers[int](logging.getLogger("test.observers"), "test.subscriber_error")
    heard: list[int] = []

    def broken(event: int) -> None:
        raise RuntimeError("boom")

    subs.subscribe(broken)
    unsubscribe = subs.subscribe(heard.append)
    with caplog.at_level(logging.ERROR):
        subs.emit(1)
    assert heard == [1]
    assert [r.__dict__.get("event") for r in caplog.records] == ["test.subscriber_error"]

    unsubscribe()
    unsubscribe()  # harmless twice
    subs.emit(2)
    assert heard == [1]
    subs.clear()
    caplog.clear()
    subs.emit(3)
    assert caplog.records == []
