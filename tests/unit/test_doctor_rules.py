"""The doctor's pure rules: DeviceAllow= coverage, clock plausibility, who holds a UDP port, and where
sessions are kept across restarts."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mn_secd.commands.doctor_rules import (
    CLOCK_FLOOR,
    SessionFacts,
    Verdict,
    bus_path,
    clock_verdict,
    device_allowed,
    dropin_device_allow,
    session_verdict,
    udp_port_users,
)


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
    assert not device_allowed("/dev/ttyUSB2", ["/dev/ttyUSB1 rw"], major_name="ttyUSB")  # another port by path
    assert not device_allowed(str(link), ["/dev/zero rw"], major_name="mem")


def test_the_device_allow_lines_of_a_dropin(tmp_path: Path) -> None:
    dropin = tmp_path / "50-modem-port.conf"
    dropin.write_text(
        "# DeviceAllow=/dev/not-this rw\n[Service]\nDeviceAllow=/dev/pts/3 rw\nDeviceAllow=char-ttyUSB rw\n"
    )
    assert dropin_device_allow(dropin) == ["/dev/pts/3 rw", "char-ttyUSB rw"]
    assert dropin_device_allow(tmp_path / "gone.conf") == []


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


def test_session_verdicts_say_where_sessions_are_kept_and_what_a_restart_costs() -> None:
    key = Path("/etc/credstore.encrypted/mn-secd-session-key")
    kept = SessionFacts(False, Path("/var/lib/mn-secd"), "StateDirectory=", kept="a GBA_U session record", key_path=key)
    verdict, detail, fix = session_verdict(kept)
    assert verdict is Verdict.OK and fix == ""
    assert detail.startswith("/var/lib/mn-secd (StateDirectory=) holds a GBA_U session record")
    assert "GBA_ME sessions are not kept (persist_session = false: a restart costs one bootstrap)" in detail

    verdict, detail, fix = session_verdict(replace(kept, directory=None))
    assert verdict is Verdict.WARN and "every restart costs a bootstrap" in detail and "state_directory" in fix
    verdict, detail, _ = session_verdict(replace(kept, directory_problem="not a directory"))
    assert verdict is Verdict.FAIL and "not a directory: nothing is kept" in detail

    persist = replace(kept, persist=True, key_present=False)
    verdict, detail, fix = session_verdict(persist)
    assert verdict is Verdict.WARN and f"no session-sealing key ({key})" in detail
    assert fix.startswith("mn-secd setup-sealing (as root), then systemctl daemon-reload")
    verdict, detail, fix = session_verdict(replace(persist, key_present=True, unit_loads_key=False))
    assert verdict is Verdict.WARN and "the unit does not load it yet" in detail and "daemon-reload" in fix
    verdict, detail, fix = session_verdict(replace(persist, key_present=True, key_problem="systemd-creds failed"))
    assert verdict is Verdict.FAIL and "does not open (systemd-creds failed)" in detail and "--force" in fix
    assert session_verdict(replace(persist, key_present=None))[0] is Verdict.WARN  # not root: cannot tell
    verdict, detail, _ = session_verdict(replace(persist, key_present=True, unit_loads_key=True))
    assert verdict is Verdict.OK and "GBA_ME sessions are sealed under the session-sealing key" in detail
    assert session_verdict(replace(persist, key_present=True, unit_loads_key=None))[0] is Verdict.OK  # no systemd


def test_the_units_bus_path_is_escaped_as_systemd_does() -> None:
    assert bus_path("mn-secd.service") == "/org/freedesktop/systemd1/unit/mn_2dsecd_2eservice"
