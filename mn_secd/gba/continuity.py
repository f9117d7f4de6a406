"""A bootstrap session kept across daemon restarts: what is stored, and when it may be resumed.

Every restart (an upgrade, the watchdog, a power cut) would otherwise cost an AKA run on the card
and two or three HTTP exchanges with the BSF although the last bootstrap is still valid, and a
whole region restarting at once would cost the BSF that many bootstraps at once. So the daemon
keeps its session for the next start, as Android's and Symbian's GBA services did:

* **GBA_U**: the card keeps Ks, and EF_GBABP holds the RAND of the card's last GBA bootstrap (the
  card writes it at the AUTHENTICATE, TS 31.102 4.2.79) beside the B-TID and key lifetime we wrote
  after the BSF's 200 OK. We store a :class:`SessionRecord` (no secret in it) when a bootstrap
  succeeds. At start the session is resumed only if the card still holds exactly that session: the
  same ICCID, IMPI and application, and EF_GBABP naming our RAND, B-TID and lifetime. A bootstrap
  cut off after the card's AUTHENTICATE (the daemon killed before the BSF answered) has replaced
  the card's Ks and RAND but not the B-TID: the RAND differs from the record, so nothing is resumed
  (a B-TID need not be base64(RAND)@BSF, so its form proves nothing).
* **GBA_ME** (``[gba] persist_session``): Ks lives in the daemon, so the record and Ks are sealed
  together (:func:`seal_payload`, then ``systemd-creds``) before anything reaches the disk.

The time rules (a plausible clock, not expired, not longer than its lifetime) are the planner's
(:meth:`~mn_secd.gba.planner.BootstrapPlanner.start`); this module checks everything else, without
I/O. :mod:`mn_secd.gba.session_store` reads and writes the files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mn_secd.card_identity import CardIdentity, GbaBootstrapParams
from mn_secd.errors import BsfAnswerInvalid, StoredSessionInvalid
from mn_secd.gba.bsfxml import format_lifetime, parse_lifetime
from mn_secd.gba.planner import StoredSession
from mn_secd.gba.session import BootstrapSession
from mn_secd.naf_keys import GbaMode
from mn_secd.secret import SecretBytes

#: The stored format; a file of another version is not resumed (and is replaced at the next bootstrap).
RECORD_VERSION = 1
#: Ks = CK || IK (TS 33.220 4.5.2).
KS_LENGTH = 32
#: A record is a few hundred octets; anything much longer is not one of ours.
MAX_RECORD = 4096
_FIELDS = frozenset({"version", "mode", "iccid", "impi", "aid", "btid", "rand", "expires", "lifetime", "rspauth"})


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A bootstrap session as stored for the next start: everything but Ks."""

    mode: GbaMode
    iccid: str
    impi: str
    application_aid: bytes
    btid: str
    rand: bytes
    expires: datetime  # timezone-aware UTC, as the BSF set it
    lifetime: float  # seconds the BSF granted (the planner's scale for refresh and retries)
    rspauth_verified: bool = True  # False: the BSF's 200 OK was accepted without rspauth (status warns)

    @property
    def stored(self) -> StoredSession:
        """What the planner's resume rule looks at."""
        return StoredSession(self.btid, self.expires.timestamp(), self.iccid, self.lifetime)

    def session(self, ks: SecretBytes | None = None) -> BootstrapSession:
        """The session to install when this record is resumed (``ks`` for GBA_ME)."""
        return BootstrapSession(
            iccid=self.iccid,
            impi=self.impi,
            btid=self.btid,
            rand=self.rand,
            expires=self.expires,
            mode=self.mode,
            application_aid=self.application_aid,
            ks=ks,
            rspauth_verified=self.rspauth_verified,
        )


def record_of(session: BootstrapSession, lifetime: float) -> SessionRecord:
    return SessionRecord(
        mode=session.mode,
        iccid=session.iccid,
        impi=session.impi,
        application_aid=session.application_aid,
        btid=session.btid,
        rand=session.rand,
        expires=session.expires,
        lifetime=lifetime,
        rspauth_verified=session.rspauth_verified,
    )


# --- encoding -----------------------------------------------------------------------------------------


def encode_record(record: SessionRecord) -> bytes:
    """Compact JSON, one line (so that a sealed payload can put Ks after the first newline)."""
    doc = {
        "version": RECORD_VERSION,
        "mode": record.mode.value,
        "iccid": record.iccid,
        "impi": record.impi,
        "aid": record.application_aid.hex(),
        "btid": record.btid,
        "rand": record.rand.hex(),
        "expires": record.expires.astimezone(UTC).isoformat().replace("+00:00", "Z"),  # to the microsecond
        "lifetime": record.lifetime,
        "rspauth": record.rspauth_verified,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def decode_record(data: bytes | bytearray) -> SessionRecord:
    """The inverse of :func:`encode_record`; :class:`StoredSessionInvalid` for anything else."""
    if len(data) > MAX_RECORD:
        raise StoredSessionInvalid(f"the stored session is {len(data)} octets, not a record of ours")
    try:
        doc = json.loads(bytes(data).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise StoredSessionInvalid("the stored session is not a JSON record") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise StoredSessionInvalid("the stored session does not have the fields of a record")
    if doc["version"] != RECORD_VERSION:
        raise StoredSessionInvalid(f"the stored session has format version {doc['version']!r}, not {RECORD_VERSION}")
    try:
        mode = GbaMode(_text(doc, "mode"))
        expires = parse_lifetime(_text(doc, "expires"))
        aid, rand = bytes.fromhex(_text(doc, "aid")), bytes.fromhex(_text(doc, "rand"))
    except ValueError as exc:
        raise StoredSessionInvalid(f"the stored session has a malformed field: {exc}") from None
    except BsfAnswerInvalid:
        raise StoredSessionInvalid("the stored session's expiry is not a date and time") from None
    lifetime = doc["lifetime"]
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or not math.isfinite(lifetime):
        raise StoredSessionInvalid("the stored session's lifetime is not a number of seconds")
    if lifetime <= 0 or len(rand) != 16 or not 5 <= len(aid) <= 16:
        raise StoredSessionInvalid("the stored session's lifetime, RAND or application id is out of range")
    if not isinstance(doc["rspauth"], bool):
        raise StoredSessionInvalid("the stored session's rspauth is not true or false")
    return SessionRecord(
        mode=mode,
        iccid=_text(doc, "iccid"),
        impi=_text(doc, "impi"),
        application_aid=aid,
        btid=_text(doc, "btid"),
        rand=rand,
        expires=expires.astimezone(UTC),
        lifetime=float(lifetime),
        rspauth_verified=doc["rspauth"],
    )


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or not value:
        raise StoredSessionInvalid(f"the stored session's {name} is not a non-empty string")
    return value


def seal_payload(record: SessionRecord, ks: SecretBytes) -> bytearray:
    """What is sealed for a GBA_ME session: the record, a newline, Ks. The caller wipes it once sealed."""
    payload = bytearray(encode_record(record))
    payload += b"\n"
    payload += ks.get()
    return payload


def open_payload(payload: bytearray) -> tuple[SessionRecord, SecretBytes]:
    """The inverse of :func:`seal_payload`; wipes ``payload`` whatever happens."""
    try:
        end = payload.find(b"\n")
        if end < 0 or len(payload) - end - 1 != KS_LENGTH:
            raise StoredSessionInvalid("the sealed session does not hold a record and a Ks of 32 octets")
        record = decode_record(payload[:end])
        if record.mode is not GbaMode.GBA_ME:
            raise StoredSessionInvalid("a sealed session must be a GBA_ME session")
        ks_part = payload[end + 1 :]
        try:
            return record, SecretBytes(ks_part)
        finally:
            ks_part[:] = bytes(len(ks_part))
    finally:
        payload[:] = bytes(len(payload))


# --- the resume rules beyond time ----------------------------------------------------------------------


def identity_refusal(record: SessionRecord, identity: CardIdentity, mode: GbaMode | None) -> str | None:
    """Why ``record`` cannot be resumed with this card and this mode policy; None if it can.

    ``mode`` is what the policy chooses for this card now (None: the policy cannot be met at all).
    """
    if record.iccid != identity.iccid:
        return "the stored session belongs to another card (ICCID)"
    if record.impi != identity.impi or record.application_aid != identity.aid:
        return "the stored session belongs to another application or subscriber on this card"
    if record.mode is not mode:
        return f"the stored session is {record.mode.value}, the GBA mode policy now gives {mode or 'none'}"
    return None


def card_refusal(record: SessionRecord, card: GbaBootstrapParams) -> str | None:
    """GBA_U: why the card's EF_GBABP shows that its Ks is not the stored session's; None if it is."""
    if card.rand != record.rand:
        return (
            "the card's RAND is not the stored session's: a bootstrap after it reached the card's "
            "AUTHENTICATE (and replaced Ks) but did not finish"
        )
    if card.btid != record.btid or card.lifetime != format_lifetime(record.expires):
        return "EF_GBABP does not name the stored session (its B-TID or key lifetime differ)"
    return None
