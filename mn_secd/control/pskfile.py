"""PSK files (and the SIM PIN's file): read verbatim, and refused when anyone but their owner could
read or replace them.

The checks follow OpenSSH's ``StrictModes`` for key files: the file must be a regular file owned by
the user reading it (the daemon's, or the AE's) or by root, and nobody else may read or write it:
no group or other permission bits, and no POSIX ACL entry for another user or a group. Every
directory on the way to it must be owned by that user or root and not writable by group or others
(a sticky directory such as ``/tmp`` excepted), since whoever may write a directory may swap the
file. systemd's credentials (``LoadCredential=``) pass: their files are owned by root (or the
service user) with mode 0400 and at most an ACL entry granting the service user read access, in a
directory only that user and root may enter.

The decisions are pure functions of ``stat`` results and the ACL bytes; :func:`read_psk_file`
gathers those from the open file and its directories.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from mn_secd.dtls import MAX_PSK_LENGTH
from mn_secd.errors import ConfigError

#: The extended attribute holding a file's access ACL (Linux), and its tags (acl/acl_ea.h).
ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def access_problem(mode: int, acl: bytes | None, uid: int, what: str = "the PSK file") -> str | None:
    """Why someone other than the owner (and ``uid``) may access a file, or None.

    ``acl`` is the raw ``system.posix_acl_access`` value, if the file has one: then the group bits
    of ``mode`` are the ACL mask, and what counts is the entries (a named entry for ``uid`` itself,
    as systemd adds for a service user, is fine).
    """
    if acl is None:
        if mode & 0o077:
            return f"{what} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        return None
    entries = parse_acl(acl)
    if entries is None:
        return f"{what} has an ACL that cannot be read; remove it (setfacl -b)"
    mask = next((perm for tag, perm, _ in entries if tag == _MASK), 0o7)
    for tag, perm, qualifier in entries:
        if tag == _OTHER and perm:
            return f"others may access {what}; chmod 600 it"
        if tag in (_GROUP_OBJ, _GROUP) and perm & mask:
            return f"a group may access {what} (ACL); chmod 600 it and remove group entries (setfacl -b)"
        if tag == _USER and qualifier != uid and perm & mask:
            return f"user {qualifier} may access {what} (ACL); remove that entry (setfacl -x u:{qualifier})"
    return None


def parse_acl(value: bytes) -> list[tuple[int, int, int]] | None:
    """(tag, permissions, qualifier) entries of a Linux ACL xattr, or None if it is not one."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
        return None
    return [struct.unpack_from("<HHI", value, offset) for offset in range(4, len(value), 8)]


def owner_problem(owner: int, uid: int, what: str) -> str | None:
    """Why a file or directory owned by ``owner`` may not be trusted by ``uid``, or None."""
    if owner not in (uid, 0):
        return f"{what} is owned by uid {owner}, neither this user (uid {uid}) nor root"
    return None


def directory_problem(mode: int, owner: int, uid: int, directory: str) -> str | None:
    """Why a directory on the way to a PSK file lets others replace it, or None."""
    problem = owner_problem(owner, uid, f"the directory {directory}")
    if problem is not None:
        return problem
    if mode & 0o022 and not mode & stat.S_ISVTX:
        return (
            f"the directory {directory} is writable by group or others (mode {stat.S_IMODE(mode):04o}); chmod go-w it"
        )
    return None


def file_problem(fd: int, path: Path, what: str = "the PSK file") -> str | None:
    """Everything above, for an open PSK file (or ``what`` else) and the directories on the way to it."""
    uid = os.geteuid()
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return f"{what} is not a regular file"
    problem = owner_problem(st.st_uid, uid, what)
    if problem is not None:
        return f"{problem}; chown it"
    try:
        acl: bytes | None = os.getxattr(fd, ACL_XATTR)
    except OSError:  # no ACL (ENODATA), or a file system without them
        acl = None
    problem = access_problem(st.st_mode, acl, uid, what)
    if problem is not None:
        return problem
    for directory in Path(os.path.realpath(path)).parents:
        dst = os.stat(directory)
        problem = directory_problem(dst.st_mode, dst.st_uid, uid, str(directory))
        if problem is not None:
            return problem
    return None


def read_psk_file(path: Path, key: str = "psk_file") -> bytes:
    """Read a PSK file verbatim (1 to 64 octets), refusing it on any of the problems above."""
    psk = read_secret_file(path, key, what="the PSK file", limit=MAX_PSK_LENGTH + 1)
    if not 1 <= len(psk) <= MAX_PSK_LENGTH:
        size = "empty" if not psk else f"longer than {MAX_PSK_LENGTH} octets"
        raise ConfigError(str(path), key, f"the PSK file is {size}; a DTLS PSK here is 1 to {MAX_PSK_LENGTH} octets")
    return bytes(psk)


def read_secret_file(path: Path, key: str, *, what: str, limit: int) -> bytearray:
    """Up to ``limit`` octets of a secret's file (an AE's PSK, the SIM PIN), refused on any of the
    problems above (checked on the open file), in a buffer the caller can wipe."""
    file = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(file, key, f"cannot open {what}: {exc.strerror or exc}") from None
    try:
        problem = file_problem(fd, path, what)
        if problem is not None:
            raise ConfigError(file, key, problem)
        buffer = bytearray(limit)
        size = os.readv(fd, [buffer])
    finally:
        os.close(fd)
    del buffer[size:]
    return buffer
