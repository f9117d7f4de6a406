"""HTTP Digest AKA (RFC 3310 AKAv1-MD5, RFC 4169 AKAv2-MD5) for Ub, sans-IO.

Both ends of Ub use this module: the daemon's Ub client answers the BSF's challenge and checks the
BSF's ``rspauth``; the reference BSF issues challenges and checks the answers. Keeping both on the
same few functions means a mistake shows up as a failing bootstrap in tests, not as two code paths
agreeing with themselves.

Parsing is strict about syntax (RFC 7235 ``challenge`` / ``credentials`` / ``auth-param``) but
liberal where real servers differ: parameter order, quoted or bare values, case of names and of the
algorithm, several challenges in one header or across several headers, obs-folded lines. Anything
that cannot be read raises :class:`~mn_secd.errors.DigestParseError` and nothing else, so a hostile
or broken peer can never crash the caller with an unexpected exception type. That error blames no
one: this module cannot know which end wrote the header, so each caller turns it into the error of
the side at fault (:class:`~mn_secd.gba.ub.UbExchange` blames the BSF; the reference BSF answers 400).

The digest itself is RFC 2617 with the AKA password rule: for AKAv1 the password is RES as raw
octets (not hex), for AKAv2 base64(HMAC-MD5(RES ‖ IK ‖ CK, "http-digest-akav2-password")).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from mn_secd.aka import AUTN_LEN, RAND_LEN
from mn_secd.errors import BsfAnswerInvalid, DigestParseError

MD5 = "MD5"
MD5_SESS = "MD5-sess"
AKAV1_MD5 = "AKAv1-MD5"
AKAV1_MD5_SESS = "AKAv1-MD5-sess"
AKAV2_MD5 = "AKAv2-MD5"
AKAV2_MD5_SESS = "AKAv2-MD5-sess"
#: Algorithms this module can compute, by lowercase name (names are case-insensitive on the wire).
SUPPORTED_ALGORITHMS: Mapping[str, str] = MappingProxyType(
    {a.lower(): a for a in (MD5, MD5_SESS, AKAV1_MD5, AKAV1_MD5_SESS, AKAV2_MD5, AKAV2_MD5_SESS)}
)

QOP_AUTH = "auth"
QOP_AUTH_INT = "auth-int"
_QOPS = frozenset({QOP_AUTH, QOP_AUTH_INT})

AKAV2_PASSWORD_LABEL = b"http-digest-akav2-password"

_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
_TOKEN68 = frozenset("-._~+/" + string.ascii_letters + string.digits)
_OBS_FOLD = re.compile(r"\r?\n[ \t]+")
_NC = re.compile(r"^[0-9A-Fa-f]{8}$")


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``Digest`` challenge from a ``WWW-Authenticate`` header.

    ``algorithm`` is the canonical spelling when the algorithm is known (``AKAv1-MD5``), otherwise
    the value as received; ``MD5`` when the challenge names none (RFC 2617). ``qop`` lists the
    offered options in lowercase, empty when the server offered none (RFC 2069 style). ``params``
    holds every parameter (lowercase names, values unquoted), e.g. for extensions.
    """

    realm: str
    nonce: str
    algorithm: str
    qop: tuple[str, ...]
    opaque: str | None
    stale: bool
    params: Mapping[str, str]

    @property
    def is_aka(self) -> bool:
        return self.algorithm in (AKAV1_MD5, AKAV1_MD5_SESS, AKAV2_MD5, AKAV2_MD5_SESS)


class AkaNonce(NamedTuple):
    """The decoded Ub nonce: RAND ‖ AUTN ‖ optional server data (TS 24.109 4.4.3)."""

    rand: bytes
    autn: bytes
    server_data: bytes


@dataclass(frozen=True, slots=True)
class DigestState:
    """What the client must remember from its answer to check the server's ``rspauth``.

    ``ha1`` is derived from RES (or CK/IK), so it never appears in a repr.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    algorithm: str
    qop: str | None
    nc: int
    cnonce: str
    opaque: str | None
    ha1: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A parsed ``Authorization: Digest`` header (the server side of Ub).

    Values the client omitted are empty strings (``realm``, ``nonce``, ``uri``, ``response``), so
    the initial Ub request with ``nonce=""`` and ``response=""`` parses like any other.
    ``nc`` is kept as the 8 hex digits received because the digest hashes that exact text.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    qop: str | None
    nc: str | None
    cnonce: str | None
    opaque: str | None
    auts: bytes | None
    params: Mapping[str, str]


# --- the tokenizer (RFC 7235 section 2.1, RFC 7230 section 3.2.6) --------------------------------------


@dataclass(slots=True)
class _RawChallenge:
    scheme: str
    params: dict[str, str]
    token68: str | None


class _Scanner:
    """A cursor over one header value; every syntax problem is a :class:`DigestParseError`."""

    def __init__(self, text: str) -> None:
        self.text = _OBS_FOLD.sub(" ", text)
        self.pos = 0

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ows(self) -> bool:
        start = self.pos
        while not self.at_end and self.text[self.pos] in (" ", "\t"):
            self.pos += 1
        return self.pos > start

    def skip_separators(self) -> None:
        """Skip optional whitespace and empty list elements (RFC 7230 section 7)."""
        while not self.at_end and self.peek() in (" ", "\t", ","):
            self.pos += 1

    def token(self) -> str | None:
        start = self.pos
        while not self.at_end and self.text[self.pos] in _TCHAR:
            self.pos += 1
        return self.text[start : self.pos] if self.pos > start else None

    def try_token68(self) -> str | None:
        """A token68 only if it stands alone up to the next comma or the end, else rewind."""
        start = self.pos
        while not self.at_end and self.text[self.pos] in _TOKEN68:
            self.pos += 1
        if self.pos == start:
            return None
        while self.peek() == "=":
            self.pos += 1
        value = self.text[start : self.pos]
        self.skip_ows()
        if self.at_end or self.peek() == ",":
            return value
        self.pos = start
        return None

    def quoted_string(self) -> str:
        self.pos += 1  # the opening quote
        out: list[str] = []
        while not self.at_end:
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                if self.at_end:
                    break
                escaped = self.text[self.pos]
                self.pos += 1
                if not (escaped in (" ", "\t") or 0x21 <= ord(escaped) <= 0x7E or ord(escaped) >= 0x80):
                    raise DigestParseError("invalid character after a backslash in a quoted string")
                out.append(escaped)
            elif ch in (" ", "\t") or 0x21 <= ord(ch) <= 0x7E or ord(ch) >= 0x80:
                out.append(ch)
            else:
                raise DigestParseError("control character in a quoted string")
        raise DigestParseError("unterminated quoted string")

    def auth_param(self) -> tuple[str, str]:
        name = self.token()
        if name is None:
            raise DigestParseError(f"expected a parameter name at offset {self.pos}")
        self.skip_ows()
        if self.peek() != "=":
            raise DigestParseError(f"expected '=' after parameter {name!r}")
        self.pos += 1
        self.skip_ows()
        if self.peek() == '"':
            value = self.quoted_string()
        else:
            bare = self.token()
            if bare is None:
                raise DigestParseError(f"parameter {name!r} has no value")
            value = bare
        return name.lower(), value

    def next_is_param(self) -> bool:
        """After a comma: does an ``auth-param`` follow (rather than a new challenge)?"""
        start = self.pos
        name = self.token()
        self.skip_ows()
        is_param = name is not None and self.peek() == "="
        self.pos = start
        return is_param

    def param_list(self, params: dict[str, str], *, stop_at_new_challenge: bool) -> None:
        """``#auth-param``; with ``stop_at_new_challenge`` a following challenge ends the list."""
        while True:
            name, value = self.auth_param()
            if name in params:
                raise DigestParseError(f"parameter {name!r} given twice")
            params[name] = value
            self.skip_ows()
            if self.at_end:
                return
            if self.peek() != ",":
                raise DigestParseError(f"expected ',' at offset {self.pos}")
            self.skip_separators()
            if self.at_end:
                return
            if stop_at_new_challenge and not self.next_is_param():
                return

    def challenge(self) -> _RawChallenge:
        scheme = self.token()
        if scheme is None:
            raise DigestParseError(f"expected an authentication scheme at offset {self.pos}")
        raw = _RawChallenge(scheme, {}, None)
        spaced = self.skip_ows()
        if self.at_end or self.peek() == ",":
            return raw
        if not spaced:
            raise DigestParseError(f"unexpected character after scheme {scheme!r}")
        raw.token68 = self.try_token68()
        if raw.token68 is None:
            self.param_list(raw.params, stop_at_new_challenge=True)
        return raw


def _challenge_list(header: str) -> list[_RawChallenge]:
    scanner = _Scanner(header)
    out: list[_RawChallenge] = []
    while True:
        scanner.skip_separators()
        if scanner.at_end:
            return out
        out.append(scanner.challenge())


# --- parsing ------------------------------------------------------------------------------------------


def parse_challenges(headers: str | Iterable[str]) -> list[Challenge]:
    """Every ``Digest`` challenge in one ``WWW-Authenticate`` value or several, in order.

    Challenges of other schemes are checked for syntax and skipped. An empty list means the server
    offered no Digest challenge at all; the caller decides what that means.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    challenges: list[Challenge] = []
    for value in values:
        if not isinstance(value, str):
            raise DigestParseError("a header value must be text")
        for raw in _challenge_list(value):
            if raw.scheme.lower() == "digest":
                challenges.append(_digest_challenge(raw))
    return challenges


def _digest_challenge(raw: _RawChallenge) -> Challenge:
    if raw.token68 is not None:
        raise DigestParseError("a Digest challenge takes parameters, not a token68")
    p = raw.params
    if "realm" not in p or "nonce" not in p:
        raise DigestParseError("a Digest challenge needs realm and nonce")
    return Challenge(
        realm=p["realm"],
        nonce=p["nonce"],
        algorithm=canonical_algorithm(p.get("algorithm", MD5)),
        qop=_qop_options(p.get("qop", "")),
        opaque=p.get("opaque"),
        stale=p.get("stale", "").lower() == "true",
        params=MappingProxyType(dict(p)),
    )


def _qop_options(value: str) -> tuple[str, ...]:
    options: list[str] = []
    for item in value.split(","):
        option = item.strip(" \t").lower()
        if not option:
            continue
        if not all(c in _TCHAR for c in option):
            raise DigestParseError("qop options must be tokens")
        if option not in options:
            options.append(option)
    return tuple(options)


def canonical_algorithm(name: str) -> str:
    """The canonical spelling of a known algorithm name (case-insensitive), else the name unchanged."""
    return SUPPORTED_ALGORITHMS.get(name.lower(), name)


def parse_auth_params(header: str) -> dict[str, str]:
    """A bare ``#auth-param`` list, as in ``Authentication-Info`` (lowercase names)."""
    if not isinstance(header, str):
        raise DigestParseError("a header value must be text")
    scanner = _Scanner(header)
    params: dict[str, str] = {}
    scanner.skip_separators()
    if not scanner.at_end:
        scanner.param_list(params, stop_at_new_challenge=False)
    return params


def select_challenge(
    challenges: Iterable[Challenge], algorithms: Iterable[str] = (AKAV1_MD5, AKAV2_MD5)
) -> Challenge | None:
    """The first challenge whose algorithm comes first in ``algorithms`` and whose qop we can do.

    A GBA_U client passes only ``AKAv1-MD5``: the card keeps CK and IK, which AKAv2 would need.
    """
    offered = list(challenges)
    for algorithm in algorithms:
        wanted = canonical_algorithm(algorithm)
        for challenge in offered:
            if challenge.algorithm == wanted and (not challenge.qop or _QOPS.intersection(challenge.qop)):
                return challenge
    return None


def split_nonce(nonce: str) -> AkaNonce:
    """Decode a Ub nonce: standard base64 (with padding) of RAND(16) ‖ AUTN(16) ‖ server data."""
    try:
        raw = base64.b64decode(nonce.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise DigestParseError("the nonce is not base64") from exc
    if len(raw) < RAND_LEN + AUTN_LEN:
        raise DigestParseError(f"the nonce holds {len(raw)} octets, RAND and AUTN need 32")
    return AkaNonce(raw[:RAND_LEN], raw[RAND_LEN : RAND_LEN + AUTN_LEN], raw[RAND_LEN + AUTN_LEN :])


def make_nonce(rand: bytes, autn: bytes, server_data: bytes = b"") -> str:
    """The BSF side of :func:`split_nonce`."""
    if len(rand) != RAND_LEN or len(autn) != AUTN_LEN:
        raise ValueError("RAND and AUTN are 16 octets each")
    return base64.b64encode(rand + autn + server_data).decode("ascii")


def parse_authorization(header: str) -> Credentials:
    """Parse ``Authorization: Digest ...`` (one set of credentials) for the server side."""
    if not isinstance(header, str):
        raise DigestParseError("a header value must be text")
    scanner = _Scanner(header)
    scanner.skip_ows()
    scheme = scanner.token()
    if scheme is None or scheme.lower() != "digest":
        raise DigestParseError("not Digest credentials")
    if not scanner.skip_ows():
        raise DigestParseError("Digest credentials without parameters")
    params: dict[str, str] = {}
    scanner.param_list(params, stop_at_new_challenge=False)
    if "username" not in params:
        raise DigestParseError("Digest credentials without a username")
    qop = params.get("qop")
    nc = params.get("nc")
    cnonce = params.get("cnonce")
    if qop is not None:
        qop = qop.lower()
        if qop not in _QOPS:
            raise DigestParseError(f"unsupported qop {qop!r}")
        if nc is None or cnonce is None:
            raise DigestParseError("qop requires nc and cnonce")
    if nc is not None and not _NC.match(nc):
        raise DigestParseError("nc must be 8 hex digits")
    auts: bytes | None = None
    if "auts" in params:
        try:
            auts = base64.b64decode(params["auts"].encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise DigestParseError("auts is not base64") from exc
    return Credentials(
        username=params["username"],
        realm=params.get("realm", ""),
        nonce=params.get("nonce", ""),
        uri=params.get("uri", ""),
        response=params.get("response", ""),
        algorithm=canonical_algorithm(params.get("algorithm", MD5)),
        qop=qop,
        nc=nc,
        cnonce=cnonce,
        opaque=params.get("opaque"),
        auts=auts,
        params=MappingProxyType(params),
    )


# --- digest computation -----------------------------------------------------------------------------


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _utf8(text: str) -> bytes:
    """Header text as hashed; lone surrogates (undecodable input) pass through instead of raising."""
    return text.encode("utf-8", "surrogatepass")


def aka_password(algorithm: str, res: bytes, ck: bytes | None = None, ik: bytes | None = None) -> bytes:
    """The Digest password for an AKA run: RES itself (AKAv1) or RFC 4169's HMAC over RES ‖ IK ‖ CK."""
    name = canonical_algorithm(algorithm)
    if name in (AKAV1_MD5, AKAV1_MD5_SESS):
        return bytes(res)
    if name in (AKAV2_MD5, AKAV2_MD5_SESS):
        if ck is None or ik is None:
            raise ValueError("AKAv2 needs CK and IK (not available when the card keeps them: GBA_U)")
        mac = hmac.new(bytes(res) + ik + ck, AKAV2_PASSWORD_LABEL, hashlib.md5).digest()
        return base64.b64encode(mac)
    raise ValueError(f"{algorithm!r} is not an AKA algorithm")


def compute_ha1(
    algorithm: str, username: str, realm: str, password: bytes, *, nonce: str = "", cnonce: str = ""
) -> str:
    """HA1 = MD5(username ":" realm ":" password); the ``-sess`` variants hash in nonce and cnonce."""
    ha1 = _md5_hex(_utf8(username) + b":" + _utf8(realm) + b":" + password)
    if canonical_algorithm(algorithm).lower().endswith("-sess"):
        ha1 = _md5_hex(_utf8(f"{ha1}:{nonce}:{cnonce}"))
    return ha1


def compute_ha2(method: str, uri: str, qop: str | None, body: bytes = b"") -> str:
    """HA2 = MD5(method ":" uri [":" MD5(body)]); the body is hashed only for ``auth-int``."""
    if qop == QOP_AUTH_INT:
        return _md5_hex(_utf8(f"{method}:{uri}:{_md5_hex(body)}"))
    return _md5_hex(_utf8(f"{method}:{uri}"))


def compute_response(ha1: str, nonce: str, nc: str | None, cnonce: str | None, qop: str | None, ha2: str) -> str:
    """KD(HA1, nonce ":" nc ":" cnonce ":" qop ":" HA2), or RFC 2069's KD(HA1, nonce ":" HA2) without qop."""
    if qop is None:
        return _md5_hex(_utf8(f"{ha1}:{nonce}:{ha2}"))
    return _md5_hex(_utf8(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))


def _check_supported(algorithm: str) -> None:
    """For the client side only, where the algorithm is the BSF's choice in its challenge."""
    if algorithm.lower() not in SUPPORTED_ALGORITHMS:
        raise BsfAnswerInvalid(f"unsupported Digest algorithm {algorithm!r}")


# --- header building ---------------------------------------------------------------------------------


def _quote(value: str) -> str:
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
        raise ValueError("control characters cannot go into a header")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bare(value: str) -> str:
    """A value sent as a token (qop, nc, algorithm); quoted if it happens not to be one."""
    return value if value and all(c in _TCHAR for c in value) else _quote(value)


def initial_authorization(username: str, realm: str, uri: str = "/") -> str:
    """The first Ub request's header: user name, empty nonce and response (TS 24.109 4.4.2, RFC 3310)."""
    return "Digest " + ", ".join(
        [
            f"username={_quote(username)}",
            f"realm={_quote(realm)}",
            'nonce=""',
            f"uri={_quote(uri)}",
            'response=""',
        ]
    )


def _choose_qop(challenge: Challenge, qop: str | None) -> str | None:
    if qop is not None:
        if qop not in challenge.qop:
            raise ValueError(f"qop {qop!r} was not offered")
        return qop
    if not challenge.qop:
        return None
    for option in (QOP_AUTH_INT, QOP_AUTH):
        if option in challenge.qop:
            return option
    raise BsfAnswerInvalid(f"no supported qop among {', '.join(challenge.qop)}")


def build_authorization(
    challenge: Challenge,
    username: str,
    password: bytes,
    *,
    method: str = "GET",
    uri: str = "/",
    body: bytes = b"",
    nc: int = 1,
    cnonce: str | None = None,
    auts: bytes | None = None,
    qop: str | None = None,
) -> tuple[str, DigestState]:
    """The ``Authorization`` value answering ``challenge``, and the state to check ``rspauth`` with.

    qop ``auth-int`` is preferred when offered (TS 24.109), else ``auth``; ``qop`` forces one.
    The cnonce is fresh and random unless given (tests). ``opaque`` and ``algorithm`` are echoed.
    With ``auts`` (raw 14 octets from the card) this is the resync answer, whose password must be
    empty (TS 24.109 4.4.4); use :func:`build_resync_authorization` for that.
    """
    _check_supported(challenge.algorithm)
    if auts is not None and password:
        raise ValueError("the resync answer is computed with an empty password")
    if not 1 <= nc <= 0xFFFFFFFF:
        raise ValueError("nc is an 8-hex-digit counter starting at 1")
    chosen = _choose_qop(challenge, qop)
    cnonce_value = secrets.token_hex(16) if cnonce is None else cnonce
    if not cnonce_value:
        raise ValueError("cnonce must not be empty")
    nc_text = f"{nc:08x}"
    ha1 = compute_ha1(
        challenge.algorithm, username, challenge.realm, password, nonce=challenge.nonce, cnonce=cnonce_value
    )
    ha2 = compute_ha2(method, uri, chosen, body)
    if chosen is None:
        response = compute_response(ha1, challenge.nonce, None, None, None, ha2)
    else:
        response = compute_response(ha1, challenge.nonce, nc_text, cnonce_value, chosen, ha2)
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
    ]
    if chosen is not None:
        parts += [f"qop={chosen}", f"nc={nc_text}", f"cnonce={_quote(cnonce_value)}"]
    parts.append(f"response={_quote(response)}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    if "algorithm" in challenge.params:
        parts.append(f"algorithm={_bare(challenge.params['algorithm'])}")
    if auts is not None:
        parts.append(f"auts={_quote(base64.b64encode(auts).decode('ascii'))}")
    state = DigestState(
        username=username,
        realm=challenge.realm,
        nonce=challenge.nonce,
        uri=uri,
        algorithm=challenge.algorithm,
        qop=chosen,
        nc=nc,
        cnonce=cnonce_value,
        opaque=challenge.opaque,
        ha1=ha1,
    )
    return "Digest " + ", ".join(parts), state


def build_resync_authorization(
    challenge: Challenge,
    username: str,
    auts: bytes,
    *,
    method: str = "GET",
    uri: str = "/",
    body: bytes = b"",
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """The synchronisation-failure answer: ``auts`` = base64(AUTS), response over an empty password."""
    header, _ = build_authorization(
        challenge, username, b"", method=method, uri=uri, body=body, nc=nc, cnonce=cnonce, auts=auts
    )
    return header


def verify_rspauth(state: DigestState, authentication_info: str, body: bytes = b"") -> bool:
    """Check the server's ``rspauth`` (mutual authentication), in constant time.

    HA2 has an empty method and, for ``auth-int``, the MD5 of the body bytes *as received*.
    A header that echoes a different qop, cnonce or nc than we sent is rejected too. A malformed
    header raises :class:`DigestParseError`; a missing or wrong ``rspauth`` returns False.
    """
    params = parse_auth_params(authentication_info)
    rspauth = params.get("rspauth")
    if rspauth is None:
        return False
    if "qop" in params and params["qop"].lower() != (state.qop or ""):
        return False
    if "cnonce" in params and params["cnonce"] != state.cnonce:
        return False
    if "nc" in params and (not _NC.match(params["nc"]) or int(params["nc"], 16) != state.nc):
        return False
    ha2 = compute_ha2("", state.uri, state.qop, body)
    if state.qop is None:
        expected = compute_response(state.ha1, state.nonce, None, None, None, ha2)
    else:
        expected = compute_response(state.ha1, state.nonce, f"{state.nc:08x}", state.cnonce, state.qop, ha2)
    return hmac.compare_digest(expected.encode(), _utf8(rspauth.lower()))


# --- server side -------------------------------------------------------------------------------------


def build_challenge(
    *,
    realm: str,
    nonce: str,
    algorithm: str = AKAV1_MD5,
    qop: Iterable[str] = (QOP_AUTH_INT,),
    opaque: str | None = None,
    stale: bool = False,
) -> str:
    """A ``WWW-Authenticate`` value with one Digest challenge (the BSF's 401)."""
    parts = [f"realm={_quote(realm)}", f"nonce={_quote(nonce)}"]
    options = list(qop)
    if options:
        parts.append(f"qop={_quote(','.join(options))}")
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    if stale:
        parts.append("stale=true")
    parts.append(f"algorithm={_bare(algorithm)}")
    return "Digest " + ", ".join(parts)


def _server_ha1(credentials: Credentials, password: bytes) -> str:
    if credentials.algorithm.lower() not in SUPPORTED_ALGORITHMS:  # neutral, as for a parse error
        raise DigestParseError(f"unsupported Digest algorithm {credentials.algorithm!r}")
    return compute_ha1(
        credentials.algorithm,
        credentials.username,
        credentials.realm,
        password,
        nonce=credentials.nonce,
        cnonce=credentials.cnonce or "",
    )


def expected_response(credentials: Credentials, password: bytes, *, method: str, body: bytes = b"") -> str:
    """The ``response`` the client should have sent, given the password the server knows (XRES-based)."""
    ha1 = _server_ha1(credentials, password)
    ha2 = compute_ha2(method, credentials.uri, credentials.qop, body)
    return compute_response(ha1, credentials.nonce, credentials.nc, credentials.cnonce, credentials.qop, ha2)


def verify_response(credentials: Credentials, password: bytes, *, method: str, body: bytes = b"") -> bool:
    """Constant-time check of the client's ``response``."""
    expected = expected_response(credentials, password, method=method, body=body)
    return hmac.compare_digest(expected.encode(), _utf8(credentials.response.lower()))


def compute_rspauth(credentials: Credentials, password: bytes, body: bytes = b"") -> str:
    """The server's ``rspauth`` over the response body it is about to send."""
    ha1 = _server_ha1(credentials, password)
    ha2 = compute_ha2("", credentials.uri, credentials.qop, body)
    return compute_response(ha1, credentials.nonce, credentials.nc, credentials.cnonce, credentials.qop, ha2)


def build_authentication_info(credentials: Credentials, password: bytes, body: bytes = b"") -> str:
    """The ``Authentication-Info`` value of the BSF's 200 OK (rspauth over exactly ``body``)."""
    parts = []
    if credentials.qop is not None:
        parts.append(f"qop={credentials.qop}")
    parts.append(f"rspauth={_quote(compute_rspauth(credentials, password, body))}")
    if credentials.cnonce is not None:
        parts.append(f"cnonce={_quote(credentials.cnonce)}")
    if credentials.nc is not None:
        parts.append(f"nc={credentials.nc}")
    return ", ".join(parts)
