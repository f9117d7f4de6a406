"""Where the session is kept across restarts: the state directory, sealing under the session-sealing key,
the keeper. (``mn-secd setup-sealing``, which makes the key with the real ``systemd-creds``, is
tested in test_setup_sealing.py; the key under the real systemd in tests/system/.)
"""

from __future__ import annotations

import asyncio
import os
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
from mn_secd.gba.sealing import MAGIC, SESSION_KEY_CREDENTIAL, SessionSealer, load_session_key
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

IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
ISIM_AID = bytes.fromhex("A0000000871004FFFFFFFF8907090000")
KS = bytes(range(200, 232))
RAND = bytes(range(16))
SEALING_KEY = bytes(range(32))
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


# --- sealing under the session-sealing key ----------------------------------------------------------------


def sealer(key: bytes = SEALING_KEY) -> SessionSealer:
    return SessionSealer(SecretBytes(key))


def test_sealing_round_trips_and_binds_the_name_the_card_and_the_time() -> None:
    plaintext = bytearray(b"record\n" + KS)
    now = time.time()
    sealed = sealer().seal("mn-secd-test", plaintext, iccid=IDENTITY.iccid, not_after=now + 60)
    assert KS not in sealed and b"record" not in sealed and IDENTITY.iccid.encode() not in sealed
    assert sealer().unseal("mn-secd-test", sealed, iccid=IDENTITY.iccid, now=now) == plaintext
    for name, iccid in (("another-name", IDENTITY.iccid), ("mn-secd-test", "89310150000000000026")):
        with pytest.raises(StoredSessionInvalid, match="does not open"):
            sealer().unseal(name, sealed, iccid=iccid, now=now)
    with pytest.raises(StoredSessionInvalid, match="time has passed"):
        sealer().unseal("mn-secd-test", sealed, iccid=IDENTITY.iccid, now=now + 61)
    # The expiry is in the clear beside the ciphertext, and bound to it: moving it breaks the seal.
    later = bytearray(sealed)
    later[len(MAGIC) : len(MAGIC) + 8] = (int(now) + 3600).to_bytes(8, "big")
    with pytest.raises(StoredSessionInvalid, match="does not open"):
        sealer().unseal("mn-secd-test", bytes(later), iccid=IDENTITY.iccid, now=now)
    for damaged in (sealed[:-1] + bytes([sealed[-1] ^ 1]), b"not sealed at all", sealed[:20]):
        with pytest.raises(StoredSessionInvalid):
            sealer().unseal("mn-secd-test", damaged, iccid=IDENTITY.iccid, now=now)


def test_each_seal_has_its_own_nonce() -> None:
    one, two = (sealer().seal("n", b"same", iccid="1", not_after=time.time() + 60) for _ in range(2))
    assert one != two


def test_a_session_sealed_under_another_key_does_not_open_and_its_plaintext_is_not_left() -> None:
    sealed = sealer().seal("n", b"record\n" + KS, iccid="1", not_after=time.time() + 60)
    other = sealer(bytes(range(100, 132)))
    with pytest.raises(StoredSessionInvalid, match="another session-sealing key"):
        other.unseal("n", sealed, iccid="1", now=time.time())


def test_a_wiped_key_seals_nothing() -> None:
    held = sealer()
    held.wipe()
    assert held.wiped
    with pytest.raises(SealingUnavailable, match="wiped"):
        held.seal("n", b"x", iccid="1", not_after=time.time() + 60)


def write_key(directory: Path, content: bytes = SEALING_KEY, mode: int = 0o400) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / SESSION_KEY_CREDENTIAL
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_the_key_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    write_key(tmp_path / "creds")
    key = load_session_key(str(tmp_path / "creds"))
    assert key.get() == SEALING_KEY and repr(key) == "SecretBytes(<32 octets>)"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, r"\$CREDENTIALS_DIRECTORY is unset\); run `mn-secd setup-sealing`"),
        (lambda d: d.mkdir(), "the unit has no credential mn-secd-session-key; run `mn-secd setup-sealing`"),
        (lambda d: write_key(d, SEALING_KEY[:16]), "is not 32 octets"),
        (lambda d: write_key(d, SEALING_KEY + b"\n"), "is not 32 octets"),
        (lambda d: write_key(d, mode=0o644), "not a file only its owner may read"),
    ],
    ids=["no-credentials", "no-key", "short", "long", "readable"],
)
def test_a_missing_or_wrong_key_is_refused_in_one_line(
    tmp_path: Path, setup: Callable[[Path], object], message: str
) -> None:
    directory = tmp_path / "creds"
    setup(directory)
    with pytest.raises(SealingUnavailable, match=message) as info:
        load_session_key(str(directory) if directory.exists() else None)
    assert "\n" not in str(info.value)


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


async def test_a_gba_me_session_is_sealed_never_written_in_the_clear_resumed_and_the_key_wiped(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer())
    kept = session(GbaMode.GBA_ME, ks=KS)
    keeper.remember(kept, 3600.0)
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == [SEALED_FILE]
    on_disk = (keeper.directory.path / SEALED_FILE).read_bytes()
    assert KS not in on_disk and KS.hex().encode() not in on_disk and kept.btid.encode() not in on_disk
    assert SEALING_KEY not in on_disk
    plain = sealer().unseal(CREDENTIAL_NAME, on_disk, iccid=IDENTITY.iccid, now=time.time())
    assert plain.endswith(b"\n" + KS)  # what was sealed: the record and Ks, nothing else

    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer())  # the next start
    recalled = await keeper.recall(Card(GbaBootstrapParams(b"", "", "")), IDENTITY, GbaMode.GBA_ME)  # type: ignore[arg-type]
    assert recalled is not None and recalled.session.ks is not None and recalled.session.ks.get() == KS
    assert recalled.session.btid == kept.btid

    keeper.forget("card removed")
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []
    assert keeper.sealer is not None and keeper.sealer.wiped  # aclose wiped the key


async def test_a_gba_me_session_sealed_on_another_gateway_or_for_another_card_is_not_resumed(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer())
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)
    await settle(keeper)
    on_disk = (keeper.directory.path / SEALED_FILE).read_bytes()
    other_gateway = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer(bytes(range(50, 82))))
    assert await other_gateway.recall(Card(GbaBootstrapParams(b"", "", "")), IDENTITY, GbaMode.GBA_ME) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []

    (keeper.directory.path / SEALED_FILE).write_bytes(on_disk)
    this_gateway = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer())
    other_card = replace(IDENTITY, iccid="89310150000000000026")
    assert await this_gateway.recall(Card(GbaBootstrapParams(b"", "", "")), other_card, GbaMode.GBA_ME) is None  # type: ignore[arg-type]
    assert os.listdir(keeper.directory.path) == []


async def test_without_a_sealing_key_a_sealed_session_is_dropped_at_start_and_nothing_is_kept(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"))
    (keeper.directory.path / SEALED_FILE).write_bytes(b"sealed by an earlier run")
    await keeper.drop_sealed()
    assert os.listdir(keeper.directory.path) == []
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []
    keeper.remember(session(), 3600.0)  # a GBA_U record, by contrast, is kept ...
    await settle(keeper)
    await keeper.drop_sealed()  # ... and not dropped
    assert os.listdir(keeper.directory.path) == [RECORD_FILE]


async def test_the_latest_wish_wins_and_a_superseded_plaintext_is_wiped(tmp_path: Path) -> None:
    keeper = SessionKeeper(StateDirectory.open(tmp_path / "state"), sealer())
    keeper.remember(session(GbaMode.GBA_ME, ks=KS), 3600.0)  # sealing starts ...
    keeper.remember(session(GbaMode.GBA_ME, ks=bytes(32), rand=bytes(16)), 3600.0)  # ... superseded at once
    pending = keeper._wish
    assert pending is not None and not isinstance(pending.data, bytes)
    keeper.forget("card removed")  # ... and that one is dropped before it was written
    assert pending.data == bytes(len(pending.data))
    await settle(keeper)
    assert os.listdir(keeper.directory.path) == []
