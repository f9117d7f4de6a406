"""Where the session is kept across restarts: the state directory, systemd-creds sealing, the keeper.

``systemd-creds`` is the real tool, with a host secret of the test's own (the ``host_secret``
fixture); its refusals are real too: a PATH without it, a host secret it cannot read.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mn_secd.card_identity import Application, CardEvent, CardIdentity, GbaBootstrapParams
from mn_secd.errors import SealingUnavailable, StoredSessionInvalid
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.sealing import CredsSealer
from mn_secd.gba.session import BootstrapSession
from mn_secd.gba.session_store import (
    CREDENTIAL_NAME,
    RECORD_FILE,
    SEALED_FILE,
    SessionKeeper,
    StateDirectory,
)
from mn_secd.naf_keys import GbaMode
from mn_secd.secret import SecretBytes

needs_creds = pytest.mark.skipif(shutil.which("systemd-creds") is None, reason="systemd-creds is not installed")

IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
ISIM_AID = bytes.fromhex("A0000000871004FFFFFFFF8907090000")
KS = bytes(range(200, 232))
RAND = bytes(range(16))
IDENTITY = CardIdentity(
    iccid="89882110000000000018",
    imsi="001010000000001",
    mnc_length=2,
    impi=IMPI,
    application=Application.ISIM,
    aid=ISIM_AID,
    gba_u=True,
    transport="cgla",
)


def session(mode: GbaMode = GbaMode.GBA_U, *, rand: bytes = RAND, ks: bytes | None = None) -> BootstrapSession:
    return BootstrapSession(
        iccid=IDENTITY.iccid,
        impi=IMPI,
        btid="b-tid-7@bsf.example",
        rand=rand,
        expires=datetime.now(UTC) + timedelta(hours=1),
        mode=mode,
        application_aid=ISIM_AID,
        ks=SecretBytes(ks) if ks is not None else None,
    )


class Card:
    """What the keeper asks of a card at start: EF_GBABP."""

    def __init__(self, gbabp: GbaBootstrapParams) -> None:
        self.gbabp = gbabp
        self.reads = 0

    async def read_gba_bootstrap_params(self) -> GbaBootstrapParams:
        self.reads += 1
        return self.gbabp

    def subscribe(self, callback: Callable[[CardEvent], None]) -> Callable[[], None]:
        raise AssertionError("not used")


def card_holding(s: BootstrapSession) -> Card:
    return Card(GbaBootstrapParams(s.rand, s.btid, format_lifetime(s.expires)))


# --- the state directory ---------------------------------------------------------------------------------


def test_the_directory_is_made_private_and_checked(tmp_path: Path) -> None:
    made = StateDirectory.open(tmp_path / "state")
    assert stat.S_IMODE(os.stat(made.path).st_mode) == 0o700
    (tmp_path / "state" / ".tmp-gba-session.json").write_text("cut off by a power cut")
    StateDirectory.open(tmp_path / "state")
    assert os.listdir(tmp_path / "state") == []  # a torn write is cleaned up
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(StoredSessionInvalid, match="writable by group or others"):
        StateDirectory.open(open_dir)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoredSessionInvalid, match="not a directory"):
        StateDirectory.open(tmp_path / "file")


def test_one_session_file_at_a_time_written_whole_and_private(tmp_path: Path) -> None:
    directory = StateDirectory.open(tmp_path / "state")
    directory.replace(SEALED_FILE, b"sealed")
    directory.replace(RECORD_FILE, b"record")
    assert sorted(os.listdir(directory.path)) == [RECORD_FILE]
    assert stat.S_IMODE(os.stat(directory.path / RECORD_FILE).st_mode) == 0o600
    assert directory.read(RECORD_FILE, 100) == b"record"
    with pytest.raises(StoredSessionInvalid, match="larger than 3 octets"):
        directory.read(RECORD_FILE, 3)
    assert directory.remove() == [RECORD_FILE] and directory.remove() == []


def test_forgetting_waits_for_a_write_in_progress(tmp_path: Path) -> None:
    """``mn-secd forget`` and the daemon take the same lock: a removal never interleaves with a write."""
    directory = StateDirectory.open(tmp_path / "state")
    removed: list[list[str]] = []
    with directory.locked():  # the daemon, halfway through writing
        (directory.path / RECORD_FILE).write_bytes(b"record")
        other = threading.Thread(target=lambda: removed.append(StateDirectory(directory.path).remove()))
        other.start()
        time.sleep(0.3)
        assert removed == [] and other.is_alive()
    other.join(5)
    assert removed == [[RECORD_FILE]]


def test_a_lock_held_too_long_is_an_error_not_a_hang(tmp_path: Path) -> None:
    directory = StateDirectory.open(tmp_path / "state")
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with StateDirectory(directory.path).locked():
            held.set()
            release.wait(10)

    other = threading.Thread(target=holder)
    other.start()
    try:
        assert held.wait(5)
        started = time.monotonic()
        with pytest.raises(StoredSessionInvalid, match=r"held its lock for 0\.3 s"), directory.locked(timeout=0.3):
            pass
        assert 0.3 <= time.monotonic() - started < 2.0
    finally:
        release.set()
        other.join(5)


# --- systemd-creds --------------------------------------------------------------------------------------


@needs_creds
async def test_sealing_round_trips_and_binds_the_name_and_the_time(host_secret: Path) -> None:
    sealer = CredsSealer("host")
    plaintext = bytearray(b"record\n" + KS)
    sealed = await sealer.seal("mn-secd-test", plaintext, not_after=time.time() + 60)
    assert KS not in sealed and b"record" not in sealed
    assert await sealer.unseal("mn-secd-test", sealed) == plaintext
    with pytest.raises(SealingUnavailable, match="does not match"):
        await sealer.unseal("another-name", sealed)
    expired = await sealer.seal("mn-secd-test", plaintext, not_after=time.time() + 1)
    await asyncio.sleep(2.1)
    with pytest.raises(SealingUnavailable, match="time passed"):
        await sealer.unseal("mn-secd-test", expired)


async def test_without_systemd_creds_sealing_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SealingUnavailable, match="systemd-creds is not installed") as info:
        await CredsSealer("host").seal("x", b"secret", not_after=time.time() + 60)
    assert "\n" not in str(info.value)


@needs_creds
async def test_a_host_key_systemd_creds_cannot_use_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host key systemd-creds cannot read or make (as a non-root service meets root's): it fails,
    and the one line says what systemd-creds said."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(tmp_path / "a-file" / "credential.secret"))
    with pytest.raises(SealingUnavailable, match=r"systemd-creds encrypt --with-key=host failed: .*host secret"):
        await CredsSealer("host").seal("x", b"secret", not_after=time.time() + 60)


# --- the keeper -----------------------------------------------------------------------------------------


async def settle(keeper: SessionKeeper) -> None:
    await asyncio.wait_for(keeper.aclose(), 10)


async def test_a_gba_u_session_is_kept_and_resumed_only_while_the_card_holds_it(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"))
    kept = session()
    keeper.remember(kept, 3600.0)
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == [RECORD_FILE]

    card = card_holding(kept)
    recalled = await keeper.recall(card, IDENTITY, GbaMode.GBA_U)  # type: ignore[arg-type]
    assert recalled is not None and card.reads == 1
    assert (recalled.session.btid, recalled.session.rand, recalled.session.mode) == (kept.btid, RAND, GbaMode.GBA_U)
    assert recalled.session.expires == kept.expires and recalled.record.lifetime == 3600.0

    # The card ran an AUTHENTICATE the daemon never finished: its RAND moved on. Not resumed, forgotten.
    card.gbabp = replace(card.gbabp, rand=bytes(16))
    assert await keeper.recall(card, IDENTITY, GbaMode.GBA_U) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []


async def test_another_card_is_refused_without_reading_it(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"))
    keeper.remember(session(), 3600.0)
    await settle(keeper)
    card = card_holding(session())
    other = replace(IDENTITY, iccid="89310150000000000026")
    assert await keeper.recall(card, other, GbaMode.GBA_U) is None  # type: ignore[arg-type]
    assert card.reads == 0 and os.listdir(keeper.directory.path) == []


async def test_a_damaged_record_is_refused_and_removed(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"))
    (keeper.directory.path / RECORD_FILE).write_bytes(b'{"version": 1, "mode"')
    assert await keeper.recall(card_holding(session()), IDENTITY, GbaMode.GBA_U) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []


async def test_without_persist_session_a_gba_me_session_never_reaches_the_disk(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"))
    keeper.remember(session(), 3600.0)
    await settle(keeper)
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)  # the next session: GBA_ME, and not kept
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []
    (keeper.directory.path / SEALED_FILE).write_bytes(b"left from a run with persist_session = true")
    assert await keeper.recall(card_holding(session()), IDENTITY, GbaMode.GBA_ME) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []


@needs_creds
async def test_a_gba_me_session_is_sealed_never_written_in_the_clear_and_resumed(
    tmp_path: Path, host_secret: Path
) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), CredsSealer("host"))
    await keeper.check_sealing(time.time())
    kept = session(GbaMode.GBA_ME, ks=KS)
    keeper.remember(kept, 3600.0)
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == [SEALED_FILE]
    on_disk = (keeper.directory.path / SEALED_FILE).read_bytes()
    assert KS not in on_disk and KS.hex().encode() not in on_disk and kept.btid.encode() not in on_disk
    plain = await CredsSealer().unseal(CREDENTIAL_NAME, on_disk)
    assert plain.endswith(b"\n" + KS)  # what was sealed: the record and Ks, nothing else

    recalled = await keeper.recall(Card(GbaBootstrapParams(b"", "", "")), IDENTITY, GbaMode.GBA_ME)  # type: ignore[arg-type]
    assert recalled is not None and recalled.session.ks is not None and recalled.session.ks.get() == KS
    assert recalled.session.btid == kept.btid

    keeper.forget("card removed")
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []


@needs_creds
async def test_a_gba_me_session_sealed_on_another_host_is_not_resumed(
    tmp_path: Path, host_secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), CredsSealer("host"))
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)
    await settle(keeper)
    other_host = tmp_path / "other.secret"
    other_host.write_bytes(os.urandom(4096))
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(other_host))
    assert await keeper.recall(Card(GbaBootstrapParams(b"", "", "")), IDENTITY, GbaMode.GBA_ME) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []


async def test_sealing_that_cannot_work_is_known_at_start_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), CredsSealer("host"))
    (keeper.directory.path / SEALED_FILE).write_bytes(b"sealed by an earlier run")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SealingUnavailable, match="not installed"):
        await keeper.check_sealing(time.time())
    assert keeper.sealer is None and os.listdir(keeper.directory.path) == []
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []


@needs_creds
async def test_the_latest_wish_wins_and_a_superseded_plaintext_is_wiped(tmp_path: Path, host_secret: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), CredsSealer("host"))
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)  # sealing starts ...
    keeper.remember(session(GbaMode.GBA_ME, ks=bytes(32), rand=bytes(16)), 3600.0)  # ... superseded at once
    pending = keeper._wish
    assert pending is not None and not isinstance(pending.data, bytes)
    keeper.forget("card removed")  # ... and that one is dropped before it was written
    assert pending.data == bytes(len(pending.data))
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []
