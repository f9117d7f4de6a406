"""Telling systemd how the daemon is doing (``sd_notify``), through systemd-python.

With ``Type=notify`` systemd considers the service started only when READY=1 arrives, shows the
latest STATUS= line in ``systemctl status``, restarts the service when WATCHDOG=1 stops arriving
(``WatchdogSec=``), and accepts EXTEND_TIMEOUT_USEC= while a slow modem is still booting. Outside
systemd (``NOTIFY_SOCKET`` unset) every call here does nothing, so the daemon runs the same way in a
terminal, in tests and under the service manager.

The watchdog ping is sent by a task on the daemon's event loop, so a stuck loop (a blocking call, a
deadlock) stops the pings and systemd restarts the service: that is the point of the watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

import systemd.daemon as _sd_daemon

log = logging.getLogger(__name__)

#: Sends one notification datagram; returns whether it was sent (systemd-python's signature).
Sender = Callable[[str], bool]


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when the watchdog is off or meant for another process.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process that must ping). Pinging at
    half the period is what ``sd_watchdog_enabled(3)`` recommends: one late ping is not fatal.
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    try:
        if watchdog_pid and int(watchdog_pid) != pid:
            return None
        period = int(usec)
    except ValueError:
        return None
    if period <= 0:
        return None
    return period / 2 / 1_000_000


def _status_text(text: str) -> str:
    """A STATUS= value is one line: a newline would start a new (bogus) assignment."""
    return " ".join(text.split())


class Notifier:
    """The daemon's notification channel to systemd (a no-op without ``NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] | None = None, send: Sender | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_period = watchdog_interval(env, os.getpid())
        self._send: Sender = send if send is not None else _sd_daemon.notify
        self.last_status: str | None = None
        self._send_failed = False

    def _notify(self, message: str) -> None:
        """Send, never raise: losing a notification must not take the daemon down with it.

        systemd-python raises when the socket is gone (the service manager re-executing, a test
        that stopped listening); the daemon keeps serving and says so once in the log.
        """
        if not self.enabled:
            return
        try:
            self._send(message)
        except OSError as exc:
            if not self._send_failed:
                self._send_failed = True
                log.warning(
                    "cannot notify the service manager: %s", exc.strerror or exc, extra={"event": "notify.failed"}
                )
            return
        self._send_failed = False

    def ready(self, status: str | None = None) -> None:
        self._notify("READY=1" if status is None else f"READY=1\nSTATUS={_status_text(status)}")
        if status is not None:
            self.last_status = _status_text(status)

    def status(self, text: str) -> None:
        """One STATUS= line; repeated identical lines are sent once (they would only be noise)."""
        line = _status_text(text)
        if line == self.last_status:
            return
        self.last_status = line
        self._notify(f"STATUS={line}")

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> None:
        self._notify("STOPPING=1" if status is None else f"STOPPING=1\nSTATUS={_status_text(status)}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for ``seconds`` more before it gives up on start-up (or shutdown)."""
        self._notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    async def run_watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled; returns at once when it is off."""
        if not self.enabled or self.watchdog_period is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_period)
