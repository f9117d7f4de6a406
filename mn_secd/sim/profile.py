"""Card profiles for the software UICC: a TOML file per lab card, loaded strictly, saved atomically.

The profile is both the card's personalisation (ICCID, IMSI, K, OPc, ...) and its persistent SQN
record (``[card_state]``): the software UICC writes the SEQ_MS array back after every accepted
challenge, so a restarted card never accepts a replayed AUTN. The reference BSF reads the same
file for the subscriber's keys and its start SQN.

A card may have its PIN lock on (``pin``, with ``puk``): the attempts left are card state too
(``[card_state] pin_attempts`` / ``puk_attempts``), written back after every VERIFY, as a real
card keeps them across power cycles.

GBA_U state is card state too (``[gba_state.usim]``, ``[gba_state.isim]``): Ks, the RAND it came
from and EF_GBABP, written back after every GBA bootstrap and every write to EF_GBABP, as a real
card keeps them in non-volatile memory across power cycles and re-insertions.

The file holds subscriber keys, so it is written with mode 0600 and the keys never appear in a
``repr`` or in an error message.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from mn_secd.errors import ConfigError
from mn_secd.sim.milenage import MAX_RES_LEN, MILENAGE_RES_LEN, MIN_RES_LEN, opc_from_op
from mn_secd.sim.sqn import DEFAULT_DELTA, MAX_IND_LEN, SqnPolicy, SqnState

#: Longest IMPI / IMPU / domain accepted, in UTF-8 octets, so each fits a one-octet TLV length.
MAX_URI_OCTETS = 127
DEFAULT_AMF = b"\x80\x00"
DEFAULT_SQN = bytes(6)

_TOP_KEYS = frozenset(
    {"iccid", "imsi", "mnc_length", "k", "opc", "op", "amf", "sqn", "isim", "gba_u", "gsm_access",
     "impi", "impu", "domain", "pin", "puk", "card_state", "res_length", "gba_state"}
)  # fmt: skip
_STATE_KEYS = frozenset({"ind_len", "seq_ms", "delta", "age_limit", "pin_attempts", "puk_attempts"})
#: Attempts a PIN and a PUK start with (TS 102 221 9.5: typically 3 and 10).
PIN_ATTEMPTS = 3
PUK_ATTEMPTS = 10
DEFAULT_PUK = "12345678"
_GBA_STATE_KEYS = frozenset({"ks", "rand", "gbabp"})
#: The applications that may hold GBA state, as ``[gba_state.<name>]`` tables.
GBA_APPLICATIONS = ("usim", "isim")
#: EF_GBABP is LV(RAND) LV(B-TID) LV(lifetime): at most three 255-octet values with their lengths.
MAX_GBABP = 3 * 256
_HEX = re.compile(r"[0-9a-fA-F]*")
_DEFAULT_HEADER = (
    "# Software UICC card profile: a LAB card with test keys, never a real subscriber.\n"
    "# [card_state] is rewritten by the software UICC after every accepted challenge.\n"
)


class ProfileValueError(ValueError):
    """A profile value is invalid; ``key`` names the TOML key so loaders can report it precisely."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def derive_impi(imsi: str, mnc_length: int) -> str:
    """The IMPI of a card without ISIM (TS 23.003 13.3): ``<IMSI>@ims.mncMNC.mccMCC.3gppnetwork.org``.

    The MNC is always written with three digits (a 2-digit MNC gets a leading zero).
    """
    _check_imsi(imsi)
    if mnc_length not in (2, 3):
        raise ValueError("mnc_length must be 2 or 3")
    mcc, mnc = imsi[:3], imsi[3 : 3 + mnc_length]
    return f"{imsi}@ims.mnc{mnc:0>3}.mcc{mcc}.3gppnetwork.org"


def _check_imsi(imsi: str) -> None:
    if not (imsi.isascii() and imsi.isdigit() and 6 <= len(imsi) <= 15):
        raise ValueError("IMSI must be 6 to 15 decimal digits")


def _check_uri(key: str, value: str) -> None:
    if not value or len(value.encode("utf-8")) > MAX_URI_OCTETS:
        raise ProfileValueError(key, f"must be 1 to {MAX_URI_OCTETS} UTF-8 octets")


@dataclass(frozen=True, slots=True)
class GbaCardState:
    """What one application keeps after a GBA bootstrap: Ks = CK || IK, its RAND, and EF_GBABP."""

    ks: bytes = field(repr=False)
    rand: bytes
    gbabp: bytes  # the file's contents without its trailing FF padding

    def __post_init__(self) -> None:
        if len(self.ks) != 32 or len(self.rand) != 16 or len(self.gbabp) > MAX_GBABP:
            raise ProfileValueError("gba_state", "needs ks of 32 octets, rand of 16, gbabp of at most 768")


@dataclass(frozen=True, slots=True)
class CardProfile:
    """One lab card. ``impi``, ``impu`` and ``domain`` default from the IMSI when left out.

    ``op`` is kept only to write the file back the way it was given; the card computes with ``opc``.
    """

    iccid: str
    imsi: str
    mnc_length: int
    k: bytes = field(repr=False)
    opc: bytes = field(repr=False)
    amf: bytes = DEFAULT_AMF
    sqn: bytes = DEFAULT_SQN
    isim: bool = False
    gba_u: bool = False
    impi: str | None = None
    impu: tuple[str, ...] = ()
    domain: str | None = None
    gsm_access: bool = True
    card_state: SqnState = field(default_factory=SqnState.new)
    sqn_policy: SqnPolicy = field(default_factory=SqnPolicy)
    op: bytes | None = field(default=None, repr=False)
    #: The PIN when the card's PIN lock is on (None: off), its PUK, and the attempts left for each.
    pin: str | None = field(default=None, repr=False)
    puk: str = field(default=DEFAULT_PUK, repr=False)
    pin_attempts: int = PIN_ATTEMPTS
    puk_attempts: int = PUK_ATTEMPTS
    #: Octets of RES the card answers with (TS 33.102: 4 to 16; see :meth:`Milenage.f2345`).
    res_length: int = MILENAGE_RES_LEN
    #: (application, state) for each application that has run a GBA bootstrap: "usim" or "isim".
    gba_state: tuple[tuple[str, GbaCardState], ...] = ()

    def __post_init__(self) -> None:
        if not (self.iccid.isascii() and self.iccid.isdigit() and 19 <= len(self.iccid) <= 20):
            raise ProfileValueError("iccid", "must be 19 or 20 decimal digits")
        try:
            _check_imsi(self.imsi)
        except ValueError as exc:
            raise ProfileValueError("imsi", str(exc)) from None
        if self.mnc_length not in (2, 3):
            raise ProfileValueError("mnc_length", "must be 2 or 3")
        for key, value, length in (("k", self.k, 16), ("opc", self.opc, 16), ("amf", self.amf, 2),
                                   ("sqn", self.sqn, 6)):  # fmt: skip
            if len(value) != length:
                raise ProfileValueError(key, f"must be {length} octets")
        if not MIN_RES_LEN <= self.res_length <= MAX_RES_LEN:
            raise ProfileValueError("res_length", f"must be {MIN_RES_LEN} to {MAX_RES_LEN} octets")
        if self.op is not None and (len(self.op) != 16 or opc_from_op(self.k, self.op) != self.opc):
            raise ProfileValueError("op", "does not match opc")
        if self.impi is None:
            object.__setattr__(self, "impi", derive_impi(self.imsi, self.mnc_length))
        _check_uri("impi", self.effective_impi)
        if not self.impu:
            object.__setattr__(self, "impu", (f"sip:{self.effective_impi}",))
        for uri in self.impu:
            _check_uri("impu", uri)
        if self.domain is None:
            object.__setattr__(self, "domain", self.effective_impi.rpartition("@")[2])
        _check_uri("domain", self.effective_domain)
        if self.pin is not None and not (self.pin.isascii() and self.pin.isdigit() and 4 <= len(self.pin) <= 8):
            raise ProfileValueError("pin", "must be 4 to 8 decimal digits")
        if not (self.puk.isascii() and self.puk.isdigit() and len(self.puk) == 8):
            raise ProfileValueError("puk", "must be 8 decimal digits")
        if not 0 <= self.pin_attempts <= PIN_ATTEMPTS:
            raise ProfileValueError("card_state.pin_attempts", f"must be 0 to {PIN_ATTEMPTS}")
        if not 0 <= self.puk_attempts <= PUK_ATTEMPTS:
            raise ProfileValueError("card_state.puk_attempts", f"must be 0 to {PUK_ATTEMPTS}")

    @property
    def effective_impi(self) -> str:
        """The IMPI as a plain ``str`` (``impi`` is filled in from the IMSI when not given)."""
        assert self.impi is not None  # set in __post_init__
        return self.impi

    @property
    def effective_domain(self) -> str:
        """The home network domain as a plain ``str`` (defaults to the IMPI's realm)."""
        assert self.domain is not None  # set in __post_init__
        return self.domain


# --- loading ----------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one TOML table, turning every problem into a ConfigError naming the key."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str = "") -> None:
        self.file = file
        self.table = table
        self.prefix = prefix

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.prefix + key, problem)

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str) -> str:
        value = self.table.get(key)
        if not isinstance(value, str):
            raise self.error(key, "missing" if value is None else "must be a string")
        return value

    def integer(self, key: str) -> int:
        value = self.table.get(key)
        if type(value) is not int:
            raise self.error(key, "missing" if value is None else "must be an integer")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def hexbytes(self, key: str, length: int) -> bytes:
        text = self.string(key)
        if len(text) != 2 * length or not _HEX.fullmatch(text):
            raise self.error(key, f"must be {length} octets as {2 * length} hexadecimal digits")
        return bytes.fromhex(text)


def load_profile(path: str | os.PathLike[str]) -> CardProfile:
    """Read and validate a card profile; every problem is a ConfigError naming the file and the key."""
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        raise ConfigError(file, "(file)", f"cannot be read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(file, "(syntax)", f"not valid TOML: {exc}") from None
    return _profile_from_table(file, doc)


def _profile_from_table(file: str, doc: dict[str, Any]) -> CardProfile:
    r = _Reader(file, doc)
    for key in doc:
        if key not in _TOP_KEYS:
            raise r.error(key, "unknown key")
    k = r.hexbytes("k", 16)
    op: bytes | None = None
    if r.has("op") and r.has("opc"):
        raise r.error("op", "give either op or opc, not both")
    if r.has("op"):
        op = r.hexbytes("op", 16)
        opc = opc_from_op(k, op)
    elif r.has("opc"):
        opc = r.hexbytes("opc", 16)
    else:
        raise r.error("opc", "missing (give opc, or op)")
    impu: tuple[str, ...] = ()
    if r.has("impu"):
        value = doc["impu"]
        if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
            raise r.error("impu", "must be a list of strings")
        impu = tuple(value)
    card_state, policy = _state_from_table(file, doc.get("card_state", {}))
    attempts = _Reader(file, doc.get("card_state", {}), "card_state.")
    gba_state = _gba_state_from_table(file, doc.get("gba_state", {}))
    try:
        return CardProfile(
            iccid=r.string("iccid"),
            imsi=r.string("imsi"),
            mnc_length=r.integer("mnc_length"),
            k=k,
            opc=opc,
            amf=r.hexbytes("amf", 2) if r.has("amf") else DEFAULT_AMF,
            sqn=r.hexbytes("sqn", 6) if r.has("sqn") else DEFAULT_SQN,
            isim=r.boolean("isim", False),
            gba_u=r.boolean("gba_u", False),
            impi=r.string("impi") if r.has("impi") else None,
            impu=impu,
            domain=r.string("domain") if r.has("domain") else None,
            gsm_access=r.boolean("gsm_access", True),
            card_state=card_state,
            sqn_policy=policy,
            op=op,
            pin=r.string("pin") if r.has("pin") else None,
            puk=r.string("puk") if r.has("puk") else DEFAULT_PUK,
            pin_attempts=attempts.integer("pin_attempts") if attempts.has("pin_attempts") else PIN_ATTEMPTS,
            puk_attempts=attempts.integer("puk_attempts") if attempts.has("puk_attempts") else PUK_ATTEMPTS,
            res_length=r.integer("res_length") if r.has("res_length") else MILENAGE_RES_LEN,
            gba_state=gba_state,
        )
    except ProfileValueError as exc:
        raise ConfigError(file, exc.key, exc.problem) from None


def _state_from_table(file: str, table: object) -> tuple[SqnState, SqnPolicy]:
    if not isinstance(table, dict):
        raise ConfigError(file, "card_state", "must be a table")
    r = _Reader(file, table, "card_state.")
    for key in table:
        if key not in _STATE_KEYS:
            raise r.error(key, "unknown key")
    ind_len = r.integer("ind_len") if r.has("ind_len") else 5
    if not 0 <= ind_len <= MAX_IND_LEN:
        raise r.error("ind_len", f"must be between 0 and {MAX_IND_LEN}")
    if r.has("seq_ms"):
        seq_ms = table["seq_ms"]
        if not isinstance(seq_ms, list) or not all(type(s) is int for s in seq_ms):
            raise r.error("seq_ms", "must be a list of integers")
        try:
            state = SqnState(ind_len, tuple(seq_ms))
        except ValueError as exc:
            raise r.error("seq_ms", str(exc)) from None
    else:
        state = SqnState.new(ind_len)
    delta = r.integer("delta") if r.has("delta") else DEFAULT_DELTA
    if delta < 1:
        raise r.error("delta", "must be at least 1")
    age_limit = r.integer("age_limit") if r.has("age_limit") else None
    if age_limit is not None and age_limit < 1:
        raise r.error("age_limit", "must be at least 1")
    return state, SqnPolicy(delta, age_limit)


def _gba_state_from_table(file: str, table: object) -> tuple[tuple[str, GbaCardState], ...]:
    if not isinstance(table, dict):
        raise ConfigError(file, "gba_state", "must be a table")
    states = []
    for app, values in table.items():
        prefix = f"gba_state.{app}."
        if app not in GBA_APPLICATIONS or not isinstance(values, dict):
            raise ConfigError(file, f"gba_state.{app}", f"must be a table named after one of {GBA_APPLICATIONS}")
        r = _Reader(file, values, prefix)
        for key in values:
            if key not in _GBA_STATE_KEYS:
                raise r.error(key, "unknown key")
        gbabp = r.string("gbabp")
        if len(gbabp) % 2 or len(gbabp) > 2 * MAX_GBABP or not _HEX.fullmatch(gbabp):
            raise r.error("gbabp", f"must be at most {MAX_GBABP} octets as hexadecimal digits")
        try:
            state = GbaCardState(r.hexbytes("ks", 32), r.hexbytes("rand", 16), bytes.fromhex(gbabp))
        except ProfileValueError as exc:
            raise ConfigError(file, f"gba_state.{app}", exc.problem) from None
        states.append((app, state))
    return tuple(states)


# --- saving -----------------------------------------------------------------------------------------


def render_profile(profile: CardProfile, header: str = _DEFAULT_HEADER) -> str:
    """The TOML text of a profile; defaulted identities are left out so the file stays as written."""
    doc: dict[str, Any] = {
        "iccid": profile.iccid,
        "imsi": profile.imsi,
        "mnc_length": profile.mnc_length,
        "k": profile.k.hex(),
    }
    if profile.op is not None:
        doc["op"] = profile.op.hex()
    else:
        doc["opc"] = profile.opc.hex()
    doc.update(amf=profile.amf.hex(), sqn=profile.sqn.hex(), isim=profile.isim, gba_u=profile.gba_u)
    if not profile.gsm_access:
        doc["gsm_access"] = False
    if profile.res_length != MILENAGE_RES_LEN:
        doc["res_length"] = profile.res_length
    derived_impi = derive_impi(profile.imsi, profile.mnc_length)
    if profile.impi != derived_impi:
        doc["impi"] = profile.impi
    if profile.impu != (f"sip:{profile.effective_impi}",):
        doc["impu"] = list(profile.impu)
    if profile.domain != profile.effective_impi.rpartition("@")[2]:
        doc["domain"] = profile.domain
    if profile.pin is not None:
        doc["pin"] = profile.pin
    if profile.puk != DEFAULT_PUK:
        doc["puk"] = profile.puk
    lines = [header.rstrip("\n"), "", tomli_w.dumps(doc).rstrip("\n"), "", "[card_state]"]
    lines.append(f"ind_len = {profile.card_state.ind_len}")
    if profile.sqn_policy.delta != DEFAULT_DELTA:
        lines.append(f"delta = {profile.sqn_policy.delta}")
    if profile.sqn_policy.age_limit is not None:
        lines.append(f"age_limit = {profile.sqn_policy.age_limit}")
    if profile.pin_attempts != PIN_ATTEMPTS:
        lines.append(f"pin_attempts = {profile.pin_attempts}")
    if profile.puk_attempts != PUK_ATTEMPTS:
        lines.append(f"puk_attempts = {profile.puk_attempts}")
    seq = profile.card_state.seq_ms
    rows = [", ".join(str(s) for s in seq[i : i + 8]) for i in range(0, len(seq), 8)]
    lines.append("seq_ms = [\n" + "".join(f"    {row},\n" for row in rows) + "]")
    for app, state in profile.gba_state:
        lines += ["", f"[gba_state.{app}]", f'ks = "{state.ks.hex()}"', f'rand = "{state.rand.hex()}"']
        lines.append(f'gbabp = "{state.gbabp.hex()}"')
    return "\n".join(lines) + "\n"


def _leading_comments(path: Path) -> str | None:
    """The comment block at the top of an existing profile, kept across rewrites (e.g. "lab card")."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    block: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block) + "\n" if block else None


def save_profile(path: str | os.PathLike[str], profile: CardProfile) -> None:
    """Write the profile atomically (temporary file, fsync, rename) with mode 0600.

    A crash leaves either the old or the new file, never a torn one: the SQN state in it is what
    keeps a restarted card from accepting a replayed challenge.
    """
    target = Path(path)
    text = render_profile(profile, _leading_comments(target) or _DEFAULT_HEADER)
    directory = target.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(os.fspath(target), "(file)", f"cannot be written: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise ConfigError(os.fspath(target), "(file)", f"cannot be written: {exc.strerror}") from None
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
