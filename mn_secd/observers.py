"""A list of event callbacks, shared by the card, the keystore and the daemon's key service.

Each of them tells others about changes (card removed, keys refreshed or wiped) through plain
callbacks. One subscriber that raises must not stop the others from hearing the news, nor the
emitter from going on, so failures are logged and swallowed here, in one place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

E = TypeVar("E")


class Subscribers(Generic[E]):
    """Callbacks for events of type ``E``; a failing callback is logged as ``error_event``."""

    def __init__(self, logger: logging.Logger, error_event: str) -> None:
        self._callbacks: list[Callable[[E], None]] = []
        self._logger = logger
        self._error_event = error_event

    def subscribe(self, callback: Callable[[E], None]) -> Callable[[], None]:
        """Add ``callback``; returns the function that removes it again (harmless to call twice)."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def emit(self, event: E) -> None:
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                self._logger.exception("event subscriber failed", extra={"event": self._error_event})

    def clear(self) -> None:
        self._callbacks.clear()
