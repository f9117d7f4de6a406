"""The NAF's key cache honours key expiry and stays bounded (mn_secd.naf.cache)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mn_secd.naf.cache import NafKeyCache
from mn_secd.naf.zn import ZnAnswer

T0 = datetime(2030, 1, 1, tzinfo=UTC)
NAF_X = b"x.example\x01\x00\x01\xc0\xa8"
NAF_Y = b"y.example\x01\x00\x01\xc0\xa8"


def answer(btid: str, expires: datetime, nid: bytes = NAF_X) -> ZnAnswer:
    return ZnAnswer(btid, nid, bytes(32), expires, "impi@example", "3G_GBA")


def test_entry_lives_until_its_expiry_and_not_a_moment_longer() -> None:
    cache = NafKeyCache()
    assert cache.put(answer("a@b", T0 + timedelta(seconds=60)), T0)
    assert cache.get("a@b", NAF_X, T0 + timedelta(seconds=59.999)) is not None
    assert cache.get("a@b", NAF_X, T0 + timedelta(seconds=60)) is None
    assert len(cache) == 0  # dropped on the way, not kept around


def test_already_expired_answer_is_not_kept() -> None:
    cache = NafKeyCache()
    assert not cache.put(answer("a@b", T0), T0)
    assert len(cache) == 0


def test_key_is_per_btid_and_naf_id() -> None:
    cache = NafKeyCache()
    cache.put(answer("a@b", T0 + timedelta(hours=1)), T0)
    assert cache.get("a@b", NAF_Y, T0) is None
    assert cache.get("other@b", NAF_X, T0) is None
    cache.put(answer("a@b", T0 + timedelta(hours=1), NAF_Y), T0)
    assert len(cache) == 2


def test_full_cache_drops_expired_entries_first_then_least_recently_used() -> None:
    cache = NafKeyCache(max_entries=3)
    cache.put(answer("old@b", T0 + timedelta(seconds=10)), T0)
    cache.put(answer("a@b", T0 + timedelta(hours=1)), T0)
    cache.put(answer("b@b", T0 + timedelta(hours=1)), T0)
    later = T0 + timedelta(seconds=20)
    cache.put(answer("c@b", T0 + timedelta(hours=1)), later)  # "old" has expired: it goes, not "a"
    assert {cache.get(b, NAF_X, later) is not None for b in ("a@b", "b@b", "c@b")} == {True}
    assert cache.get("a@b", NAF_X, later) is not None  # touch "a": "b" is now least recently used
    cache.put(answer("d@b", T0 + timedelta(hours=1)), later)
    assert cache.get("b@b", NAF_X, later) is None
    assert cache.get("a@b", NAF_X, later) is not None
    assert len(cache) == 3


def test_answer_repr_hides_the_key() -> None:
    a = ZnAnswer("a@b", NAF_X, b"\x42" * 32, T0, None, None)
    assert "key=" not in repr(a)
    assert "BBBBBBBB" not in repr(a)
