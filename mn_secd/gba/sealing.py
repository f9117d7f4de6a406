"""Sealing a secret before it reaches the disk, with ``systemd-creds`` (the host key or a TPM2).

``systemd-creds encrypt`` authenticates and encrypts with AES-256-GCM under a key derived from the
host's credential secret (``/var/lib/systemd/credential.secret``), from the TPM2, or both
(``--with-key=``); ``decrypt`` refuses a blob under another name, after its ``--not-after`` time,
or on another machine. We hand it the plaintext through a pipe and read the plaintext back through
another, into buffers we wipe: never argv, never a temporary file, never ``bytes`` we cannot
overwrite.

Where it cannot work -- no ``systemd-creds``, no host key or no permission to read it (it is
root's), no TPM2 -- :class:`SealingUnavailable` says so in one line, and the caller keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
from collections.abc import Callable

from mn_secd.errors import SealingUnavailable

#: ``--with-key=`` values the configuration accepts (systemd-creds(1)); "auto" is TPM2 and host key
#: where there is a TPM2, else the host key.
SEAL_KEYS = ("auto", "host", "tpm2", "host+tpm2")
#: Seconds one systemd-creds run may take (a TPM2 can be slow, but not this slow).
TIMEOUT = 15.0
#: Largest output read back; a sealed session is well under 2 KiB.
MAX_OUTPUT = 16384
#: systemd-creds' note on every use of a host key on unencrypted storage: not a failure.
_NOT_ENCRYPTED_MEDIA = "is not located on encrypted media"


class CredsSealer:
    """``systemd-creds`` with key ``key`` (one of :data:`SEAL_KEYS`), found on ``PATH`` when used."""

    def __init__(self, key: str = "auto") -> None:
        if key not in SEAL_KEYS:
            raise ValueError(f"seal key must be one of {', '.join(SEAL_KEYS)}, got {key!r}")
        self.key = key

    async def seal(self, name: str, plaintext: bytes | bytearray, *, not_after: float) -> bytes:
        """The sealed blob for ``plaintext`` under ``name``; it cannot be unsealed after ``not_after``."""
        # Whole seconds, rounded down: the blob never outlives the session.
        args = ["encrypt", f"--with-key={self.key}", f"--name={name}", f"--not-after=@{math.floor(not_after)}"]
        sealed = await self._run([*args, "-", "-"], plaintext)
        try:
            return bytes(sealed)  # not secret
        finally:
            _wipe(sealed)

    async def unseal(self, name: str, sealed: bytes) -> bytearray:
        """The plaintext of ``sealed``, in a buffer the caller wipes."""
        return await self._run(["decrypt", f"--name={name}", "-", "-"], sealed)

    async def _run(self, args: list[str], data: bytes | bytearray) -> bytearray:
        executable = shutil.which("systemd-creds")
        what = f"systemd-creds {args[0]}" + (f" --with-key={self.key}" if args[0] == "encrypt" else "")
        if executable is None:
            raise SealingUnavailable("systemd-creds is not installed (it comes with systemd 250 or later)")
        try:
            code, output, errors = await asyncio.wait_for(_exchange([executable, *args], data), TIMEOUT)
        except TimeoutError:
            raise SealingUnavailable(f"{what} did not finish within {TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise SealingUnavailable(f"{what} could not run: {exc.strerror or exc}") from None
        if code != 0:
            _wipe(output)
            lines = [line for line in errors.splitlines() if line.strip() and _NOT_ENCRYPTED_MEDIA not in line]
            reason = lines[-1].strip() if lines else f"exit status {code}"
            raise SealingUnavailable(f"{what} failed: {reason}")
        return output


def _wipe(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


async def _exchange(argv: list[str], data: bytes | bytearray) -> tuple[int, bytearray, str]:
    """Run ``argv`` with ``data`` on its stdin; (exit status, stdout in a wipeable buffer, stderr).

    Our own pipes rather than asyncio's: its stream reader would hand stdout back as ``bytes``.
    """
    loop = asyncio.get_running_loop()
    in_read, in_write = os.pipe2(os.O_CLOEXEC)
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    mine = {in_write, out_read}
    try:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=in_read, stdout=out_write, stderr=asyncio.subprocess.PIPE
            )
        finally:
            os.close(in_read)
            os.close(out_write)
        for fd in mine:
            os.set_blocking(fd, False)
        buffer = bytearray(MAX_OUTPUT)

        async def feed() -> None:
            try:
                await _write_all(loop, in_write, data)
            finally:  # the end of its input
                os.close(in_write)
                mine.discard(in_write)

        try:
            assert process.stderr is not None
            _, length, errors = await asyncio.gather(
                feed(), _read_all(loop, out_read, buffer), process.stderr.read(MAX_OUTPUT)
            )
            code = await process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
            _wipe(buffer)
            raise
        output = buffer[:length]
        _wipe(buffer)
        return code, output, errors.decode("utf-8", "replace")
    finally:
        for fd in mine:
            os.close(fd)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Until ``fd`` is readable (or writable)."""
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    add: Callable[..., None] = loop.add_writer if write else loop.add_reader
    remove: Callable[[int], bool] = loop.remove_writer if write else loop.remove_reader
    add(fd, wake)
    try:
        await future
    finally:
        remove(fd)


async def _write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes | bytearray) -> None:
    """All of ``data`` into the pipe ``fd``, without a copy of it."""
    view = memoryview(data)
    try:
        done = 0
        while done < len(view):
            try:
                done += os.write(fd, view[done:])
            except BlockingIOError:
                await _ready(loop, fd, write=True)
            except BrokenPipeError:
                return  # it stopped reading: its exit status and stderr say why
    finally:
        view.release()


async def _read_all(loop: asyncio.AbstractEventLoop, fd: int, buffer: bytearray) -> int:
    """Read the pipe ``fd`` into ``buffer`` until EOF; returns the length read."""
    view = memoryview(buffer)
    try:
        length = 0
        while True:
            if length == len(view):
                raise SealingUnavailable(f"systemd-creds wrote more than {len(view)} octets")
            try:
                count = os.readv(fd, [view[length:]])
            except BlockingIOError:
                await _ready(loop, fd, write=False)
                continue
            if count == 0:
                return length
            length += count
    finally:
        view.release()
