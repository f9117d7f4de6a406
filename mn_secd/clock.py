"""One clock to decide on and to sleep on, so that code which waits for a deadline can be driven by a
simulated clock (tests, a simulated fleet) exactly as it is by the wall clock.

Times are POSIX seconds: the BSF states a key's lifetime as an absolute UTC time, so deadlines are
wall-clock times, and whoever sleeps until one re-reads the clock now and then to notice a step
(NTP setting the time after boot).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """The current POSIX time in seconds."""

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock (cancellable)."""


class SystemClock:
    """The wall clock and the event loop's timer."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
