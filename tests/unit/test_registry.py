"""mn_secd.control.registry: PSK files, access lists, and the live credentials map."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mn_secd.config import AeConfig, load_config
from mn_secd.control.registry import AeRegistry, RegistryCredentials, load_registry, naf_matches, read_psk_file
from mn_secd.errors import ConfigError, NotAuthorised
from mn_secd.ua import UaId


def psk_file(tmp_path: Path, name: str, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def ae(tmp_path: Path, identity: str = "ae1", **kw: object) -> AeConfig:
    fields: dict[str, object] = {
        "identity": identity,
        "psk_file": psk_file(tmp_path, f"{identity}.psk", f"psk-{identity}".encode()),
        "naf": ("in-cse.example.net", "*.iot.example.org"),
        "ua": ("dtls-psk",),
        "may_force_bootstrap": False,
    }
    fields.update(kw)
    return AeConfig(**fields)  # type: ignore[arg-type]


def test_entries_from_config(tmp_path: Path) -> None:
    registry = load_registry([ae(tmp_path, "ae1", may_force_bootstrap=True), ae(tmp_path, "ae2")])
    assert len(registry) == 2
    entry = registry.authenticate("ae1")
    assert entry.psk == b"psk-ae1"
    assert entry.ua_ids == (UaId.dtls_psk(),)
    assert entry.may_force_bootstrap
    assert "psk-ae1" not in repr(entry) and "psk=" not in repr(entry)


def test_psk_is_read_verbatim(tmp_path: Path) -> None:
    assert read_psk_file(psk_file(tmp_path, "text", b"secret\n")) == b"secret\n"
    assert read_psk_file(psk_file(tmp_path, "binary", bytes(range(16)))) == bytes(range(16))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o610])
def test_psk_file_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = psk_file(tmp_path, "loose.psk", b"secret", mode)
    with pytest.raises(ConfigError) as info:
        load_registry([ae(tmp_path, psk_file=path)])
    assert info.value.file == str(path)
    assert info.value.key == "ae[ae1].psk_file"
    assert f"mode {mode:04o}" in info.value.problem


@pytest.mark.parametrize(
    ("content", "problem"), [(b"", "empty"), (b"x" * 65, "longer than 64 octets")], ids=["empty", "too-long"]
)
def test_psk_length_is_checked(tmp_path: Path, content: bytes, problem: str) -> None:
    path = psk_file(tmp_path, "bad.psk", content)
    with pytest.raises(ConfigError, match=problem) as info:
        read_psk_file(path)
    assert "x" * 17 not in str(info.value)


def test_a_psk_as_long_as_a_naf_key_and_beyond_is_accepted(tmp_path: Path) -> None:
    for length in (32, 64):
        assert read_psk_file(psk_file(tmp_path, f"k{length}.psk", b"k" * length)) == b"k" * length


def test_psk_file_must_exist_and_be_regular(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        read_psk_file(tmp_path / "missing.psk")
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_psk_file(directory)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("in-cse.example.net", "in-cse.example.net", True),
        ("in-cse.example.net", "other.example.net", False),
        ("*.example.org", "a.example.org", True),
        ("*.example.org", "a.b.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "badexample.org", False),
        ("*.example.org", "a.example.org.evil.net", False),
    ],
)
def test_naf_patterns(pattern: str, name: str, expected: bool) -> None:
    assert naf_matches(pattern, name) is expected


def test_patterns_are_normalised(tmp_path: Path) -> None:
    registry = load_registry([ae(tmp_path, naf=("IN-CSE.Example.NET.", "*.IoT.example.org"))])
    assert registry.authenticate("ae1").naf_patterns == ("in-cse.example.net", "*.iot.example.org")


def test_authorisation(tmp_path: Path) -> None:
    registry = load_registry([ae(tmp_path, "ae1", ua=("dtls-psk", "010001c0a4")), ae(tmp_path, "ae2")])
    assert registry.authorise_key("ae1", "in-cse.example.net", UaId.dtls_psk()).identity == "ae1"
    assert registry.authorise_key("ae1", "meter.iot.example.org", UaId.parse("tls:C0A4")).identity == "ae1"
    with pytest.raises(NotAuthorised, match=r"not authorised for NAF other\.example\.net"):
        registry.authorise_key("ae1", "other.example.net", UaId.dtls_psk())
    with pytest.raises(NotAuthorised, match="Ua protocol 0100000002"):
        registry.authorise_key("ae1", "in-cse.example.net", UaId.http_digest())
    with pytest.raises(NotAuthorised, match="not a registered AE"):
        registry.authorise_key("mallory", "in-cse.example.net", UaId.dtls_psk())
    with pytest.raises(NotAuthorised, match="not a registered AE"):
        registry.authorise_key(None, "in-cse.example.net", UaId.dtls_psk())
    with pytest.raises(NotAuthorised, match="may not force"):
        registry.authorise_bootstrap("ae2")


@pytest.mark.parametrize(
    ("override", "key", "problem"),
    [
        ({"naf": ("not a host",)}, "ae[ae1].naf[0]", "host name"),
        ({"naf": ("*",)}, "ae[ae1].naf[0]", "host name"),
        ({"ua": ("tls:zzzz",)}, "ae[ae1].ua[0]", "cipher suite"),
        ({"identity": "x" * 129}, "ae[" + "x" * 129 + "].identity", "1 to 128 octets"),
    ],
)
def test_bad_entries_name_the_key(tmp_path: Path, override: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        load_registry([ae(tmp_path, **override)], source="/etc/mn-secd/mn-secd.toml")
    assert info.value.key == key
    assert info.value.file == "/etc/mn-secd/mn-secd.toml"


def test_duplicate_identity_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        load_registry([ae(tmp_path, "ae1"), ae(tmp_path, "ae1")])


def test_credentials_follow_the_live_registry(tmp_path: Path) -> None:
    first = load_registry([ae(tmp_path, "ae1")])
    credentials = RegistryCredentials(first)
    assert credentials  # never falsy, although it holds no entries of its own
    assert credentials.find_dtls_psk(b"ae1") == (b"psk-ae1", "ae1")
    for unknown in (b"ae2", b"\xff\xfe"):
        with pytest.raises(KeyError):
            credentials.find_dtls_psk(unknown)
    second = AeRegistry([])
    credentials.registry = second
    with pytest.raises(KeyError):
        credentials.find_dtls_psk(b"ae1")


def test_stale_identities_on_reload(tmp_path: Path) -> None:
    old = load_registry([ae(tmp_path, "keep"), ae(tmp_path, "rekey"), ae(tmp_path, "drop"), ae(tmp_path, "acl")])
    rekeyed = ae(tmp_path, "rekey", psk_file=psk_file(tmp_path, "new.psk", b"new-psk"))
    new = load_registry([ae(tmp_path, "keep"), rekeyed, ae(tmp_path, "acl", naf=("x.example.net",))])
    assert old.stale_identities(new) == {"rekey", "drop", "acl"}


def test_from_a_real_config_file(tmp_path: Path) -> None:
    psk_file(tmp_path, "metering.psk", bytes(range(1, 17)))
    (tmp_path / "mn-secd.toml").write_text(
        '[modem]\nport = "/dev/null"\n\n'
        '[[ae]]\nidentity = "ae-metering"\npsk_file = "metering.psk"\nnaf = ["in-cse.example.net"]\n'
        "may_force_bootstrap = true\n"
    )
    config = load_config(tmp_path / "mn-secd.toml")
    registry = load_registry(config.aes, source=str(config.path))
    entry = registry.authorise_key("ae-metering", "in-cse.example.net", UaId.dtls_psk())
    assert entry.psk == bytes(range(1, 17))
    assert registry.authorise_bootstrap("ae-metering") is entry
