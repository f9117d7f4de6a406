"""The software UICC: a card that answers APDUs byte for byte like a T=0 USIM/ISIM.

It sits behind the modem emulator (:mod:`mn_secd.sim.modem`), so everything the daemon does with a
real card — discovery through EF_DIR, FCP parsing, logical channels, GET RESPONSE, AUTHENTICATE in
the 3G and GBA contexts — is exercised against real bytes. The card never raises on a command:
every input, however malformed, gets a status word (ETSI TS 102 221 §10.2, TS 31.102 §7.3).

Card-side rules that matter for the daemon:

* Case-4 commands (SELECT with FCP, AUTHENTICATE) answer ``61xx``; the data is fetched with GET
  RESPONSE on the same logical channel. Case-2 commands (READ BINARY/RECORD, STATUS, GET RESPONSE,
  MANAGE CHANNEL open) answer ``6Cxx`` when Le is not what the card can give.
* AUTHENTICATE checks the MAC before the SQN (a forged AUTN never learns anything about SQN_MS),
  and the new SQN state is handed to ``on_state_change`` *before* RES leaves the card, so a
  restarted card never accepts the same challenge twice.
* PIN: with the profile's PIN lock on, the files of the USIM and ISIM and AUTHENTICATE need the
  PIN verified since the last reset (``69 82`` otherwise; the MF's EF_ICCID and EF_DIR are always
  readable). VERIFY (``20``) and UNBLOCK PIN (``2C``) keep TS 102 221 11.1.9/11.1.13's counters:
  three PIN attempts, ten PUK attempts, ``63 Cx`` with x left, ``69 83`` when blocked; without data
  they only report the attempts left. The counters are written back to the profile.
* GBA_U: bootstrapping (``DD``) keeps Ks = CK ‖ IK and RAND inside the card and writes RAND into
  EF_GBABP; NAF derivation (``DE``) returns Ks_ext_NAF and keeps Ks_int_NAF with an EF_GBANL
  record. Ks, its RAND and EF_GBABP are card state, handed to ``on_state_change`` like SQN, so a
  card started again from its profile (a power cycle, a re-insertion) still derives NAF keys for
  its last bootstrap, as a real card's non-volatile memory does (EF_GBANL is not kept).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from mn_secd.gba.kdf import ks_int_naf, ks_naf
from mn_secd.sim.milenage import Milenage, build_auts
from mn_secd.sim.profile import PIN_ATTEMPTS, PUK_ATTEMPTS, CardProfile, GbaCardState, load_profile, save_profile
from mn_secd.sim.sqn import SqnAccepted, check_sqn

log = logging.getLogger(__name__)

USIM_AID = bytes.fromhex("A0000000871002FFFFFFFF8907090000")
ISIM_AID = bytes.fromhex("A0000000871004FFFFFFFF8907090000")

FID_MF = 0x3F00
FID_CURRENT_ADF = 0x7FFF
FID_ICCID = 0x2FE2
FID_DIR = 0x2F00
FID_IMSI = 0x6F07
FID_AD = 0x6FAD
FID_UST = 0x6F38
FID_USIM_GBABP = 0x6FD6
FID_USIM_GBANL = 0x6FDA
FID_IMPI = 0x6F02
FID_DOMAIN = 0x6F03
FID_IMPU = 0x6F04
FID_IST = 0x6F07
FID_ISIM_GBABP = 0x6FD5
FID_ISIM_GBANL = 0x6FD7

MAX_CHANNEL = 3
#: Room for LV(RAND) ‖ LV(B-TID) ‖ LV(lifetime) with a long BSF name; below 256 so one READ BINARY gets it.
GBABP_SIZE = 200
GBANL_RECORDS = 4
GBANL_RECORD_LEN = 255
DIR_RECORD_LEN = 32

SERVICE_GSM_ACCESS = 27  # UST: Kc appended to the 3G AUTHENTICATE answer
SERVICE_USIM_GBA = 68  # UST: GBA security context
SERVICE_ISIM_GBA = 2  # IST: GBA security context

# Status words.
SW_OK = 0x9000
SW_MEMORY_PROBLEM = 0x6581
SW_WRONG_LENGTH = 0x6700
SW_CHANNEL_NOT_SUPPORTED = 0x6881
SW_SM_NOT_SUPPORTED = 0x6882
SW_CHAINING_NOT_SUPPORTED = 0x6884
SW_WRONG_STRUCTURE = 0x6981
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_BLOCKED = 0x6983
SW_REFERENCED_DATA_NOT_FOUND = 0x6A88
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_NO_EF_SELECTED = 0x6986
SW_WRONG_DATA = 0x6A80
SW_FUNCTION_NOT_SUPPORTED = 0x6A81
SW_NOT_FOUND = 0x6A82
SW_RECORD_NOT_FOUND = 0x6A83
SW_WRONG_P1P2 = 0x6A86
SW_OFFSET_BEYOND_FILE = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_TECHNICAL_PROBLEM = 0x6F00
SW_MAC_FAILURE = 0x9862
SW_CONTEXT_NOT_SUPPORTED = 0x9864
SW_NO_MEMORY_SPACE = 0x9866

INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_READ_RECORD = 0xB2
INS_UPDATE_BINARY = 0xD6
INS_UPDATE_RECORD = 0xDC
INS_AUTHENTICATE = 0x88
INS_MANAGE_CHANNEL = 0x70
INS_GET_RESPONSE = 0xC0
INS_STATUS = 0xF2
INS_VERIFY = 0x20
INS_UNBLOCK_PIN = 0x2C
#: PIN1 as a global (01) or an application (81) key reference: this card has one PIN for both.
PIN_REFERENCES = frozenset({0x01, 0x81})

#: The class each instruction is defined in: 0x00 = interindustry ('0X'), 0x80 = TS 102 221 ('8X').
_INS_CLASS = {
    INS_SELECT: 0x00,
    INS_READ_BINARY: 0x00,
    INS_READ_RECORD: 0x00,
    INS_UPDATE_BINARY: 0x00,
    INS_UPDATE_RECORD: 0x00,
    INS_AUTHENTICATE: 0x00,
    INS_MANAGE_CHANNEL: 0x00,
    INS_GET_RESPONSE: 0x00,
    INS_STATUS: 0x80,
    INS_VERIFY: 0x00,
    INS_UNBLOCK_PIN: 0x00,
}
#: Instructions whose P3 is Lc (a command data field follows); for the others P3 is Le.
_INS_WITH_DATA = frozenset(
    {INS_SELECT, INS_UPDATE_BINARY, INS_UPDATE_RECORD, INS_AUTHENTICATE, INS_VERIFY, INS_UNBLOCK_PIN}
)

TAG_SUCCESS = 0xDB
TAG_SYNC_FAILURE = 0xDC
TAG_GBA_BOOTSTRAP = 0xDD
TAG_GBA_NAF_DERIVATION = 0xDE


class _Refused(Exception):
    """Abandons a command with a status word; never escapes :meth:`SoftUicc.process_apdu`."""

    def __init__(self, sw: int) -> None:
        self.sw = sw
        super().__init__(f"SW {sw:04X}")


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def _ber_length(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([0x81, n])


def tlv(tag: int, value: bytes) -> bytes:
    """One BER-TLV with a one-octet tag (lengths up to 255)."""
    return bytes([tag]) + _ber_length(len(value)) + value


def tlv_lv(value: bytes) -> bytes:
    """A length-prefixed value as in AUTHENTICATE data (one length octet, no tag)."""
    return bytes([len(value)]) + value


def _service_table(services: set[int], size: int) -> bytes:
    table = bytearray(size)
    for n in services:
        table[(n - 1) // 8] |= 1 << ((n - 1) % 8)
    return bytes(table)


def encode_imsi(imsi: str) -> bytes:
    """EF_IMSI: length, then digit 1 with the parity nibble, then two digits per octet low nibble first."""
    nibbles = [9 if len(imsi) % 2 else 1] + [int(d) for d in imsi]
    if len(nibbles) % 2:
        nibbles.append(0xF)
    body = bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, len(nibbles), 2))
    return (bytes([len(body)]) + body).ljust(9, b"\xff")


def encode_iccid(iccid: str) -> bytes:
    """EF_ICCID: BCD with swapped nibbles, padded with F to 10 octets."""
    digits = [int(d) for d in iccid] + [0xF] * (20 - len(iccid))
    return bytes(digits[i] | (digits[i + 1] << 4) for i in range(0, 20, 2))


# --- the file system ------------------------------------------------------------------------------


@dataclass(eq=False)
class TransparentEf:
    fid: int
    data: bytearray
    sfi: int | None = None
    writable: bool = False


@dataclass(eq=False)
class LinearEf:
    fid: int
    record_len: int
    records: list[bytearray]
    sfi: int | None = None


Ef = TransparentEf | LinearEf


@dataclass(eq=False)
class Df:
    """The MF or an ADF (``aid`` set). Children are looked up by FID."""

    fid: int | None
    aid: bytes | None = None
    parent: Df | None = None
    children: dict[int, Ef] = field(default_factory=dict)

    def add(self, ef: Ef) -> Ef:
        self.children[ef.fid] = ef
        return ef


class AppKind(StrEnum):
    USIM = "usim"
    ISIM = "isim"


@dataclass(eq=False)
class GbaState:
    """What GBA_U keeps inside the card for one application (Ks and RAND persisted, never printed)."""

    ks: bytes | None = field(default=None, repr=False)
    rand: bytes | None = None
    #: Ks_int_NAF per EF_GBANL record number, and the records in least-recently-used order.
    int_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    lru: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Application:
    kind: AppKind
    adf: Df
    gba_enabled: bool
    gbabp: TransparentEf | None
    gbanl: LinearEf | None
    gba: GbaState = field(default_factory=GbaState)


@dataclass(eq=False)
class Channel:
    """Per logical channel: current DF, EF, application, record pointer and pending response."""

    df: Df
    app: Application | None = None
    ef: Ef | None = None
    record: int = 0
    pending: bytes = b""


@dataclass(frozen=True, slots=True)
class Command:
    cla: int
    ins: int
    p1: int
    p2: int
    channel: int
    data: bytes
    #: Le as sent in P3 for case-2 commands (0 means 256); None for commands with a data field.
    le: int | None


def _fcp_ef(ef: Ef) -> bytes:
    if isinstance(ef, TransparentEf):
        descriptor = bytes([0x41, 0x21])
        size = len(ef.data)
    else:
        descriptor = bytes([0x42, 0x21, 0x00, ef.record_len, len(ef.records)])
        size = ef.record_len * len(ef.records)
    body = (
        tlv(0x82, descriptor)
        + tlv(0x83, ef.fid.to_bytes(2, "big"))
        + tlv(0x8A, b"\x05")
        + tlv(0x80, size.to_bytes(2, "big"))
        + tlv(0x88, bytes([ef.sfi << 3]) if ef.sfi is not None else b"")
    )
    return tlv(0x62, body)


def _fcp_df(df: Df) -> bytes:
    body = tlv(0x82, bytes([0x78, 0x21]))
    if df.fid is not None:
        body += tlv(0x83, df.fid.to_bytes(2, "big"))
    if df.aid is not None:
        body += tlv(0x84, df.aid)
    # Life cycle "operational, activated"; PIN status template: PIN1 (key reference 01) disabled.
    body += tlv(0x8A, b"\x05") + tlv(0xC6, tlv(0x90, b"\x00") + tlv(0x83, b"\x01"))
    return tlv(0x62, body)


def _padded(data: bytes, length: int) -> bytearray:
    return bytearray(data.ljust(length, b"\xff"))


def _build_filesystem(profile: CardProfile) -> tuple[Df, list[Application]]:
    mf = Df(FID_MF)
    mf.add(TransparentEf(FID_ICCID, bytearray(encode_iccid(profile.iccid)), sfi=0x02))
    ad = bytes([0x00, 0x00, 0x00, profile.mnc_length])

    usim_adf = Df(None, USIM_AID, mf)
    usim_adf.add(TransparentEf(FID_IMSI, bytearray(encode_imsi(profile.imsi)), sfi=0x07))
    usim_adf.add(TransparentEf(FID_AD, bytearray(ad), sfi=0x03))
    services = ({SERVICE_GSM_ACCESS} if profile.gsm_access else set()) | (
        {SERVICE_USIM_GBA} if profile.gba_u else set()
    )
    usim_adf.add(TransparentEf(FID_UST, bytearray(_service_table(services, 10)), sfi=0x04))
    apps = [_application(AppKind.USIM, usim_adf, profile.gba_u, FID_USIM_GBABP, FID_USIM_GBANL)]
    dir_records = [tlv(0x61, tlv(0x4F, USIM_AID) + tlv(0x50, b"USIM"))]

    if profile.isim:
        isim_adf = Df(None, ISIM_AID, mf)
        isim_adf.add(TransparentEf(FID_IMPI, bytearray(tlv(0x80, profile.effective_impi.encode())), sfi=0x02))
        isim_adf.add(TransparentEf(FID_DOMAIN, bytearray(tlv(0x80, profile.effective_domain.encode())), sfi=0x05))
        impus = [tlv(0x80, uri.encode()) for uri in profile.impu]
        impu_len = max(32, *(len(r) for r in impus))
        isim_adf.add(LinearEf(FID_IMPU, impu_len, [_padded(r, impu_len) for r in impus], sfi=0x04))
        ist = _service_table({SERVICE_ISIM_GBA} if profile.gba_u else set(), 1)
        isim_adf.add(TransparentEf(FID_IST, bytearray(ist), sfi=0x07))
        isim_adf.add(TransparentEf(FID_AD, bytearray(ad), sfi=0x03))
        apps.append(_application(AppKind.ISIM, isim_adf, profile.gba_u, FID_ISIM_GBABP, FID_ISIM_GBANL))
        dir_records.append(tlv(0x61, tlv(0x4F, ISIM_AID) + tlv(0x50, b"ISIM")))

    # One spare (all FF) record, as on real cards: hosts must skip unused EF_DIR records.
    records = [_padded(r, DIR_RECORD_LEN) for r in dir_records] + [_padded(b"", DIR_RECORD_LEN)]
    mf.add(LinearEf(FID_DIR, DIR_RECORD_LEN, records, sfi=0x1E))
    return mf, apps


def _application(kind: AppKind, adf: Df, gba: bool, fid_gbabp: int, fid_gbanl: int) -> Application:
    gbabp: TransparentEf | None = None
    gbanl: LinearEf | None = None
    if gba:
        gbabp = TransparentEf(fid_gbabp, _padded(b"\x00\x00\x00", GBABP_SIZE), writable=True)
        records = [_padded(b"", GBANL_RECORD_LEN) for _ in range(GBANL_RECORDS)]
        gbanl = LinearEf(fid_gbanl, GBANL_RECORD_LEN, records)
        adf.add(gbabp)
        adf.add(gbanl)
    return Application(kind, adf, gba, gbabp, gbanl)


def _btid_from_gbabp(data: bytes) -> bytes:
    """B-TID from EF_GBABP = LV(RAND) ‖ LV(B-TID) ‖ LV(lifetime); empty when the ME wrote none."""
    if not data:
        return b""
    start = 1 + data[0]
    if start >= len(data) or data[start] == 0xFF:
        return b""
    end = start + 1 + data[start]
    return data[start + 1 : end] if end <= len(data) else b""


# --- the card -------------------------------------------------------------------------------------


class SoftUicc:
    """A USIM (and optionally an ISIM) answering APDUs per TS 102 221 / 31.102 / 31.103 over T=0.

    ``on_state_change`` receives the updated profile after every accepted challenge; it must persist
    it (e.g. :func:`mn_secd.sim.profile.save_profile`). If it raises, the card answers ``65 81``
    (memory problem) instead of RES. Thread-safe: the modem emulator calls it from its own thread.
    """

    def __init__(self, profile: CardProfile, *, on_state_change: Callable[[CardProfile], None] | None = None) -> None:
        self._profile = profile
        self._on_state_change = on_state_change
        self._milenage = Milenage(profile.k, profile.opc)
        self._mf, self._apps = _build_filesystem(profile)
        kept = dict(profile.gba_state)
        for app in self._apps:
            state = kept.get(app.kind.value)
            if state is not None and app.gbabp is not None:
                app.gba.ks, app.gba.rand = state.ks, state.rand
                app.gbabp.data[:] = _padded(state.gbabp[:GBABP_SIZE], GBABP_SIZE)
        self._lock = threading.Lock()
        self._channels: dict[int, Channel] = {}
        self._pin_verified = False  # since the last reset
        self._reset_channels()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SoftUicc:
        """A card from a profile file whose SQN state is saved back to the same file."""
        return cls(load_profile(path), on_state_change=lambda p: save_profile(path, p))

    def __repr__(self) -> str:
        return f"SoftUicc(iccid={self._profile.iccid}, isim={self._profile.isim}, gba_u={self._profile.gba_u})"

    @property
    def profile(self) -> CardProfile:
        """The profile as it is now (its ``card_state`` follows every accepted challenge)."""
        return self._profile

    def reset(self) -> None:
        """Card reset (power cycle / ATR): logical channels closed, MF current on the basic channel,
        the PIN to be verified again.

        GBA_U keys and the PIN counters survive a reset, as they do in a real card's non-volatile memory.
        """
        with self._lock:
            self._reset_channels()
            self._pin_verified = False

    def ks_int_naf(self, naf_id: bytes, application: AppKind = AppKind.USIM) -> bytes | None:
        """The Ks_int_NAF the card holds for ``naf_id``, as a UICC-resident applet would use it.

        Lab-only accessor (a real card never lets it out); ``None`` when none is held.
        """
        with self._lock:
            app = next(a for a in self._apps if a.kind is application)
            for naf, key in app.gba.int_keys.values():
                if naf == naf_id:
                    return key
            return None

    def process_apdu(self, apdu: bytes) -> bytes:
        """One command APDU in, response data + SW1 SW2 out. Never raises."""
        with self._lock:
            try:
                return self._process(apdu)
            except _Refused as exc:
                return _sw(exc.sw)
            except Exception:
                # A card has no way to raise: a bug becomes "technical problem", logged loudly.
                log.exception("software UICC failed on a command", extra={"event": "sim.card.bug"})
                return _sw(SW_TECHNICAL_PROBLEM)

    # --- dispatch ---------------------------------------------------------------------------------

    def _reset_channels(self) -> None:
        self._channels = {0: Channel(self._mf)}

    def _process(self, apdu: bytes) -> bytes:
        cmd = self._parse(apdu)
        ch = self._channels.get(cmd.channel)
        if ch is None:
            raise _Refused(SW_CHANNEL_NOT_SUPPORTED)
        if cmd.ins == INS_GET_RESPONSE:
            return self._get_response(ch, cmd)
        ch.pending = b""
        handlers: dict[int, Callable[[Channel, Command], bytes]] = {
            INS_SELECT: self._select,
            INS_READ_BINARY: self._read_binary,
            INS_READ_RECORD: self._read_record,
            INS_UPDATE_BINARY: self._update_binary,
            INS_UPDATE_RECORD: self._update_record,
            INS_AUTHENTICATE: self._authenticate,
            INS_MANAGE_CHANNEL: self._manage_channel,
            INS_STATUS: self._status,
            INS_VERIFY: self._verify,
            INS_UNBLOCK_PIN: self._unblock_pin,
        }
        return handlers[cmd.ins](ch, cmd)

    @staticmethod
    def _parse(apdu: bytes) -> Command:
        if len(apdu) < 4:
            raise _Refused(SW_WRONG_LENGTH)
        cla, ins, p1, p2 = apdu[:4]
        if cla == 0xFF or (cla & 0x60) == 0x20:
            raise _Refused(SW_CLA_NOT_SUPPORTED)  # invalid, RFU, or the GSM class A0
        if cla & 0x40:  # further interindustry: channels 4..19
            if cla & 0x20:
                raise _Refused(SW_SM_NOT_SUPPORTED)
            if cla & 0x10:
                raise _Refused(SW_CHAINING_NOT_SUPPORTED)
            channel = 4 + (cla & 0x0F)
        else:  # first interindustry: channels 0..3
            if cla & 0x10:
                raise _Refused(SW_CHAINING_NOT_SUPPORTED)
            if cla & 0x0C:
                raise _Refused(SW_SM_NOT_SUPPORTED)
            channel = cla & 0x03
        if ins not in _INS_CLASS:
            raise _Refused(SW_INS_NOT_SUPPORTED)
        if (cla & 0x80) != _INS_CLASS[ins]:
            raise _Refused(SW_CLA_NOT_SUPPORTED)
        if channel > MAX_CHANNEL:
            raise _Refused(SW_CHANNEL_NOT_SUPPORTED)
        p3 = apdu[4] if len(apdu) > 4 else 0
        if ins in _INS_WITH_DATA:
            data = apdu[5 : 5 + p3]
            # The data field must be complete; one trailing Le octet (ISO case 4) is tolerated.
            if len(data) != p3 or len(apdu) > 5 + p3 + 1:
                raise _Refused(SW_WRONG_LENGTH)
            return Command(cla, ins, p1, p2, channel, data, None)
        if len(apdu) > 5:
            raise _Refused(SW_WRONG_LENGTH)
        return Command(cla, ins, p1, p2, channel, b"", p3)

    @staticmethod
    def _case4(ch: Channel, data: bytes) -> bytes:
        """T=0: announce the response with 61xx; GET RESPONSE on this channel fetches it."""
        if not data:
            return _sw(SW_OK)
        ch.pending = data
        return _sw(0x6100 | (len(data) & 0xFF))

    @staticmethod
    def _case2(data: bytes, le: int | None) -> bytes:
        """Answer a case-2 command that must be asked for with exactly ``len(data)`` (else 6Cxx)."""
        wanted = le if le else 256
        if wanted != len(data):
            return _sw(0x6C00 | (len(data) & 0xFF))
        return data + _sw(SW_OK)

    def _get_response(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            raise _Refused(SW_WRONG_P1P2)
        if not ch.pending:
            raise _Refused(SW_CONDITIONS_NOT_SATISFIED)
        wanted = cmd.le if cmd.le else 256
        if wanted > len(ch.pending):
            return _sw(0x6C00 | (len(ch.pending) & 0xFF))
        out, ch.pending = ch.pending[:wanted], ch.pending[wanted:]
        if ch.pending:
            return out + _sw(0x6100 | (len(ch.pending) & 0xFF))
        return out + _sw(SW_OK)

    # --- SELECT -----------------------------------------------------------------------------------

    def _select(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p2 not in (0x04, 0x0C):
            raise _Refused(SW_WRONG_P1P2)
        app = ch.app
        parent: Df
        target: Df | Ef
        if cmd.p1 == 0x00:  # by FID (no data: the MF)
            if not cmd.data:
                parent, target = self._mf, self._mf
            elif len(cmd.data) != 2:
                raise _Refused(SW_WRONG_LENGTH)
            else:
                parent, target = self._by_fid(ch, int.from_bytes(cmd.data, "big"))
        elif cmd.p1 == 0x01:  # child DF: the only DF below the MF is the current ADF (7FFF)
            if len(cmd.data) != 2:
                raise _Refused(SW_WRONG_LENGTH)
            fid = int.from_bytes(cmd.data, "big")
            if fid != FID_CURRENT_ADF or ch.app is None or ch.df is not self._mf:
                raise _Refused(SW_NOT_FOUND)
            parent = target = ch.app.adf
        elif cmd.p1 == 0x03:  # parent DF
            if cmd.data:
                raise _Refused(SW_WRONG_LENGTH)
            if ch.df.parent is None:
                raise _Refused(SW_NOT_FOUND)
            parent = target = ch.df.parent
        elif cmd.p1 == 0x04:  # by DF name: full or right-truncated AID
            if not 1 <= len(cmd.data) <= 16:
                raise _Refused(SW_WRONG_LENGTH)
            found = next((a for a in self._apps if a.adf.aid and a.adf.aid.startswith(cmd.data)), None)
            if found is None:
                raise _Refused(SW_NOT_FOUND)
            parent = target = found.adf
            app = found
        elif cmd.p1 in (0x08, 0x09):  # path from the MF / from the current DF
            if not cmd.data or len(cmd.data) % 2:
                raise _Refused(SW_WRONG_LENGTH)
            fids = [int.from_bytes(cmd.data[i : i + 2], "big") for i in range(0, len(cmd.data), 2)]
            parent, target = self._by_path(ch, self._mf if cmd.p1 == 0x08 else ch.df, fids)
        else:
            raise _Refused(SW_WRONG_P1P2)

        ch.df = parent
        if isinstance(target, Df):
            ch.ef = None
            if target.aid is not None:
                app = next(a for a in self._apps if a.adf is target)
            fcp = _fcp_df(target)
        else:
            ch.ef = target
            fcp = _fcp_ef(target)
        ch.app = app
        ch.record = 0
        return self._case4(ch, fcp) if cmd.p2 == 0x04 else _sw(SW_OK)

    def _by_fid(self, ch: Channel, fid: int) -> tuple[Df, Df | Ef]:
        """FID selection scope of TS 102 221 8.4.1: the MF, the current ADF, the current DF, its
        children, its parent and the parent's children. Returns (new current DF, selected file)."""
        if fid == FID_MF:
            return self._mf, self._mf
        if fid == FID_CURRENT_ADF:
            if ch.app is None:
                raise _Refused(SW_NOT_FOUND)
            return ch.app.adf, ch.app.adf
        for df in (ch.df, ch.df.parent):
            if df is None:
                continue
            if df.fid == fid:
                return df, df
            if fid in df.children:
                return df, df.children[fid]
        raise _Refused(SW_NOT_FOUND)

    def _by_path(self, ch: Channel, start: Df, fids: list[int]) -> tuple[Df, Df | Ef]:
        """Walk a path of FIDs (7FFF first means the current ADF). Returns (new current DF, file)."""
        parent: Df = start
        node: Df | Ef = start
        for i, fid in enumerate(fids):
            if not isinstance(node, Df):
                raise _Refused(SW_NOT_FOUND)
            if fid == FID_CURRENT_ADF and i == 0 and node is self._mf and ch.app is not None:
                parent = node = ch.app.adf
            elif fid in node.children:
                parent, node = node, node.children[fid]
            else:
                raise _Refused(SW_NOT_FOUND)
        return parent, node

    # --- reading and writing ----------------------------------------------------------------------

    def _ef_by_sfi(self, ch: Channel, sfi: int) -> Ef:
        for ef in ch.df.children.values():
            if ef.sfi == sfi:
                ch.ef = ef
                ch.record = 0
                return ef
        raise _Refused(SW_NOT_FOUND)

    def _binary_target(self, ch: Channel, cmd: Command) -> tuple[TransparentEf, int]:
        if cmd.p1 & 0x80:  # short file identifier in P1, offset in P2
            if cmd.p1 & 0x60:
                raise _Refused(SW_WRONG_P1P2)
            ef: Ef | None = self._ef_by_sfi(ch, cmd.p1 & 0x1F)
            offset = cmd.p2
        else:
            ef = ch.ef
            offset = (cmd.p1 << 8) | cmd.p2
        if ef is None:
            raise _Refused(SW_NO_EF_SELECTED)
        if not isinstance(ef, TransparentEf):
            raise _Refused(SW_WRONG_STRUCTURE)
        if offset >= len(ef.data):
            raise _Refused(SW_OFFSET_BEYOND_FILE)
        return ef, offset

    def _read_binary(self, ch: Channel, cmd: Command) -> bytes:
        ef, offset = self._binary_target(ch, cmd)
        self._require_pin(ef)
        remaining = len(ef.data) - offset
        wanted = cmd.le if cmd.le else 256
        if wanted > remaining:
            return _sw(0x6C00 | (remaining & 0xFF))
        return bytes(ef.data[offset : offset + wanted]) + _sw(SW_OK)

    def _update_binary(self, ch: Channel, cmd: Command) -> bytes:
        ef, offset = self._binary_target(ch, cmd)
        self._require_pin(ef)
        if not ef.writable:
            raise _Refused(SW_SECURITY_NOT_SATISFIED)
        if not cmd.data or offset + len(cmd.data) > len(ef.data):
            raise _Refused(SW_WRONG_LENGTH)
        ef.data[offset : offset + len(cmd.data)] = cmd.data
        if any(app.gbabp is ef for app in self._apps):
            self._keep_gba_state()
        return _sw(SW_OK)

    def _record_target(self, ch: Channel, cmd: Command) -> tuple[LinearEf, int]:
        """The EF and record number of a READ/UPDATE RECORD (modes: absolute/current, next, previous)."""
        sfi, mode = cmd.p2 >> 3, cmd.p2 & 0x07
        ef = self._ef_by_sfi(ch, sfi) if sfi else ch.ef
        if ef is None:
            raise _Refused(SW_NO_EF_SELECTED)
        if not isinstance(ef, LinearEf):
            raise _Refused(SW_WRONG_STRUCTURE)
        count = len(ef.records)
        if mode == 0x04:
            number = cmd.p1 or ch.record
        elif mode == 0x02 and cmd.p1 == 0:  # next record (the first when none is current)
            number = ch.record + 1 if ch.record else 1
        elif mode == 0x03 and cmd.p1 == 0:  # previous record (the last when none is current)
            number = ch.record - 1 if ch.record else count
        else:
            raise _Refused(SW_WRONG_P1P2)
        if not 1 <= number <= count:
            raise _Refused(SW_RECORD_NOT_FOUND)
        return ef, number

    def _read_record(self, ch: Channel, cmd: Command) -> bytes:
        ef, number = self._record_target(ch, cmd)
        self._require_pin(ef)
        answer = self._case2(bytes(ef.records[number - 1]), cmd.le)
        if answer[-2:] == _sw(SW_OK):
            ch.record = number
        return answer

    def _update_record(self, ch: Channel, cmd: Command) -> bytes:
        self._record_target(ch, cmd)
        # Every record EF of this card is written by the card itself or by the issuer (ADM).
        raise _Refused(SW_SECURITY_NOT_SATISFIED)

    # --- STATUS and MANAGE CHANNEL ----------------------------------------------------------------

    def _status(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p1 not in (0x00, 0x01, 0x02):
            raise _Refused(SW_WRONG_P1P2)
        if cmd.p2 == 0x0C:
            if cmd.le:
                raise _Refused(SW_WRONG_LENGTH)
            return _sw(SW_OK)
        if cmd.p2 == 0x00:
            return self._case2(_fcp_df(ch.df), cmd.le)
        if cmd.p2 == 0x01:
            if ch.app is None or ch.app.adf.aid is None:
                raise _Refused(SW_CONDITIONS_NOT_SATISFIED)
            return self._case2(tlv(0x84, ch.app.adf.aid), cmd.le)
        raise _Refused(SW_WRONG_P1P2)

    def _manage_channel(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p1 == 0x00:
            if cmd.p2 == 0x00:  # the card picks the channel and returns its number (case 2, Le 1)
                if cmd.le != 1:
                    return _sw(0x6C01)
                free = next((c for c in range(1, MAX_CHANNEL + 1) if c not in self._channels), None)
                if free is None:
                    raise _Refused(SW_FUNCTION_NOT_SUPPORTED)
                self._open(ch, cmd.channel, free)
                return bytes([free]) + _sw(SW_OK)
            if cmd.le:
                raise _Refused(SW_WRONG_LENGTH)
            if cmd.p2 > 19:
                raise _Refused(SW_WRONG_P1P2)
            if cmd.p2 > MAX_CHANNEL:
                raise _Refused(SW_CHANNEL_NOT_SUPPORTED)
            if cmd.p2 in self._channels:
                raise _Refused(SW_CONDITIONS_NOT_SATISFIED)
            self._open(ch, cmd.channel, cmd.p2)
            return _sw(SW_OK)
        if cmd.p1 == 0x80:
            if cmd.le:
                raise _Refused(SW_WRONG_LENGTH)
            if cmd.p2 == 0 or cmd.p2 > 19:
                raise _Refused(SW_WRONG_P1P2)
            if cmd.p2 not in self._channels:
                raise _Refused(SW_CHANNEL_NOT_SUPPORTED)
            del self._channels[cmd.p2]
            return _sw(SW_OK)
        raise _Refused(SW_WRONG_P1P2)

    def _open(self, origin: Channel, origin_number: int, number: int) -> None:
        """Opened from the basic channel: MF current. From another channel: inherit its DF and app."""
        if origin_number == 0:
            self._channels[number] = Channel(self._mf)
        else:
            self._channels[number] = Channel(origin.df, origin.app)

    # --- PIN ------------------------------------------------------------------------------------------

    def _require_pin(self, ef: Ef | None) -> None:
        """The applications' files (and AUTHENTICATE: ``ef`` None) need the PIN while the lock is on."""
        if self._profile.pin is None or self._pin_verified:
            return
        if ef is not None and any(ef is child for child in self._mf.children.values()):
            return  # EF_ICCID and EF_DIR: always readable
        raise _Refused(SW_SECURITY_NOT_SATISFIED)

    def _save_counters(self, **changes: int | str) -> None:
        self._profile = replace(self._profile, **changes)  # type: ignore[arg-type]
        if self._on_state_change is not None:
            try:
                self._on_state_change(self._profile)
            except Exception:
                log.exception("could not persist the PIN counters", extra={"event": "sim.pin.persist_failed"})
                raise _Refused(SW_MEMORY_PROBLEM) from None

    @staticmethod
    def _pin_block(data: bytes) -> str | None:
        """An 8-octet PIN block: digits padded with FF (TS 102 221 9.5.1); None if malformed."""
        digits = data.rstrip(b"\xff")
        if len(data) != 8 or not digits.isdigit() or not 4 <= len(digits) <= 8:
            return None
        return digits.decode("ascii")

    def _verify(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p1 != 0x00 or cmd.p2 not in PIN_REFERENCES:
            raise _Refused(SW_REFERENCED_DATA_NOT_FOUND)
        profile = self._profile
        if profile.pin is None:
            return _sw(SW_OK)  # the PIN lock is off: nothing to verify
        if profile.pin_attempts == 0:
            raise _Refused(SW_BLOCKED)
        if not cmd.data:  # no PIN: the attempts left, and nothing counted
            return _sw(SW_OK) if self._pin_verified else _sw(0x63C0 | profile.pin_attempts)
        entered = self._pin_block(cmd.data)
        if entered is None:
            raise _Refused(SW_WRONG_LENGTH)
        if hmac.compare_digest(entered.encode(), profile.pin.encode()):
            self._save_counters(pin_attempts=PIN_ATTEMPTS)
            self._pin_verified = True
            return _sw(SW_OK)
        self._pin_verified = False
        self._save_counters(pin_attempts=profile.pin_attempts - 1)
        log.info("wrong PIN", extra={"event": "sim.pin.wrong", "attempts_left": self._profile.pin_attempts})
        return _sw(0x63C0 | self._profile.pin_attempts)

    def _unblock_pin(self, ch: Channel, cmd: Command) -> bytes:
        if cmd.p1 != 0x00 or cmd.p2 not in PIN_REFERENCES:
            raise _Refused(SW_REFERENCED_DATA_NOT_FOUND)
        profile = self._profile
        if profile.pin is None:
            raise _Refused(SW_CONDITIONS_NOT_SATISFIED)
        if profile.puk_attempts == 0:
            raise _Refused(SW_BLOCKED)
        if not cmd.data:
            return _sw(0x63C0 | profile.puk_attempts)
        if len(cmd.data) != 16:
            raise _Refused(SW_WRONG_LENGTH)
        puk, new_pin = cmd.data[:8], self._pin_block(cmd.data[8:])
        if new_pin is None or not puk.isdigit():
            raise _Refused(SW_WRONG_DATA)
        if hmac.compare_digest(puk, profile.puk.encode()):
            self._save_counters(pin=new_pin, pin_attempts=PIN_ATTEMPTS, puk_attempts=PUK_ATTEMPTS)
            self._pin_verified = True
            return _sw(SW_OK)
        self._save_counters(puk_attempts=profile.puk_attempts - 1)
        return _sw(0x63C0 | self._profile.puk_attempts)

    # --- AUTHENTICATE -----------------------------------------------------------------------------

    def _authenticate(self, ch: Channel, cmd: Command) -> bytes:
        app = ch.app
        if cmd.p1 != 0x00 or cmd.p2 & 0xF8 != 0x80:
            raise _Refused(SW_WRONG_P1P2)
        if app is None:
            raise _Refused(SW_CONDITIONS_NOT_SATISFIED)
        self._require_pin(None)
        if cmd.p2 == 0x81:
            return self._authenticate_3g(ch, app, cmd.data)
        if cmd.p2 == 0x84 and app.gba_enabled:
            if not cmd.data:
                raise _Refused(SW_WRONG_LENGTH)
            if cmd.data[0] == TAG_GBA_BOOTSTRAP:
                return self._gba_bootstrap(ch, app, cmd.data[1:])
            if cmd.data[0] == TAG_GBA_NAF_DERIVATION:
                return self._gba_naf_derivation(ch, app, cmd.data[1:])
            raise _Refused(SW_WRONG_DATA)
        raise _Refused(SW_CONTEXT_NOT_SUPPORTED)

    @staticmethod
    def _rand_autn(body: bytes) -> tuple[bytes, bytes]:
        if len(body) != 34:
            raise _Refused(SW_WRONG_LENGTH)
        if body[0] != 16 or body[17] != 16:
            raise _Refused(SW_WRONG_DATA)
        return body[1:17], body[18:34]

    def _aka(self, rand: bytes, autn: bytes, app: Application) -> tuple[bytes, bytes, bytes] | bytes:
        """The USIM's AKA: (RES, CK, IK) on success, or the DC answer (AUTS). Raises 98 62 / 65 81."""
        res, ck, ik, ak = self._milenage.f2345(rand, self._profile.res_length)
        sqn = bytes(a ^ b for a, b in zip(autn[:6], ak, strict=True))
        amf, mac = autn[6:8], autn[8:]
        if not hmac.compare_digest(self._milenage.f1(rand, sqn, amf), mac):
            log.info("AUTN MAC failure", extra={"event": "sim.auth.mac_failure", "application": app.kind.value})
            raise _Refused(SW_MAC_FAILURE)
        verdict = check_sqn(self._profile.card_state, sqn, self._profile.sqn_policy)
        if not isinstance(verdict, SqnAccepted):
            log.info(
                "SQN not fresh: answering with AUTS",
                extra={"event": "sim.auth.sync_failure", "reason": verdict.reason.value},
            )
            auts = build_auts(self._milenage, rand, verdict.sqn_ms)
            return bytes([TAG_SYNC_FAILURE]) + tlv_lv(auts)
        self._profile = replace(self._profile, card_state=verdict.state)
        if self._on_state_change is not None:
            try:
                self._on_state_change(self._profile)
            except Exception:
                # Never reveal RES for an SQN that might be accepted again after a restart.
                log.exception("could not persist the SQN state", extra={"event": "sim.auth.persist_failed"})
                raise _Refused(SW_MEMORY_PROBLEM) from None
        log.debug("challenge accepted", extra={"event": "sim.auth.ok", "application": app.kind.value})
        return res, ck, ik

    def _authenticate_3g(self, ch: Channel, app: Application, body: bytes) -> bytes:
        rand, autn = self._rand_autn(body)
        outcome = self._aka(rand, autn, app)
        if isinstance(outcome, bytes):
            return self._case4(ch, outcome)
        res, ck, ik = outcome
        answer = bytes([TAG_SUCCESS]) + tlv_lv(res) + tlv_lv(ck) + tlv_lv(ik)
        if app.kind is AppKind.USIM and self._profile.gsm_access:
            kc = bytes(a ^ b ^ c ^ d for a, b, c, d in zip(ck[:8], ck[8:], ik[:8], ik[8:], strict=True))
            answer += tlv_lv(kc)
        return self._case4(ch, answer)

    def _gba_bootstrap(self, ch: Channel, app: Application, body: bytes) -> bytes:
        rand, autn = self._rand_autn(body)
        outcome = self._aka(rand, autn, app)
        if isinstance(outcome, bytes):
            return self._case4(ch, outcome)
        res, ck, ik = outcome
        app.gba.ks, app.gba.rand = ck + ik, rand
        assert app.gbabp is not None  # present whenever GBA is enabled
        # A new bootstrap replaces RAND; B-TID and lifetime are left empty for the ME to write.
        app.gbabp.data[:] = _padded(tlv_lv(rand) + b"\x00\x00", GBABP_SIZE)
        self._keep_gba_state()
        return self._case4(ch, bytes([TAG_SUCCESS]) + tlv_lv(res))

    def _keep_gba_state(self) -> None:
        """Ks, RAND and EF_GBABP of every application into the profile, and on to ``on_state_change``."""
        states = tuple(
            (app.kind.value, GbaCardState(app.gba.ks, app.gba.rand, bytes(app.gbabp.data).rstrip(b"\xff")))
            for app in self._apps
            if app.gba.ks is not None and app.gba.rand is not None and app.gbabp is not None
        )
        self._profile = replace(self._profile, gba_state=states)
        if self._on_state_change is not None:
            try:
                self._on_state_change(self._profile)
            except Exception:
                log.exception("could not persist the GBA state", extra={"event": "sim.gba.persist_failed"})
                raise _Refused(SW_MEMORY_PROBLEM) from None

    def _gba_naf_derivation(self, ch: Channel, app: Application, body: bytes) -> bytes:
        if not body or 1 + body[0] >= len(body):
            raise _Refused(SW_WRONG_DATA)
        naf_id = body[1 : 1 + body[0]]
        rest = body[1 + body[0] :]
        if 1 + rest[0] != len(rest) or not naf_id or rest[0] == 0:
            raise _Refused(SW_WRONG_DATA)
        try:
            impi = rest[1:].decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(SW_WRONG_DATA) from None
        gba = app.gba
        if gba.ks is None or gba.rand is None:
            raise _Refused(SW_CONDITIONS_NOT_SATISFIED)  # no bootstrap has been run
        assert app.gbabp is not None and app.gbanl is not None
        btid = _btid_from_gbabp(bytes(app.gbabp.data))
        record = tlv(0x80, naf_id) + tlv(0x81, btid)
        if len(record) > GBANL_RECORD_LEN:
            raise _Refused(SW_NO_MEMORY_SPACE)
        ext_key = ks_naf(gba.ks, gba.rand, impi, naf_id)
        number = self._gbanl_slot(gba, naf_id)
        gba.int_keys[number] = (naf_id, ks_int_naf(gba.ks, gba.rand, impi, naf_id))
        app.gbanl.records[number - 1] = _padded(record, GBANL_RECORD_LEN)
        return self._case4(ch, bytes([TAG_SUCCESS]) + tlv_lv(ext_key))

    @staticmethod
    def _gbanl_slot(gba: GbaState, naf_id: bytes) -> int:
        """The EF_GBANL record for a NAF: its own, else a free one, else the least recently used."""
        number = next((n for n, (naf, _) in gba.int_keys.items() if naf == naf_id), None)
        if number is None:
            free = [n for n in range(1, GBANL_RECORDS + 1) if n not in gba.int_keys]
            number = free[0] if free else gba.lru[0]
        if number in gba.lru:
            gba.lru.remove(number)
        gba.lru.append(number)
        return number
