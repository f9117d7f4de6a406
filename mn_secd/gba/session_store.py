"""The session kept across restarts, in the daemon's state directory (systemd's ``StateDirectory=``).

One session at most, in one of two files:

* ``gba-session.json``: a GBA_U session's record (no secret: the card keeps Ks);
* ``gba-session.cred``: a GBA_ME session, record and Ks sealed under the session-sealing key
  (:mod:`mn_secd.gba.sealing`), written only with ``[gba] persist_session = true`` and that key.

Files are replaced atomically (a temporary file, fsync, rename) under an exclusive ``flock`` on the
directory, which ``mn-secd forget`` takes too, so forgetting while the daemon runs never races a
write. The directory must be ours and writable by nobody else, as ``StateDirectory=`` makes it.

:class:`SessionKeeper` is what the keystore talks to: :meth:`~SessionKeeper.recall` at start-up,
:meth:`~SessionKeeper.remember` after each bootstrap, :meth:`~SessionKeeper.forget` when the session
ends for good (the card removed or changed, Ks expired). Writing happens in the background, in
order, the latest wish winning, so a bootstrap never waits for the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mn_secd.card_identity import CardIdentity
from mn_secd.errors import MnSecdError, StoredSessionInvalid
from mn_secd.gba.continuity import (
    MAX_RECORD,
    SessionRecord,
    card_refusal,
    decode_record,
    encode_record,
    identity_refusal,
    open_payload,
    record_of,
    seal_payload,
)
from mn_secd.gba.sealing import MAX_SEALED, SessionSealer
from mn_secd.gba.session import BootstrapSession
from mn_secd.interfaces import CardAccess
from mn_secd.logs import btid_hash
from mn_secd.naf_keys import GbaMode

log = logging.getLogger(__name__)

RECORD_FILE = "gba-session.json"
SEALED_FILE = "gba-session.cred"
SESSION_FILES = (RECORD_FILE, SEALED_FILE)
#: The name sealed into the blob (its associated data): it opens under no other.
CREDENTIAL_NAME = "mn-secd-gba-session"
_TEMPORARY_PREFIX = ".tmp-"
#: Seconds a writer waits for the directory's lock (``mn-secd forget`` holds it for milliseconds).
LOCK_TIMEOUT = 5.0


class StateDirectory:
    """The directory that holds the kept session; :meth:`open` checks it (and makes it if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path) -> StateDirectory:
        """``path``, made (mode 0700) if it does not exist; :class:`StoredSessionInvalid` if it is
        not a directory of ours that nobody else may write to."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoredSessionInvalid(f"state directory {path}: cannot be made: {exc.strerror or exc}") from None
        info = os.stat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise StoredSessionInvalid(f"state directory {path}: not a directory")
        if info.st_uid != os.geteuid():
            raise StoredSessionInvalid(f"state directory {path}: owned by uid {info.st_uid}, not by this user")
        if info.st_mode & 0o022:
            raise StoredSessionInvalid(f"state directory {path}: writable by group or others")
        directory = cls(path)
        with directory.locked():  # a write cut off by a crash or a power cut leaves its temporary file
            for entry in os.listdir(path):
                if entry.startswith(_TEMPORARY_PREFIX):
                    (path / entry).unlink(missing_ok=True)
        return directory

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """An exclusive ``flock`` on the directory: one writer (daemon or ``mn-secd forget``) at a time.

        Waits at most ``timeout`` seconds for another holder (a stuck one must not stop the daemon).
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoredSessionInvalid(
                            f"state directory {self.path}: another process has held its lock for {timeout:g} s"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    def read(self, name: str, limit: int) -> bytes | None:
        """The file's contents, None if it does not exist."""
        try:
            with open(self.path / name, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoredSessionInvalid(f"{self.path / name}: cannot be read: {exc.strerror or exc}") from None
        if len(data) > limit:
            raise StoredSessionInvalid(f"{self.path / name}: larger than {limit} octets")
        return data

    def replace(self, name: str, data: bytes) -> None:
        """``name`` holds ``data`` (mode 0600) and no other session file is left; atomic, durable."""
        temporary = self.path / f"{_TEMPORARY_PREFIX}{name}"
        with self.locked():
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path / name)
            for other in SESSION_FILES:
                if other != name:
                    (self.path / other).unlink(missing_ok=True)
            self._sync()

    def remove(self) -> list[str]:
        """Remove every session file; returns the names that were there."""
        removed = []
        with self.locked():
            for name in SESSION_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
                    removed.append(name)
            if removed:
                self._sync()
        return removed

    def _sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class Recalled:
    """A stored session that passed every check but the planner's time rules."""

    record: SessionRecord
    session: BootstrapSession


@dataclass(slots=True)
class _Save:
    name: str
    data: bytes | bytearray  # the record (GBA_U), or the plaintext to seal (GBA_ME): wiped after use
    btid: str
    iccid: str
    not_after: float

    def wipe(self) -> None:
        if isinstance(self.data, bytearray):
            self.data[:] = bytes(len(self.data))


@dataclass(frozen=True, slots=True)
class _Remove:
    reason: str


class SessionKeeper:
    """Keeps the keystore's session for the next start, in ``directory``.

    ``sealer`` is given when GBA_ME sessions may be kept (``[gba] persist_session``, with the
    session-sealing key systemd handed the daemon); the keeper owns it and wipes its key on
    :meth:`aclose`. Without it only GBA_U sessions are kept, and a sealed session is removed unread
    (:meth:`drop_sealed` at start, else :meth:`recall`).
    """

    def __init__(self, directory: StateDirectory, sealer: SessionSealer | None = None) -> None:
        self.directory = directory
        self.sealer = sealer
        self._wish: _Save | _Remove | None = None
        self._worker: asyncio.Task[None] | None = None

    async def drop_sealed(self) -> None:
        """Without a sealer, remove a sealed session left by an earlier run: it can never be opened."""
        if self.sealer is None and (self.directory.path / SEALED_FILE).exists():
            await self._remove()

    async def recall(self, card: CardAccess, identity: CardIdentity, mode: GbaMode | None) -> Recalled | None:
        """The stored session if it may be resumed with this card and mode policy, else None (and
        whatever was stored is removed: it never becomes valid again)."""
        session: BootstrapSession | None = None
        try:
            if self.sealer is None and (self.directory.path / SEALED_FILE).exists():
                raise StoredSessionInvalid("a GBA_ME session was kept, and sealing is off now")
            record, session = await self._load(identity.iccid)
            if record is None:
                return None
            refusal = identity_refusal(record, identity, mode)
            if refusal is None and record.mode is GbaMode.GBA_U:
                refusal = card_refusal(record, await card.read_gba_bootstrap_params())
            if refusal is not None:
                raise StoredSessionInvalid(refusal)
        except MnSecdError as exc:
            if session is not None:
                session.wipe()
            log.info(
                "stored session not resumed: %s",
                exc,
                extra={"event": "gba.resume_refused", "kind": exc.kind},
            )
            await self._remove()
            return None
        assert session is not None
        return Recalled(record, session)

    async def _load(self, iccid: str) -> tuple[SessionRecord | None, BootstrapSession | None]:
        plain = await asyncio.to_thread(self.directory.read, RECORD_FILE, MAX_RECORD)
        sealed = await asyncio.to_thread(self.directory.read, SEALED_FILE, MAX_SEALED)
        if plain is not None and sealed is not None:
            raise StoredSessionInvalid("two stored sessions, a plain and a sealed one")
        if plain is not None:
            record = decode_record(plain)
            if record.mode is not GbaMode.GBA_U:
                raise StoredSessionInvalid("a GBA_ME session was stored unsealed")
            return record, record.session()
        if sealed is not None:
            assert self.sealer is not None
            record, ks = open_payload(self.sealer.unseal(CREDENTIAL_NAME, sealed, iccid=iccid, now=time.time()))
            return record, record.session(ks)
        return None, None

    def remember(self, session: BootstrapSession, lifetime: float) -> None:
        """Keep ``session`` (GBA_U; GBA_ME when sealing is on), replacing whatever was kept."""
        record = record_of(session, lifetime)
        if session.mode is GbaMode.GBA_U:
            wish: _Save | _Remove = _Save(RECORD_FILE, encode_record(record), session.btid, session.iccid, 0.0)
        elif self.sealer is not None and session.ks is not None and not session.ks.wiped:
            payload = seal_payload(record, session.ks)
            wish = _Save(SEALED_FILE, payload, session.btid, session.iccid, session.expires.timestamp())
        else:
            wish = _Remove("a GBA_ME session is kept only sealed (persist_session, with the session-sealing key)")
        self._want(wish)

    def forget(self, reason: str) -> None:
        """The session ended for good: nothing is kept any more."""
        self._want(_Remove(reason))

    async def aclose(self) -> None:
        """Let the last wish reach the disk (the caller bounds the wait); wipe what is left, and the key."""
        try:
            if self._worker is not None:
                await asyncio.shield(self._worker)
        finally:
            if isinstance(self._wish, _Save):
                self._wish.wipe()
            self._wish = None
            if self.sealer is not None:
                self.sealer.wipe()

    def _want(self, wish: _Save | _Remove) -> None:
        if isinstance(self._wish, _Save):
            self._wish.wipe()  # superseded before it was written
        self._wish = wish
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="mn-secd-session-store")

    async def _work(self) -> None:
        while self._wish is not None:
            wish, self._wish = self._wish, None
            try:
                if isinstance(wish, _Remove):
                    if await self._remove():
                        log.info("stored session removed: %s", wish.reason, extra={"event": "gba.session_forgotten"})
                    continue
                data = wish.data
                if wish.name == SEALED_FILE:
                    assert self.sealer is not None
                    data = self.sealer.seal(CREDENTIAL_NAME, wish.data, iccid=wish.iccid, not_after=wish.not_after)
                await asyncio.to_thread(self.directory.replace, wish.name, bytes(data))
                log.debug(
                    "session stored",
                    extra={"event": "gba.session_stored", "btid_hash": btid_hash(wish.btid), "file": wish.name},
                )
            except (MnSecdError, OSError) as exc:
                # The next start bootstraps; a file we could not replace must not be resumed either.
                log.warning("the session could not be stored: %s", exc, extra={"event": "gba.store_failed"})
                await self._remove()
            finally:
                if isinstance(wish, _Save):
                    wish.wipe()

    async def _remove(self) -> list[str]:
        """Every session file removed; a directory that refuses is logged (the next start checks again)."""
        try:
            return await asyncio.to_thread(self.directory.remove)
        except (MnSecdError, OSError) as exc:
            log.warning("the stored session could not be removed: %s", exc, extra={"event": "gba.store_failed"})
            return []
