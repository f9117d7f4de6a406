"""An asyncio event loop on virtual time, for driving the keystore's timers without waiting.

Whenever no callback is ready to run, the loop's clock jumps to the earliest pending timer, so an
hour of ``asyncio.sleep``/``asyncio.timeout`` passes at once and exactly. Only for code that does
no I/O (the keystore over in-memory fakes): a jump does not wait for sockets. The loop's own time
starts at 0 (large floats would lose the sub-microsecond steps asyncio compares timers with);
:meth:`VirtualTimeLoop.clock` is the matching :class:`mn_secd.clock.Clock` for the code under test. It relies
on two private attributes of CPython's ``BaseEventLoop`` (``_ready``, ``_scheduled``), checked at start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, epoch: float = 1_900_000_000.0) -> None:
        super().__init__()
        if not hasattr(self, "_ready") or not hasattr(self, "_scheduled"):
            raise RuntimeError("asyncio's BaseEventLoop changed: VirtualTimeLoop needs _ready and _scheduled")
        self.epoch = epoch
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def posix(self) -> float:
        """The POSIX time matching the loop's virtual time."""
        return self.epoch + self._virtual_now

    def clock(self) -> LoopClock:
        """A :class:`mn_secd.clock.Clock` on this loop's virtual time."""
        return LoopClock(self)

    def _run_once(self) -> None:
        ready: Any = self._ready  # type: ignore[attr-defined]
        scheduled: Any = self._scheduled  # type: ignore[attr-defined]
        if not ready:
            pending = [handle.when() for handle in scheduled if not handle.cancelled()]
            if pending:
                self._virtual_now = max(self._virtual_now, min(pending))
        super()._run_once()  # type: ignore[misc]


class LoopClock:
    """Decides on the loop's virtual POSIX time and sleeps on its timers."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def time(self) -> float:
        return self._loop.posix()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def on_virtual_time(scenario: Callable[[VirtualTimeLoop], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` to its end on a fresh :class:`VirtualTimeLoop`."""
    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()
