"""Sealing a GBA_ME session before it reaches the disk: AES-256-GCM under the session-sealing key.

Why not ``systemd-creds`` from the daemon (as before): under the shipped unit the daemon is a
``DynamicUser``, which cannot read the host key (``/var/lib/systemd/credential.secret`` is root's),
and systemd 252 has no service that encrypts for unprivileged callers. So the work is split:

* **the session-sealing key** is 32 random octets made once, as root, by ``mn-secd setup-sealing``,
  which has ``systemd-creds encrypt`` (host key, TPM2 or both) seal them into
  ``/etc/credstore.encrypted/mn-secd-session-key``. Only systemd can open that file: it does so at
  each start of the unit (``LoadCredentialEncrypted=``, the line mn-secd-generator adds when
  ``[gba] persist_session`` is on and the file exists) into the service's private credentials
  directory, where :func:`load_session_key` reads it into a :class:`~mn_secd.secret.SecretBytes`;
* **the daemon seals the session itself** with that key (:class:`SessionSealer`): no subprocess
  per seal, and in the daemon the key only in that buffer (and, for the microseconds of one
  operation, in OpenSSL's cipher context, which OpenSSL clears when it frees it).

A sealed session (format 1) is ``MAGIC || not_after || nonce || ciphertext || tag``: ``not_after``
the session's expiry in whole Unix seconds (8 octets, big-endian), a random 96-bit nonce (NIST SP
800-38D 8.2.2 and 8.3: a gateway seals once per bootstrap, far below 2^32 seals per key), and
the 128-bit GCM tag. The associated data binds the format, a fixed name, the card's ICCID and
``not_after``: a blob opens only under its name, for the card it was sealed for, and (checked
before decrypting) not after its expiry. A blob of another gateway, sealed under another key, does
not open at all. Everything here is sans-IO but :func:`load_session_key`.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mn_secd.errors import SealingUnavailable, StoredSessionInvalid
from mn_secd.secret import SecretBytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The systemd credential holding the session-sealing key (its name in /etc/credstore.encrypted/
#: and in $CREDENTIALS_DIRECTORY; systemd-creds embeds it in the encrypted file).
SESSION_KEY_CREDENTIAL = "mn-secd-session-key"
#: Where ``mn-secd setup-sealing`` puts it: the first directory systemd searches for a
#: ``LoadCredentialEncrypted=`` given without a path (systemd.exec(5), "Credentials").
CREDSTORE = Path("/etc/credstore.encrypted")
#: AES-256.
KEY_LENGTH = 32
MAGIC = b"mn-secd sealed session 1\n"
NONCE_LENGTH = 12
TAG_LENGTH = 16
_NOT_AFTER = struct.Struct(">Q")
_HEADER = len(MAGIC) + _NOT_AFTER.size + NONCE_LENGTH
#: Largest sealed session read back; a sealed session is well under 2 KiB.
MAX_SEALED = 16384


class SessionSealer:
    """Seals and opens sessions under the session-sealing key, which it holds until :meth:`wipe`."""

    def __init__(self, key: SecretBytes, *, random: Callable[[int], bytes] = os.urandom) -> None:
        if len(key) != KEY_LENGTH:
            raise ValueError(f"the session-sealing key is {KEY_LENGTH} octets")
        self._key = key
        self._random = random
        # cryptography is imported when a sealer is made, not with this module: its Rust extension
        # carries its own OpenSSL and costs a daemon about 6.5 MB of RSS, which only a daemon that
        # seals (persist_session on, with the session-sealing key) should pay. The daemon makes its
        # sealer at start, so the import's time and any failure of it fall there, not on the event
        # loop at the first seal.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aesgcm: type[AESGCM] = AESGCM

    def seal(self, name: str, plaintext: bytes | bytearray, *, iccid: str, not_after: float) -> bytes:
        """The sealed blob of ``plaintext`` under ``name``, for the card ``iccid``, good until ``not_after``."""
        expiry = max(0, int(not_after))  # whole seconds, rounded down: the blob never outlives the session
        nonce = self._random(NONCE_LENGTH)
        header = MAGIC + _NOT_AFTER.pack(expiry) + nonce
        sealed = bytearray(len(plaintext) + TAG_LENGTH)
        self._cipher().encrypt_into(nonce, plaintext, _associated(name, iccid, expiry), sealed)
        return header + sealed  # not secret

    def unseal(self, name: str, blob: bytes, *, iccid: str, now: float) -> bytearray:
        """The plaintext of ``blob``, in a buffer the caller wipes; :class:`StoredSessionInvalid` if it
        is not a blob of ours, has expired, or does not open (another key, name or card, or altered)."""
        if len(blob) < _HEADER + TAG_LENGTH or not blob.startswith(MAGIC):
            raise StoredSessionInvalid("the sealed session is not in mn-secd's sealed format")
        (expiry,) = _NOT_AFTER.unpack_from(blob, len(MAGIC))
        if expiry <= now:
            raise StoredSessionInvalid("the sealed session's time has passed (it expired)")
        nonce = blob[len(MAGIC) + _NOT_AFTER.size : _HEADER]
        plaintext = bytearray(len(blob) - _HEADER - TAG_LENGTH)
        from cryptography.exceptions import InvalidTag  # loaded with AESGCM in __init__

        try:
            self._cipher().decrypt_into(nonce, blob[_HEADER:], _associated(name, iccid, expiry), plaintext)
        except InvalidTag:
            plaintext[:] = bytes(len(plaintext))  # decrypt_into has written it before checking the tag
            raise StoredSessionInvalid(
                "the sealed session does not open: sealed under another session-sealing key (another "
                "gateway, or a key made anew), for another card, or altered"
            ) from None
        return plaintext

    def wipe(self) -> None:
        self._key.wipe()

    @property
    def wiped(self) -> bool:
        return self._key.wiped

    def _cipher(self) -> AESGCM:
        if self._key.wiped:
            raise SealingUnavailable("the session-sealing key was wiped (the daemon is stopping)")
        # Lent, not copied: AESGCM keys OpenSSL's context from our buffer; the context goes with
        # the object at the end of the one operation.
        return self._aesgcm(self._key.lend())


def _associated(name: str, iccid: str, expiry: int) -> bytes:
    return MAGIC + name.encode() + b"\0" + iccid.encode() + b"\0" + _NOT_AFTER.pack(expiry)


def load_session_key(credentials_directory: str | None) -> SecretBytes:
    """The session-sealing key systemd handed the unit, from ``$CREDENTIALS_DIRECTORY``.

    :class:`SealingUnavailable` in one line saying what is missing and what to do: no credentials
    at all (not run by systemd, or the unit has no ``LoadCredentialEncrypted=`` line), no such
    credential, or a file that is not 32 octets only its owner may read.
    """
    setup = "run `mn-secd setup-sealing` as root, then `systemctl daemon-reload` and restart mn-secd"
    if not credentials_directory:
        raise SealingUnavailable(
            f"no session-sealing key: the daemon got no systemd credentials ($CREDENTIALS_DIRECTORY is unset); {setup}"
        )
    path = Path(credentials_directory) / SESSION_KEY_CREDENTIAL
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise SealingUnavailable(
                f"no session-sealing key: the unit has no credential {SESSION_KEY_CREDENTIAL}; {setup}"
            ) from None
        raise SealingUnavailable(f"the session-sealing key {path} cannot be read: {exc.strerror or exc}") from None
    buffer = bytearray(KEY_LENGTH + 1)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or info.st_uid not in (os.geteuid(), 0):
            raise SealingUnavailable(f"the session-sealing key {path} is not a file only its owner may read")
        length = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as raw, memoryview(buffer) as view:
            while length < len(buffer) and (count := raw.readinto(view[length:])):
                length += count
        if length != KEY_LENGTH:
            raise SealingUnavailable(
                f"the session-sealing key {path} is not {KEY_LENGTH} octets; make it anew with "
                "`mn-secd setup-sealing --force`"
            )
        del buffer[KEY_LENGTH:]  # the octet that proved nothing follows
        return SecretBytes(buffer)  # its own copy; this buffer is wiped below
    finally:
        buffer[:] = bytes(len(buffer))
        os.close(fd)
