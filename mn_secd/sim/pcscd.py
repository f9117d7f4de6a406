"""A private pcscd with one vpcd reader, for tests and the lab, beside (not instead of) the system's.

What pcsc-lite 1.9 (Debian 12) allows, read from its source and checked here:

* The client library honours ``PCSCLITE_CSOCK_NAME``; the daemon does not (its socket path is
  compiled in, ``/run/pcscd/pcscd.comm``). But the daemon takes a listening socket from systemd's
  socket activation (``LISTEN_FDS``/``LISTEN_PID``, fd 3), so we bind our own Unix socket, hand it
  over that way, and point clients at it with ``PCSCLITE_CSOCK_NAME``.
* ``-c DIR`` replaces ``/etc/reader.conf.d``: our directory has one entry, the vpcd driver on a
  port of our choice (``DEVICENAME /dev/null:PORT``). vpcd then listens on PORT and PORT+1 (its two
  slots) on every interface, as vsmartcard's driver always does: use a free port on a lab machine
  behind a firewall. (vpcd 0.8's other mode, where it connects to a listening card, crashes pcscd
  as soon as the card is away, so it is not used.)
* Whatever the socket, pcscd still writes ``/run/pcscd/pcscd.pid`` and scans USB readers through
  the drivers in ``/usr/lib/pcsc/drivers``. As root we therefore start it in a private mount
  namespace (``unshare``) with its own tmpfs on ``/run/pcscd`` and an empty one on the drivers
  directory (the vpcd driver is bind-mounted beside our reader.conf first), so it neither touches
  the system pcscd's files nor competes for its USB readers. Without root we run it as it is and
  refuse when a system pcscd is alive (its pid file would be overwritten).

``mn-secd sim pcscd`` runs one from a shell and prints what a client needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

PCSCD_IPC_DIR = Path("/run/pcscd")
PCSCD_DRIVERS_DIR = Path("/usr/lib/pcsc/drivers")
VPCD_DRIVER = PCSCD_DRIVERS_DIR / "serial" / "libifdvpcd.so"
#: pcscd names a reader "<FRIENDLYNAME> <reader index> <slot>"; vpcd has two slots per entry.
DEFAULT_READER_NAME = "mn-secd vicc"
_READY = "daemon ready"
#: argv[1] is the listening socket's fd: make it fd 3, say so in LISTEN_FDS/LISTEN_PID, exec argv[2:].
_SOCKET_ACTIVATION = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execvp(sys.argv[2], sys.argv[2:])"
)


class PcscdError(RuntimeError):
    """The private pcscd could not be started (binary or driver missing, port taken, no isolation)."""


def pcscd_binary() -> str | None:
    """pcscd's path, or None when pcsc-lite's daemon is not installed."""
    return shutil.which("pcscd") or next(
        (str(p) for p in (Path("/usr/sbin/pcscd"), Path("/sbin/pcscd")) if p.exists()), None
    )


def missing_tools() -> list[str]:
    """What is missing to run a private pcscd with vpcd (Debian packages named), empty when nothing."""
    missing = []
    if pcscd_binary() is None:
        missing.append("pcscd (Debian package pcscd)")
    if not VPCD_DRIVER.exists():
        missing.append(f"{VPCD_DRIVER} (Debian package vsmartcard-vpcd)")
    return missing


def free_port_pair(host: str = "0.0.0.0", attempts: int = 50) -> int:
    """A port P such that P and P+1 are both free on ``host`` (vpcd binds both, on every interface)."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise PcscdError(f"no two consecutive free TCP ports on {host} after {attempts} tries")


def _system_pcscd_alive() -> bool:
    try:
        pid = int((PCSCD_IPC_DIR / "pcscd.pid").read_text().strip("\0\n "))
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PrivatePcscd:
    """pcscd in the foreground with its own socket, its own reader.conf and one vpcd reader.

    ``start()`` returns once pcscd said it is ready (its vpcd reader listening on :attr:`port`);
    clients use :attr:`env` (``PCSCLITE_CSOCK_NAME``). ``stop()`` ends it (SIGTERM, then SIGKILL)
    and removes its socket; ``start()`` again brings it back on the same socket and port, which is
    how tests make the reader vanish and return. Use it as a context manager.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        reader_name: str = DEFAULT_READER_NAME,
        isolate: bool | None = None,
        debug: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        if '"' in reader_name or "\n" in reader_name:
            raise ValueError("the reader name goes into reader.conf: no quotes or newlines")
        self._own_dir = workdir is None
        self.workdir = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="mn-secd-pcscd-"))
        self.port = port
        self.reader_name = reader_name
        self._isolate = isolate
        self._debug = debug
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "pcscd.comm"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pcscd.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment a PC/SC client needs to reach this pcscd."""
        return {"PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    @property
    def readers(self) -> tuple[str, str]:
        """The names pcscd gives vpcd's two slots (the first is where :attr:`port`'s card appears)."""
        return f"{self.reader_name} 00 00", f"{self.reader_name} 00 01"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> PrivatePcscd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _use_namespace(self) -> bool:
        if self._isolate is not None:
            return self._isolate
        return os.geteuid() == 0

    def start(self) -> None:
        """Start pcscd and wait until it is ready; :class:`PcscdError` says why it could not."""
        if self.running:
            return
        missing = missing_tools()
        if missing:
            raise PcscdError("missing: " + ", ".join(missing))
        namespace = self._use_namespace()
        if namespace and shutil.which("unshare") is None:
            raise PcscdError("unshare (util-linux) is needed to isolate pcscd")
        if not namespace and _system_pcscd_alive():
            raise PcscdError(
                "a system pcscd is running and this pcscd cannot be isolated from it without root "
                "(it would overwrite /run/pcscd/pcscd.pid)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port_pair()
        driver = self.workdir / "driver"
        driver.mkdir(exist_ok=True)
        conf_dir = self.workdir / "reader.conf.d"
        conf_dir.mkdir(exist_ok=True)
        library = (driver / VPCD_DRIVER.name) if namespace else VPCD_DRIVER
        (conf_dir / "vpcd").write_text(
            f'FRIENDLYNAME "{self.reader_name}"\n'
            f"DEVICENAME   /dev/null:{self.port}\n"
            f"LIBPATH      {library}\n"
            f"CHANNELID    {self.port}\n"
        )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(64)
        os.chmod(self.socket_path, 0o666)  # as pcscd makes its own: any local user may be a client
        self._listener = listener
        pcscd = pcscd_binary()
        assert pcscd is not None
        # pcscd wants its socket as fd 3 and LISTEN_PID equal to its own pid: a small Python step
        # puts it there and execs pcscd (the shell cannot: dash only names fds 0-9).
        command = [pcscd, "--foreground", "--info", "--config", str(conf_dir)]
        if self._debug:
            command += ["--debug", "--apdu"]
        argv = [sys.executable, "-c", _SOCKET_ACTIVATION, str(listener.fileno()), *command]
        if namespace:
            mounts = (
                f"mkdir -p {PCSCD_IPC_DIR} && mount -t tmpfs -o size=1m,mode=0755 tmpfs {PCSCD_IPC_DIR} && "
                f"mount --bind {VPCD_DRIVER.parent} {_q(driver)} && "
                f"mount -t tmpfs -o size=1m,mode=0755 tmpfs {PCSCD_DRIVERS_DIR} && "
            )
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + 'exec "$@"', "sh", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PCSCLITE_"))}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal goes to us; we stop pcscd ourselves
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        assert self._process is not None
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            if "Could not initialize connection to virtual ICC" in text:
                raise PcscdError(f"vpcd could not listen on port {self.port} or {self.port + 1} (in use?)")
            if _READY in text:
                return
            if self._process.poll() is not None:
                last = text.strip().splitlines()[-3:]
                raise PcscdError(f"pcscd exited with {self._process.returncode}: {' | '.join(last) or 'no output'}")
            time.sleep(0.05)
        raise PcscdError(f"pcscd not ready after {self._start_timeout:.0f} s (see {self.log_path})")

    def stop(self, timeout: float = 5.0) -> None:
        """End pcscd (SIGTERM, SIGKILL after ``timeout``) and remove its socket: clients see no service."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def close(self) -> None:
        """Stop pcscd and remove the working directory if we made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        """Everything pcscd printed so far."""
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""


def _q(path: Path) -> str:
    text = str(path)
    if any(c in text for c in " '\"$`\\;&|<>()*?[]{}\n\t"):
        raise PcscdError(f"the working directory's path must be plain for the shell: {text!r}")
    return text


# --- mn-secd sim pcscd --------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "Prints PCSCLITE_CSOCK_NAME=... and the vpcd port, then runs until SIGINT/SIGTERM. "
        "Point a virtual card at it with: mn-secd sim vicc --card PROFILE --vpcd 127.0.0.1:PORT"
    )
    parser.add_argument("--dir", type=Path, metavar="DIR", help="working directory (default: a new temporary one)")
    parser.add_argument("--port", type=int, default=0, metavar="PORT", help="vpcd's port (default: a free pair)")
    parser.add_argument("--reader-name", default=DEFAULT_READER_NAME, metavar="NAME", help="the reader's name")
    parser.add_argument("--debug", action="store_true", help="pcscd's debug log with APDUs (lab only)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    pcscd = PrivatePcscd(args.dir, port=args.port, reader_name=args.reader_name, debug=args.debug)
    stopping: list[int] = []

    def on_signal(signum: int, frame: TracebackType | object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            pcscd.start()
        except PcscdError as exc:
            print(f"mn-secd sim pcscd: {exc}", file=sys.stderr)
            return 2
        print(f"PCSCLITE_CSOCK_NAME={pcscd.socket_path}", flush=True)
        print(f"vpcd port {pcscd.port}; readers: {', '.join(pcscd.readers)}; log {pcscd.log_path}", flush=True)
        while not stopping and pcscd.running:
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        pcscd.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
