"""sd_notify: message formats, the watchdog period rules, and real datagrams on a bound socket."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mn_secd.notify import Notifier, watchdog_interval


def test_watchdog_interval_is_half_the_period_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, 42) is None
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None


def test_messages_and_status_deduplication() -> None:
    sent: list[str] = []
    n = Notifier({"NOTIFY_SOCKET": "@x"}, send=lambda m: sent.append(m) or True)
    n.status("waiting for the modem")
    n.status("waiting for the modem")
    n.status("two\nlines")
    n.extend_timeout(20)
    n.ready("serving")
    n.watchdog()
    n.stopping("bye")
    assert sent == [
        "STATUS=waiting for the modem",
        "STATUS=two lines",
        "EXTEND_TIMEOUT_USEC=20000000",
        "READY=1\nSTATUS=serving",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=bye",
    ]


def test_no_notify_socket_means_nothing_is_sent() -> None:
    sent: list[str] = []
    n = Notifier({"WATCHDOG_USEC": "1000"}, send=lambda m: sent.append(m) or True)
    n.ready()
    n.status("x")
    n.stopping()
    assert sent == []
    assert not n.enabled


async def test_watchdog_task_pings_from_the_loop() -> None:
    sent: list[str] = []
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "20000"}, send=lambda m: sent.append(m) or True)
    task = asyncio.create_task(n.run_watchdog())
    await asyncio.sleep(0.055)
    task.cancel()
    assert 4 <= sent.count("WATCHDOG=1") <= 7  # every 10 ms


async def test_watchdog_task_returns_when_off() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@x"}, send=lambda m: True)
    await asyncio.wait_for(n.run_watchdog(), 1)


@pytest.fixture(params=["filesystem", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "abstract":
        name = f"mn-secd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        path = Path("/tmp") / f"mn-secd-{uuid.uuid4().hex[:12]}.sock"  # sun_path is short; tmp_path may not fit
        sock.bind(str(path))
        address = str(path)
    sock.settimeout(5)
    yield address, sock
    sock.close()
    if not address.startswith("@"):
        os.unlink(address)


def test_systemd_python_reaches_a_bound_socket(notify_socket: tuple[str, socket.socket]) -> None:
    """Through the real systemd.daemon.notify, in a child process with NOTIFY_SOCKET set."""
    address, sock = notify_socket
    code = "from mn_secd.notify import Notifier; n = Notifier(); n.ready('up'); n.stopping()"
    env = dict(os.environ, NOTIFY_SOCKET=address)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert sock.recv(4096) == b"STOPPING=1"


def test_a_vanished_socket_never_raises_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def refuse(message: str) -> bool:
        calls.append(message)
        raise ConnectionRefusedError(111, "Connection refused")

    n = Notifier({"NOTIFY_SOCKET": "@gone"}, send=refuse)
    with caplog.at_level("WARNING", logger="mn_secd.notify"):
        n.watchdog()
        n.status("still serving")
        n.stopping()
    assert calls == ["WATCHDOG=1", "STATUS=still serving", "STOPPING=1"]
    assert [r.message for r in caplog.records] == ["cannot notify the service manager: Connection refused"]


def test_the_real_sender_survives_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = Path("/tmp") / f"mn-secd-{uuid.uuid4().hex[:12]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens: sendmsg gets ECONNREFUSED
    try:
        env = dict(os.environ, NOTIFY_SOCKET=str(path))
        code = "from mn_secd.notify import Notifier; n = Notifier(); n.ready(); n.watchdog(); print('alive')"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    finally:
        path.unlink()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "alive\n"
