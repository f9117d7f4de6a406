"""mn_secd.control.pskfile: PSK files others could read or replace are refused, as sshd's StrictModes would.

Real files and directories under tmp_path (the tests run as root, so they can hand files to other
users); the ACL cases set the same extended attribute setfacl (and systemd) would.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from mn_secd.config import load_config
from mn_secd.control.pskfile import access_problem, directory_problem, parse_acl, read_psk_file
from mn_secd.errors import ConfigError

OTHER_UID = 65534  # nobody
ME = os.geteuid()


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


UNDEFINED = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def systemd_acl(uid: int) -> bytes:
    """What systemd gives a credential file: 0400 plus read access for the service user."""
    return acl(
        (USER_OBJ, 4, UNDEFINED), (USER, 4, uid), (GROUP_OBJ, 0, UNDEFINED), (MASK, 4, UNDEFINED), (OTHER, 0, UNDEFINED)
    )


def psk(directory: Path, name: str = "ae.psk", mode: int = 0o600, content: bytes = b"secret-psk") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(content)
    path.chmod(mode)
    return path


# --- the decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o100600])
def test_owner_only_modes_pass(mode: int) -> None:
    assert access_problem(mode, None, ME) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o610, 0o601])
def test_group_or_other_bits_are_refused(mode: int) -> None:
    assert f"mode {mode:04o}" in (access_problem(mode, None, ME) or "")


def test_acls_name_who_else_may_read() -> None:
    assert access_problem(0o440, systemd_acl(1234), 1234) is None  # the service user itself
    assert "user 1234 may access" in (access_problem(0o440, systemd_acl(1234), 0) or "")
    with_group = acl(
        (USER_OBJ, 6, UNDEFINED), (GROUP_OBJ, 0, UNDEFINED), (GROUP, 4, 50), (MASK, 4, UNDEFINED), (OTHER, 0, UNDEFINED)
    )
    assert "a group may access" in (access_problem(0o640, with_group, ME) or "")
    masked = acl(
        (USER_OBJ, 6, UNDEFINED),
        (USER, 4, 1234),
        (GROUP_OBJ, 4, UNDEFINED),
        (MASK, 0, UNDEFINED),
        (OTHER, 0, UNDEFINED),
    )
    assert access_problem(0o600, masked, ME) is None  # the mask takes their access away
    assert "cannot be read" in (access_problem(0o600, b"\x01\x00\x00\x00", ME) or "")
    assert parse_acl(b"junk") is None


def test_directories_must_be_ours_or_roots_and_not_writable_by_others() -> None:
    assert directory_problem(stat.S_IFDIR | 0o755, 0, ME, "/etc") is None
    assert directory_problem(stat.S_IFDIR | 0o1777, 0, ME, "/tmp") is None  # sticky
    assert "writable by group or others (mode 0777)" in (directory_problem(stat.S_IFDIR | 0o777, 0, ME, "/d") or "")
    assert "writable by group or others (mode 0775)" in (directory_problem(stat.S_IFDIR | 0o775, 0, ME, "/d") or "")
    assert "owned by uid 65534" in (directory_problem(stat.S_IFDIR | 0o700, OTHER_UID, 1000, "/d") or "")


# --- real files -----------------------------------------------------------------------------------------


def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = psk(tmp_path / "etc")
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(ConfigError, match=f"owned by uid {OTHER_UID}, neither this user .* nor root; chown it"):
        read_psk_file(path)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = psk(tmp_path / "shared")
    path.parent.chmod(mode)
    with pytest.raises(ConfigError, match=r"directory .*shared is writable by group or others"):
        read_psk_file(path)
    path.parent.chmod(mode | stat.S_ISVTX)  # sticky: others cannot replace our file
    assert read_psk_file(path) == b"secret-psk"


def test_a_directory_higher_up_counts_too(tmp_path: Path) -> None:
    path = psk(tmp_path / "open" / "deeper" / "still")
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ConfigError, match=r"directory .*open is writable"):
        read_psk_file(path)
    (tmp_path / "open").chmod(0o755)
    os.chown(tmp_path / "open" / "deeper", OTHER_UID, -1)
    with pytest.raises(ConfigError, match=r"directory .*deeper is owned by uid 65534"):
        read_psk_file(path)


def test_systemd_credentials_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$CREDENTIALS_DIRECTORY as systemd makes it: a 0700 directory, a 0400 file with the service user's ACL."""
    creds = tmp_path / "run-credentials" / "mn-secd.service"
    path = psk(creds, "ae1.psk", 0o400)
    creds.chmod(0o700)
    try:
        os.setxattr(path, "system.posix_acl_access", systemd_acl(ME))
    except OSError as exc:  # a file system without ACLs cannot hold such a file either
        pytest.skip(f"no POSIX ACLs on {tmp_path}: {exc.strerror}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o440  # the group bits are the ACL mask now
    assert read_psk_file(path) == b"secret-psk"
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "mn-secd.toml").write_text(
        "[modem]\nport = '/dev/null'\n[[ae]]\nidentity = 'ae1'\npsk_file = 'ae1.psk'\nnaf = ['n.example']\n"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_config(config_dir / "mn-secd.toml").aes[0].psk_file == path
    os.setxattr(path, "system.posix_acl_access", systemd_acl(ME + 1))  # someone else's credential
    with pytest.raises(ConfigError, match=f"user {ME + 1} may access the PSK file"):
        read_psk_file(path)


def test_the_config_names_the_key_for_every_refusal(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    path = psk(config_dir, "ae1.psk")
    (config_dir / "mn-secd.toml").write_text(
        "[modem]\nport = '/dev/null'\n[[ae]]\nidentity = 'ae1'\npsk_file = 'ae1.psk'\nnaf = ['n.example']\n"
    )
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(ConfigError) as info:
        load_config(config_dir / "mn-secd.toml")
    assert info.value.key == "ae[0].psk_file" and f"owned by uid {OTHER_UID}" in info.value.problem


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "ae.psk"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_psk_file(fifo)
