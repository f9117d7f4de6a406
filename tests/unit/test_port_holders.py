"""Who else holds a serial port: UUCP lock files and open files in /proc, on real files and processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mn_secd.uicc.holders import lock_names, port_holders


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_file_names() -> None:
    assert "LCK..ttyUSB2" in lock_names("/dev/ttyUSB2")
    assert "LCK..pts_3" in lock_names("/dev/pts/3")


def test_a_live_lock_names_its_process_and_a_stale_one_is_ignored(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    (tmp_path / "LCK..ttyUSB2").write_text(f"{sleeper.pid:10d}\n")  # HDB UUCP: ten columns and a newline
    holders = port_holders("/dev/ttyUSB2", lock_dirs=[tmp_path])
    assert [(h.pid, h.how) for h in holders] == [(sleeper.pid, f"lock file {tmp_path / 'LCK..ttyUSB2'}")]
    assert holders[0].comm.startswith("python")
    sleeper.kill()
    sleeper.wait()
    assert port_holders("/dev/ttyUSB2", lock_dirs=[tmp_path]) == []  # its process is gone: stale


def test_a_binary_lock_file_from_an_old_program(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    (tmp_path / "LCK..ttyS0").write_bytes(sleeper.pid.to_bytes(4, "little"))
    assert [h.pid for h in port_holders("/dev/ttyS0", lock_dirs=[tmp_path])] == [sleeper.pid]


def test_an_open_pty_is_found_but_not_its_master_side_nor_ourselves(tmp_path: Path) -> None:
    master, slave = os.openpty()  # we hold both ends: we are the line's far end, and ourselves
    path = os.ttyname(slave)
    code = "import os, sys, time; os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY); print(flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"\n"
        holders = port_holders(path, lock_dirs=[tmp_path])
        assert [(h.pid, h.how) for h in holders] == [(other.pid, "open")]
        assert "python" in holders[0].cmdline and not holders[0].is_mn_secd
        assert "udev" in holders[0].advice
        # Seen from another process, the one serving the master side is not a holder either.
        assert port_holders(path, lock_dirs=[tmp_path], own_pid=other.pid) == []
    finally:
        other.kill()
        other.wait()
        os.close(master)
        os.close(slave)
