"""The stored session's format and the resume rules beyond time (mn_secd.gba.continuity), without I/O."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mn_secd.card_identity import Application, CardIdentity, GbaBootstrapParams
from mn_secd.errors import StoredSessionInvalid
from mn_secd.gba.bsfxml import format_lifetime
from mn_secd.gba.continuity import (
    SessionRecord,
    card_refusal,
    decode_record,
    encode_record,
    identity_refusal,
    open_payload,
    record_of,
    seal_payload,
)
from mn_secd.gba.planner import BootstrapPlanner, BootstrapTiming, StartAction
from mn_secd.naf_keys import GbaMode
from mn_secd.secret import SecretBytes

IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
ISIM_AID = bytes.fromhex("A0000000871004FFFFFFFF8907090000")
RAND = bytes(range(16))
EXPIRES = datetime(2031, 5, 4, 3, 2, 1, 500000, tzinfo=UTC)
KS = bytes(range(100, 132))


def identity(**changes: object) -> CardIdentity:
    base = CardIdentity(
        iccid="89882110000000000018",
        imsi="001010000000001",
        mnc_length=2,
        impi=IMPI,
        application=Application.ISIM,
        aid=ISIM_AID,
        gba_u=True,
        transport="cgla",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def record(**changes: object) -> SessionRecord:
    base = SessionRecord(
        mode=GbaMode.GBA_U,
        iccid="89882110000000000018",
        impi=IMPI,
        application_aid=ISIM_AID,
        btid="an-opaque-b-tid@bsf.example",  # not base64(RAND)@name: nothing may rely on that form
        rand=RAND,
        expires=EXPIRES,
        lifetime=3600.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_record_round_trips_and_names_no_secret() -> None:
    stored = record()
    data = encode_record(stored)
    assert b"\n" not in data  # one line: a sealed payload puts Ks after the first newline
    again = decode_record(data)
    assert again == stored
    fields = {"version", "mode", "iccid", "impi", "aid", "btid", "rand", "expires", "lifetime", "rspauth"}
    assert set(json.loads(data)) == fields
    unverified = record(rspauth_verified=False)  # a session whose 200 OK came without rspauth stays one
    assert decode_record(encode_record(unverified)).session().rspauth_verified is False


def test_the_planner_sees_btid_expiry_card_and_lifetime() -> None:
    stored = record().stored
    assert (stored.btid, stored.expires_at, stored.iccid, stored.lifetime) == (
        "an-opaque-b-tid@bsf.example",
        EXPIRES.timestamp(),
        "89882110000000000018",
        3600.0,
    )


GOOD = json.loads(encode_record(record()))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\xfe", "not a JSON record"),
        (b"[1, 2]", "fields of a record"),
        (json.dumps({**GOOD, "ks": "00"}).encode(), "fields of a record"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "btid"}).encode(), "fields of a record"),
        (json.dumps({**GOOD, "version": 2}).encode(), "format version 2"),
        (json.dumps({**GOOD, "mode": "gba-x"}).encode(), "malformed field"),
        (json.dumps({**GOOD, "rand": "zz"}).encode(), "malformed field"),
        (json.dumps({**GOOD, "rand": "00" * 8}).encode(), "out of range"),
        (json.dumps({**GOOD, "expires": "tomorrow"}).encode(), "not a date and time"),
        (json.dumps({**GOOD, "lifetime": True}).encode(), "number of seconds"),
        (json.dumps({**GOOD, "lifetime": -1}).encode(), "out of range"),
        (json.dumps({**GOOD, "btid": ""}).encode(), "non-empty string"),
        (json.dumps({**GOOD, "rspauth": "yes"}).encode(), "true or false"),
        (b" " * 5000, "not a record of ours"),
    ],
)
def test_anything_else_is_a_typed_error(data: bytes, fragment: str) -> None:
    with pytest.raises(StoredSessionInvalid, match=fragment):
        decode_record(data)


def test_a_sealed_payload_carries_ks_and_opening_it_wipes_every_buffer() -> None:
    stored = record(mode=GbaMode.GBA_ME)
    payload = seal_payload(stored, SecretBytes(KS))
    assert payload.endswith(b"\n" + KS)
    seen = payload  # the same buffer, as systemd-creds hands it back
    opened, ks = open_payload(seen)
    assert opened == decode_record(encode_record(stored)) and ks.get() == KS
    assert seen == bytes(len(seen))  # zeroed in place


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (bytearray(encode_record(record(mode=GbaMode.GBA_ME)) + b"\n" + KS[:16]), "Ks of 32 octets"),
        (bytearray(encode_record(record(mode=GbaMode.GBA_ME))), "Ks of 32 octets"),
        (bytearray(encode_record(record()) + b"\n" + KS), "must be a GBA_ME session"),
    ],
)
def test_a_sealed_payload_that_is_not_one_is_refused_and_still_wiped(payload: bytearray, fragment: str) -> None:
    with pytest.raises(StoredSessionInvalid, match=fragment):
        open_payload(payload)
    assert payload == bytes(len(payload))


def test_another_card_application_or_mode_is_not_resumed() -> None:
    assert identity_refusal(record(), identity(), GbaMode.GBA_U) is None
    assert "another card" in (identity_refusal(record(), identity(iccid="89882110000000000026"), GbaMode.GBA_U) or "")
    assert "another application" in (identity_refusal(record(), identity(aid=bytes(16)), GbaMode.GBA_U) or "")
    assert "another application" in (identity_refusal(record(), identity(impi="x@y"), GbaMode.GBA_U) or "")
    assert "policy now gives gba-me" in (identity_refusal(record(), identity(), GbaMode.GBA_ME) or "")
    assert "policy now gives none" in (identity_refusal(record(), identity(), None) or "")


def test_the_card_must_still_hold_the_stored_session() -> None:
    stored = record()
    same = GbaBootstrapParams(RAND, stored.btid, format_lifetime(EXPIRES))
    assert card_refusal(stored, same) is None
    # A bootstrap cut off after the card's AUTHENTICATE: the card wrote its new RAND, nobody wrote
    # the B-TID and lifetime that go with it (EF_GBABP still names the old ones).
    cut_off = replace(same, rand=bytes(16))
    assert "did not finish" in (card_refusal(stored, cut_off) or "")
    assert "B-TID or key lifetime" in (card_refusal(stored, replace(same, btid="other@bsf")) or "")
    later = format_lifetime(EXPIRES + timedelta(hours=1))
    assert "B-TID or key lifetime" in (card_refusal(stored, replace(same, lifetime=later)) or "")


def test_record_of_a_session_keeps_what_the_planner_needs() -> None:
    session = record().session()
    assert record_of(session, 3600.0) == record()
    planner = BootstrapPlanner(BootstrapTiming(), random.Random(1))
    now = EXPIRES.timestamp() - 3000.0  # 50 minutes left of an hour
    decision = planner.start(now, iccid=session.iccid, stored=record().stored, ae_waiting=False)
    assert decision.action is StartAction.RESUME
