"""The doctor's pure rules: DeviceAllow= coverage, clock plausibility, and who holds a UDP port."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mn_secd.commands.doctor_rules import CLOCK_FLOOR, Verdict, clock_verdict, device_allowed, udp_port_users


def test_device_allow_by_path_and_by_class(tmp_path: Path) -> None:
    link = tmp_path / "mn-secd-modem"
    link.symlink_to("/dev/null")
    assert device_allowed("/dev/ttyUSB2", ["/dev/ttyUSB2 rw"], major_name="ttyUSB")
    assert device_allowed(str(link), ["/dev/null rw"], major_name="mem")  # the link's target is listed
    assert device_allowed("/dev/ttyUSB2", ["char-ttyUSB rw"], major_name="ttyUSB")
    assert device_allowed("/dev/ttyACM0", ["char-tty* rw"], major_name="ttyACM")
    assert not device_allowed("/dev/ttyUSB2", ["char-ttyACM rw"], major_name="ttyUSB")
    assert not device_allowed("/dev/ttyUSB2", ["/dev/ttyUSB2 r"], major_name="ttyUSB")  # read-only is not enough
    assert not device_allowed("/dev/ttyUSB2", [], major_name="ttyUSB")


def test_clock_verdicts() -> None:
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert clock_verdict(now, None)[0] is Verdict.OK
    assert clock_verdict(CLOCK_FLOOR - timedelta(days=400), None)[0] is Verdict.FAIL  # a board without RTC
    assert clock_verdict(now, now - timedelta(seconds=5))[0] is Verdict.OK
    verdict, text = clock_verdict(now, now - timedelta(minutes=10))
    assert verdict is Verdict.WARN and "600 s ahead of" in text
    assert clock_verdict(now, now + timedelta(hours=2))[0] is Verdict.FAIL


def test_udp_port_users_names_this_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        users = udp_port_users(port)
    assert os.getpid() in [pid for pid, _ in users]
