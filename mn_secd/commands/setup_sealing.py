"""``mn-secd setup-sealing``: make the session-sealing key that ``[gba] persist_session`` needs (as root).

The key is 32 random octets, handed through a pipe to ``systemd-creds encrypt`` (the host key, a
TPM2, or both: ``--with-key``), whose output goes to ``/etc/credstore.encrypted/mn-secd-session-key``
(mode 0600, replaced atomically). The clear key exists only in this process, in a buffer zeroed
before it exits, and then in each start of the unit, where systemd decrypts it for the daemon
(``LoadCredentialEncrypted=``; :mod:`mn_secd.gba.sealing` says why it is done this way).
Afterwards the file is opened once with ``systemd-creds decrypt``, as systemd will open it, and
compared with the key in constant time, so a key that systemd could not hand over is known now.

An existing key is kept (and checked) unless ``--force`` asks for a new one: a session sealed
under the old key is then not resumed, which costs one bootstrap. Nothing is restarted; the
command says what to run next.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path

from mn_secd.commands.check_config import DEFAULT_CONFIG
from mn_secd.config import load_gba_config
from mn_secd.errors import ConfigError, SealingUnavailable
from mn_secd.gba.sealing import CREDSTORE, KEY_LENGTH, SESSION_KEY_CREDENTIAL

#: ``systemd-creds --with-key=`` choices (systemd-creds(1)): "auto" is TPM2 and host key where
#: there is a TPM2, else the host key.
WITH_KEYS = ("auto", "host", "tpm2", "host+tpm2")
#: Seconds one systemd-creds run may take (a TPM2 can be slow, but not this slow).
TIMEOUT = 30.0
#: Largest encrypted credential read back; a 32-octet key encrypts to a few hundred octets.
MAX_OUTPUT = 16384
#: systemd-creds' note on every use of a host key on unencrypted storage: not a failure.
_NOT_ENCRYPTED_MEDIA = "is not located on encrypted media"


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = (
        "Make the session-sealing key for [gba] persist_session (run as root, once per gateway): 32 random "
        "octets sealed by systemd-creds into CREDSTORE/mn-secd-session-key, which systemd hands to the daemon "
        "only. An existing key is checked and kept unless --force."
    )
    parser.add_argument(
        "--with-key",
        choices=WITH_KEYS,
        default="auto",
        help="what systemd-creds seals it with: auto (TPM2 and host key if there is a TPM2, else the host key), "
        "host, tpm2 or host+tpm2 (default auto)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing key (a session sealed under it is then not resumed)"
    )
    parser.add_argument("--credstore", type=Path, default=CREDSTORE, help=f"where to put it (default {CREDSTORE})")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"configuration file, for the hint (default {DEFAULT_CONFIG})"
    )
    parser.set_defaults(handler=setup_sealing)


def setup_sealing(args: argparse.Namespace) -> int:
    creds = shutil.which("systemd-creds")
    if creds is None:
        raise SealingUnavailable("systemd-creds is not installed (it comes with systemd 250 or later)")
    target: Path = args.credstore / SESSION_KEY_CREDENTIAL
    if target.exists() and not args.force:
        check_key(target, creds)
        print(f"{target}: a session-sealing key is there and systemd-creds opens it; kept (--force makes a new one)")
    else:
        key = bytearray(KEY_LENGTH)
        try:
            with open("/dev/urandom", "rb", buffering=0) as random:
                if random.readinto(key) != KEY_LENGTH:
                    raise SealingUnavailable("/dev/urandom gave fewer than 32 octets")
            sealed = _run(
                creds, ["encrypt", f"--name={SESSION_KEY_CREDENTIAL}", f"--with-key={args.with_key}", "-", "-"], key
            )
            try:
                _replace(target, bytes(sealed))
            finally:
                _wipe(sealed)
            check_key(target, creds, key)
        finally:
            _wipe(key)
        print(f"{target}: a new 256-bit session-sealing key, sealed by systemd-creds (--with-key={args.with_key})")
    print(_next_steps(args.config))
    return 0


def _next_steps(config_path: str) -> str:
    try:
        persist = load_gba_config(config_path).persist_session
    except ConfigError:
        persist = None
    steps = "systemctl daemon-reload && systemctl restart mn-secd"
    if persist is False:
        return f"next: set [gba] persist_session = true in {config_path}, then {steps}"
    return f"next: {steps} (mn-secd-generator hands the key to the unit at the daemon-reload)"


def check_key(target: Path, creds: str | None = None, expected: bytearray | None = None) -> None:
    """systemd-creds opens ``target`` under its name, to a key of 32 octets (``expected``, if given),
    as systemd will for the unit; else :class:`SealingUnavailable` says why (as root: the host key
    and the TPM2 are root's). The key read back is wiped."""
    creds = creds or shutil.which("systemd-creds")
    if creds is None:
        raise SealingUnavailable("systemd-creds is not installed (it comes with systemd 250 or later)")
    key = _run(creds, ["decrypt", f"--name={SESSION_KEY_CREDENTIAL}", str(target), "-"], b"")
    try:
        if len(key) != KEY_LENGTH or (expected is not None and not hmac.compare_digest(key, expected)):
            raise SealingUnavailable(f"{target} does not hold a {KEY_LENGTH}-octet key; --force makes a new one")
    finally:
        _wipe(key)


def _replace(target: Path, data: bytes) -> None:
    """``target`` holds ``data``, mode 0600, in a directory only root may enter; atomic and durable."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _wipe(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


def _run(creds: str, args: list[str], data: bytes | bytearray) -> bytearray:
    """``systemd-creds ARGS`` with ``data`` on stdin; its stdout in a buffer the caller wipes.

    Our own loop over the pipes rather than ``communicate``, which hands stdout back as ``bytes``
    (here, for ``decrypt``, the key): the input is written from the caller's buffer and the output
    read into ours, and the whole run is bounded by :data:`TIMEOUT`.
    """
    what = f"systemd-creds {args[0]}"
    try:
        process = subprocess.Popen(
            [creds, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
    except OSError as exc:
        raise SealingUnavailable(f"{what} could not run: {exc.strerror or exc}") from None
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    output, errors = bytearray(MAX_OUTPUT), bytearray()
    length, sent = 0, 0
    deadline = time.monotonic() + TIMEOUT
    try:
        with selectors.DefaultSelector() as selector, memoryview(data) as source, memoryview(output) as sink:
            if len(source):
                selector.register(process.stdin, selectors.EVENT_WRITE)
            else:
                process.stdin.close()
            selector.register(process.stdout, selectors.EVENT_READ)
            selector.register(process.stderr, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SealingUnavailable(f"{what} did not finish within {TIMEOUT:.0f} s")
                for event, _ in selector.select(left):
                    stream = event.fileobj
                    if stream is process.stdin:
                        try:
                            sent += os.write(process.stdin.fileno(), source[sent:])
                        except BrokenPipeError:
                            sent = len(source)
                        if sent == len(source):
                            selector.unregister(process.stdin)
                            process.stdin.close()
                    elif stream is process.stdout:
                        if length == len(sink):
                            raise SealingUnavailable(f"{what} wrote more than {len(sink)} octets")
                        count = os.readv(process.stdout.fileno(), [sink[length:]])
                        length += count
                        if not count:
                            selector.unregister(process.stdout)
                    else:
                        chunk = os.read(process.stderr.fileno(), 4096)
                        errors += chunk[: max(0, 4096 - len(errors))]
                        if not chunk:
                            selector.unregister(process.stderr)
        try:
            code = process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SealingUnavailable(f"{what} did not finish within {TIMEOUT:.0f} s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        _wipe(output)
        raise
    finally:
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    result = output[:length]
    _wipe(output)
    if code != 0:
        _wipe(result)
        lines = [line for line in errors.decode("utf-8", "replace").splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if _NOT_ENCRYPTED_MEDIA not in line), f"exit status {code}")
        hint = " (run it as root)" if os.geteuid() != 0 else ""
        raise SealingUnavailable(f"{what} failed: {reason.strip()}{hint}")
    return result
