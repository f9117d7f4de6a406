"""Who else holds the modem's AT port: UUCP lock files and the open files in ``/proc``.

A tty can be opened by any number of processes, and two programs talking AT on one port corrupt
each other's answers (ModemManager probing a new modem is the usual one; a PPP dialer another).
The daemon cannot prevent that, but it can name the other program so that the operator can keep
it off the port (``udev/90-mn-secd-modem.rules`` sets ``ID_MM_PORT_IGNORE`` for ModemManager).

Two ways to find it, both read-only:

* UUCP lock files: dialers such as pppd and minicom write ``LCK..<device>`` holding their PID into
  ``/run/lock`` (``/var/lock``) before they open a port (FHS 3.0, 5.9); a lock whose process is gone
  is stale and ignored.
* ``/proc/<pid>/fd``: every open file of every process we may look at; a link that leads to the
  same character device is a holder. Under systemd's ``ProtectProc=invisible`` the daemon sees no
  process but its own, so the daemon's other signal is answers to commands it never sent
  (:class:`mn_secd.uicc.at.Stray`); ``mn-secd doctor`` run as root sees them all.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Where UUCP lock files live (``/var/lock`` is a link to ``/run/lock`` on current systems).
LOCK_DIRS: tuple[Path, ...] = (Path("/run/lock"), Path("/var/lock"), Path("/var/spool/locks"))
#: Processes we know by name, and what to do about them.
KNOWN = {
    "ModemManager": "keep it off the port with the udev rule udev/90-mn-secd-modem.rules (ID_MM_PORT_IGNORE=1)",
    "pppd": "give the dialer the modem's other port (PPP) and leave the AT port to mn-secd",
}
DEFAULT_ADVICE = "stop it or point it at another of the modem's ports; see udev/90-mn-secd-modem.rules"


@dataclass(frozen=True, slots=True)
class PortHolder:
    """A process that has the port open (or has locked it)."""

    pid: int
    comm: str  # the process name, as ps shows it
    how: str  # "open" or "lock file /run/lock/LCK..ttyUSB2"
    cmdline: str = ""

    def describe(self) -> str:
        return f"{self.comm} (pid {self.pid}, {self.how})"

    @property
    def advice(self) -> str:
        return KNOWN.get(self.comm, DEFAULT_ADVICE)

    @property
    def is_mn_secd(self) -> bool:
        """Another mn-secd (the daemon, or a command run by hand) holds it."""
        return "mn-secd" in self.cmdline or "mn_secd" in self.cmdline


def lock_names(path: str) -> set[str]:
    """The lock file names in use for ``path``: ``LCK..ttyUSB2``; ``LCK..pts_3`` for ``/dev/pts/3``."""
    names: set[str] = set()
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        relative = candidate.removeprefix("/dev/")
        names.add("LCK.." + os.path.basename(candidate))
        names.add("LCK.." + relative.replace("/", "_"))
    return names


def _read(path: Path, limit: int = 4096) -> str:
    with path.open("rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def _alive(pid: int, proc: Path) -> bool:
    return (proc / str(pid)).is_dir()


def _describe_pid(pid: int, how: str, proc: Path) -> PortHolder:
    try:
        comm = _read(proc / str(pid) / "comm").strip() or "?"
    except OSError:
        comm = "?"
    try:
        cmdline = _read(proc / str(pid) / "cmdline").replace("\0", " ").strip()
    except OSError:
        cmdline = ""
    return PortHolder(pid, comm, how, cmdline)


def _lock_pid(text: bytes) -> int | None:
    """A lock file's PID: ASCII (HDB UUCP, ten columns) or, from old programs, a binary int."""
    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    if len(text) == 4:
        return int.from_bytes(text, "little")
    return None


def _locks(path: str, lock_dirs: Iterable[Path], proc: Path) -> Iterator[PortHolder]:
    names = lock_names(path)
    seen: set[Path] = set()
    for directory in lock_dirs:
        for name in sorted(names):
            lock = directory / name
            try:
                real = lock.resolve()
                if real in seen:
                    continue
                seen.add(real)
                with lock.open("rb") as f:
                    pid = _lock_pid(f.read(64))
            except OSError:
                continue
            if pid is not None and pid > 0 and _alive(pid, proc):
                yield _describe_pid(pid, f"lock file {lock}", proc)


#: Unix98 pty slaves (/dev/pts/N) have majors 136-143 (Linux devices.txt).
_PTY_SLAVE_MAJORS = range(136, 144)


def _pty_index(rdev: int) -> int | None:
    major = os.major(rdev)
    return (major - 136) * 256 + os.minor(rdev) if major in _PTY_SLAVE_MAJORS else None


def _holds_master(fd_dir: Path, fd: str, index: int) -> bool:
    """This fd is the master side of pty ``index`` (fdinfo says ``tty-index:``, Linux 4.x and later)."""
    try:
        if os.path.basename(os.readlink(fd_dir / fd)) != "ptmx":
            return False
        info = _read(fd_dir.parent / "fdinfo" / fd)
    except OSError:
        return False
    return any(line.split() == ["tty-index:", str(index)] for line in info.splitlines())


def _openers(port: os.stat_result, proc: Path, own_pid: int) -> Iterator[PortHolder]:
    """Processes with the device open. For a pty, the process serving its master side (a modem
    emulator, socat) is the line's far end, not a second user of the line, and is left out; and a
    pty is only the same pty within one devpts instance (a container has its own /dev/pts/N with
    the same numbers)."""
    rdev = port.st_rdev
    index = _pty_index(rdev)
    try:
        pids = [int(entry) for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == own_pid:
            continue
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to look at
            continue
        opened = False
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)  # follows the link to the open file itself
            except OSError:
                continue
            if index is not None and _holds_master(fd_dir, fd, index):
                opened = False
                break
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev and (index is None or st.st_dev == port.st_dev):
                opened = True
        if opened:
            yield _describe_pid(pid, "open", proc)


def port_holders(
    path: str,
    *,
    lock_dirs: Iterable[Path] = LOCK_DIRS,
    proc: Path = Path("/proc"),
    own_pid: int | None = None,
) -> list[PortHolder]:
    """Every other process holding ``path`` (lock files first), each named once; [] if none is seen.

    Blocking (it walks ``/proc``): call it from a thread in async code.
    """
    me = os.getpid() if own_pid is None else own_pid
    found: dict[int, PortHolder] = {}
    for holder in _locks(path, lock_dirs, proc):
        if holder.pid != me:
            found.setdefault(holder.pid, holder)
    try:
        st = os.stat(path)
    except OSError:
        return list(found.values())
    if stat.S_ISCHR(st.st_mode):
        for holder in _openers(st, proc, me):
            found.setdefault(holder.pid, holder)
    return list(found.values())
