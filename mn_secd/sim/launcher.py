"""Start ``mn-secd run`` as systemd would: a subprocess with its own NOTIFY_SOCKET and watchdog.

The demo and the end-to-end tests drive the real daemon binary through this, so the daemon runs
exactly the code path of a gateway: a configuration file, sd_notify datagrams, signals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket (abstract namespace)."""

    def __init__(self) -> None:
        self.address = f"@mn-secd-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.setblocking(False)
        #: Every datagram received, in order (each may hold several ``KEY=VALUE`` lines).
        self.messages: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 4096)
            self.messages.append(data.decode(errors="replace"))
            self._changed.set()

    async def wait_for(self, predicate: Callable[[str], bool], *, after: int = -1, timeout: float = 15.0) -> int:
        """Index of the first message after index ``after`` that matches ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(after + 1, len(self.messages)):
                    if predicate(self.messages[i]):
                        return i
                self._changed.clear()
                await self._changed.wait()

    def statuses(self) -> list[str]:
        """The STATUS= lines so far, in order."""
        return [line[7:] for m in self.messages for line in m.split("\n") if line.startswith("STATUS=")]

    def close(self) -> None:
        self._task.cancel()
        self._sock.close()


def mn_secd_command() -> list[str]:
    """The installed ``mn-secd`` next to this interpreter, or ``python -m mn_secd``."""
    script = Path(sys.executable).parent / "mn-secd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mn_secd"]


class DaemonProcess:
    """``mn-secd run --config FILE`` in a subprocess; its stderr (the log) is kept line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, notify: NotifyListener, log_file: Path | None) -> None:
        self.proc = proc
        self.notify = notify
        self.stderr: list[str] = []
        self._log_file = log_file
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls,
        config: Path,
        *extra: str,
        argv: Sequence[str] | None = None,
        watchdog_usec: int | None = 400_000,
        log_file: Path | None = None,
        credentials: Path | None = None,
    ) -> DaemonProcess:
        """``credentials``: a directory the daemon sees as ``$CREDENTIALS_DIRECTORY``, as systemd's
        ``LoadCredential=`` fills it (e.g. the session-sealing key)."""
        notify = NotifyListener()
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "CREDENTIALS_DIRECTORY")}
        if credentials is not None:
            env["CREDENTIALS_DIRECTORY"] = str(credentials)
        env["NOTIFY_SOCKET"] = notify.address
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        command = list(argv) if argv is not None else mn_secd_command()
        proc = await asyncio.create_subprocess_exec(
            *command, "run", "--config", str(config), *extra, env=env, stderr=asyncio.subprocess.PIPE
        )
        return cls(proc, notify, log_file)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        sink = self._log_file.open("a") if self._log_file is not None else None
        try:
            async for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.stderr.append(line)
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
        finally:
            if sink is not None:
                sink.close()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for READY=1; a daemon that exits first is reported with its last log lines."""
        ready = asyncio.ensure_future(self.notify.wait_for(lambda m: "READY=1" in m.split("\n"), timeout=timeout))
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            exited.cancel()
            ready.result()
            return
        ready.cancel()
        tail = "\n".join(self.stderr[-5:])
        raise RuntimeError(f"mn-secd exited with {self.proc.returncode} before READY=1:\n{tail}")

    async def wait_log(self, text: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.stderr):
                await asyncio.sleep(0.05)

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as systemd stops a unit; returns the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                await self._reader
        finally:
            await self.kill()
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        self.notify.close()
