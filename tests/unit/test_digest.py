"""Digest AKA (RFC 3310 / RFC 4169): the Ub vector, header parsing and the client/server round trip."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mn_secd.errors import BsfAnswerInvalid, Culprit, DigestParseError
from mn_secd.gba import bsfxml, digest
from mn_secd.gba.digest import AKAV1_MD5, AKAV2_MD5, Challenge

CNONCE = "0a4f113b"


@pytest.fixture
def ub(gba_vectors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return gba_vectors["ub-http-digest-akav1-md5"]


def _challenge(v: dict[str, Any], algorithm: str = AKAV1_MD5) -> Challenge:
    header = digest.build_challenge(
        realm=v["inputs"]["realm"], nonce=v["nonce"], algorithm=algorithm, opaque="5ccc069c403ebaf9f0171e9517f40e41"
    )
    (challenge,) = digest.parse_challenges(header)
    return challenge


# --- the derived Ub vector ------------------------------------------------------------------------------


def test_nonce_splits_into_rand_autn(ub: dict[str, Any]) -> None:
    n = digest.split_nonce(ub["nonce"])
    assert n.rand.hex() == ub["inputs"]["RAND"]
    assert n.autn.hex() == ub["inputs"]["AUTN"]
    assert n.server_data == b""
    assert digest.make_nonce(n.rand, n.autn) == ub["nonce"]


def test_nonce_keeps_server_data() -> None:
    nonce = digest.make_nonce(bytes(16), bytes(range(16)), b"opaque-server-bits")
    assert digest.split_nonce(nonce) == (bytes(16), bytes(range(16)), b"opaque-server-bits")


def test_ha1_ha2_response(ub: dict[str, Any]) -> None:
    i = ub["inputs"]
    res = bytes.fromhex(i["RES"])
    ha1 = digest.compute_ha1(AKAV1_MD5, i["IMPI"], i["realm"], res)
    ha2 = digest.compute_ha2(i["method"], i["uri"], i["qop"], bytes.fromhex(i["entity_body_hex"]))
    assert ha1 == ub["HA1_akav1"]
    assert ha2 == ub["HA2_auth_int"]
    assert digest.compute_response(ha1, ub["nonce"], i["nc"], i["cnonce"], i["qop"], ha2) == ub["response_akav1"]


def test_akav1_password_is_raw_res(ub: dict[str, Any]) -> None:
    res = bytes.fromhex(ub["inputs"]["RES"])
    assert digest.aka_password("akav1-md5", res) == res


def test_authorization_answer_matches_vector_and_round_trips(ub: dict[str, Any]) -> None:
    i = ub["inputs"]
    res = bytes.fromhex(i["RES"])
    header, state = digest.build_authorization(_challenge(ub), i["IMPI"], res, cnonce=CNONCE)
    creds = digest.parse_authorization(header)
    assert creds.response == ub["response_akav1"]
    assert (creds.username, creds.realm, creds.nonce, creds.uri) == (i["IMPI"], i["realm"], ub["nonce"], "/")
    assert (creds.qop, creds.nc, creds.cnonce) == ("auth-int", "00000001", CNONCE)
    assert creds.opaque == "5ccc069c403ebaf9f0171e9517f40e41"
    assert creds.algorithm == AKAV1_MD5 and "algorithm=AKAv1-MD5" in header
    assert digest.verify_response(creds, res, method="GET")
    assert not digest.verify_response(creds, bytes(8), method="GET")
    assert state.ha1 == ub["HA1_akav1"]
    assert ub["HA1_akav1"] not in repr(state)


def test_akav2_password_and_response(ub: dict[str, Any]) -> None:
    i = ub["inputs"]
    password = digest.aka_password(
        AKAV2_MD5, bytes.fromhex(i["RES"]), ck=bytes.fromhex(i["CK"]), ik=bytes.fromhex(i["IK"])
    )
    assert password == ub["akav2_password"].encode()
    header, _ = digest.build_authorization(_challenge(ub, AKAV2_MD5), i["IMPI"], password, cnonce=CNONCE)
    assert digest.parse_authorization(header).response == ub["response_akav2"]


def test_akav2_needs_ck_ik() -> None:
    with pytest.raises(ValueError):
        digest.aka_password(AKAV2_MD5, bytes(8))
    with pytest.raises(ValueError):
        digest.aka_password("MD5", bytes(8))


def test_sync_failure_answer(ub: dict[str, Any]) -> None:
    auts = bytes.fromhex("4f2039392ddd4bb4316ed4a14688")
    header = digest.build_resync_authorization(_challenge(ub), ub["inputs"]["IMPI"], auts, cnonce=CNONCE)
    creds = digest.parse_authorization(header)
    assert creds.response == ub["response_sync_failure_empty_password"]
    assert creds.auts == auts
    assert f'auts="{base64.b64encode(auts).decode()}"' in header
    with pytest.raises(ValueError):
        digest.build_authorization(_challenge(ub), "u", b"res", auts=auts)


def test_rspauth_over_body(ub: dict[str, Any]) -> None:
    i = ub["inputs"]
    res = bytes.fromhex(i["RES"])
    body = ub["bsf_200_body_utf8"].encode()
    header, state = digest.build_authorization(_challenge(ub), i["IMPI"], res, cnonce=CNONCE)
    creds = digest.parse_authorization(header)
    info = digest.build_authentication_info(creds, res, body)
    assert digest.parse_auth_params(info)["rspauth"] == ub["rspauth_akav1_over_body"]
    assert digest.verify_rspauth(state, info, body)
    # the body the client hashes is the one it received, byte for byte
    assert not digest.verify_rspauth(state, info, body.replace(b"2030", b"2031"))
    assert not digest.verify_rspauth(state, info.replace(ub["rspauth_akav1_over_body"], "0" * 32), body)
    assert not digest.verify_rspauth(state, info.replace(CNONCE, "deadbeef"), body)
    assert not digest.verify_rspauth(state, info.replace("nc=00000001", "nc=00000002"), body)
    assert not digest.verify_rspauth(state, info.replace("qop=auth-int", "qop=auth"), body)
    assert not digest.verify_rspauth(state, "qop=auth-int, nc=00000001", body)
    # uppercase hex is the same digest
    upper = info.replace(ub["rspauth_akav1_over_body"], ub["rspauth_akav1_over_body"].upper())
    assert digest.verify_rspauth(state, upper, body)


def test_bsf_body_builder_reproduces_vector_body(ub: dict[str, Any]) -> None:
    info = bsfxml.parse_bootstrapping_info(ub["bsf_200_body_utf8"].encode())
    assert bsfxml.build_bootstrapping_info(info.btid, info.lifetime) == ub["bsf_200_body_utf8"].encode()


# --- the client side ------------------------------------------------------------------------------------


def test_initial_authorization_has_empty_nonce_and_response() -> None:
    header = digest.initial_authorization("001010000000001@ims.mnc001.mcc001.3gppnetwork.org", "bsf.example")
    assert header.startswith("Digest ")
    creds = digest.parse_authorization(header)
    assert (creds.nonce, creds.response, creds.uri, creds.realm) == ("", "", "/", "bsf.example")


def test_qop_auth_and_no_qop() -> None:
    nonce = digest.make_nonce(bytes(16), bytes(16))
    auth = digest.parse_challenges(f'Digest realm="r", nonce="{nonce}", qop="auth", algorithm=AKAv1-MD5')[0]
    header, state = digest.build_authorization(auth, "u", b"pw", cnonce="c", body=b"ignored for auth")
    creds = digest.parse_authorization(header)
    assert creds.qop == "auth" and state.qop == "auth"
    expected_ha2 = digest.compute_ha2("GET", "/", "auth")
    ha1 = digest.compute_ha1(AKAV1_MD5, "u", "r", b"pw")
    assert creds.response == digest.compute_response(ha1, nonce, "00000001", "c", "auth", expected_ha2)
    plain = digest.parse_challenges(f'Digest realm="r", nonce="{nonce}", algorithm=AKAv1-MD5')[0]
    header, state = digest.build_authorization(plain, "u", b"pw")
    creds = digest.parse_authorization(header)
    assert creds.qop is None and creds.nc is None and "cnonce" not in header
    assert creds.response == digest.compute_response(ha1, nonce, None, None, None, expected_ha2)
    assert digest.verify_response(creds, b"pw", method="GET")
    info = digest.build_authentication_info(creds, b"pw")
    assert digest.verify_rspauth(state, info)


def test_auth_int_preferred_and_forced_qop() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", qop="auth, auth-int"')[0]
    assert digest.build_authorization(c, "u", b"p")[1].qop == "auth-int"
    assert digest.build_authorization(c, "u", b"p", qop="auth")[1].qop == "auth"
    with pytest.raises(ValueError):
        digest.build_authorization(
            digest.parse_challenges('Digest realm="r", nonce="n", qop=auth')[0], "u", b"p", qop="auth-int"
        )


def test_body_hashed_for_auth_int() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", qop=auth-int')[0]
    header, _ = digest.build_authorization(c, "u", b"p", method="POST", body=b"payload", cnonce="x")
    creds = digest.parse_authorization(header)
    assert digest.verify_response(creds, b"p", method="POST", body=b"payload")
    assert not digest.verify_response(creds, b"p", method="POST", body=b"other")
    assert not digest.verify_response(creds, b"p", method="GET", body=b"payload")


def test_fresh_cnonce_each_time() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", qop=auth-int')[0]
    cnonces = {digest.build_authorization(c, "u", b"p")[1].cnonce for _ in range(20)}
    assert len(cnonces) == 20 and all(len(x) >= 16 for x in cnonces)


def test_nc_formatting() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", qop=auth')[0]
    header, state = digest.build_authorization(c, "u", b"p", nc=26)
    assert "nc=0000001a" in header and state.nc == 26
    with pytest.raises(ValueError):
        digest.build_authorization(c, "u", b"p", nc=0)


def test_opaque_and_algorithm_echoed_verbatim() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", algorithm="akav1-md5", opaque="o\\"p"')[0]
    assert c.algorithm == AKAV1_MD5 and c.is_aka
    header, _ = digest.build_authorization(c, "u", b"p")
    creds = digest.parse_authorization(header)
    assert creds.opaque == 'o"p'
    assert creds.params["algorithm"] == "akav1-md5"


def test_unsupported_algorithm_or_qop_is_a_bsf_error() -> None:
    with pytest.raises(BsfAnswerInvalid):
        digest.build_authorization(
            digest.parse_challenges('Digest realm="r", nonce="n", algorithm=SHA-256')[0], "u", b""
        )
    with pytest.raises(BsfAnswerInvalid):
        digest.build_authorization(digest.parse_challenges('Digest realm="r", nonce="n", qop="auth-conf"')[0], "u", b"")


def test_sess_algorithms_hash_nonce_and_cnonce() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n", qop=auth, algorithm=AKAv1-MD5-sess')[0]
    header, state = digest.build_authorization(c, "u", b"res", cnonce="cn")
    plain = digest.compute_ha1(AKAV1_MD5, "u", "r", b"res")
    assert state.ha1 == digest.compute_ha1("AKAv1-MD5-sess", "u", "r", b"res", nonce="n", cnonce="cn") != plain
    assert digest.verify_response(digest.parse_authorization(header), b"res", method="GET")


def test_header_injection_refused() -> None:
    c = digest.parse_challenges('Digest realm="r", nonce="n"')[0]
    with pytest.raises(ValueError):
        digest.build_authorization(c, "evil\r\nX-Injected: 1", b"p")


# --- WWW-Authenticate parsing ---------------------------------------------------------------------------


def test_several_challenges_in_one_header() -> None:
    header = (
        'Basic realm="basic", Digest realm="a", nonce="n1", qop="auth,auth-int", algorithm=akav1-md5, '
        'Newauth realm="x", type=1, title="Login to \\"apps\\"", Negotiate YWJjZA==, '
        "Digest realm=b,nonce=n2,algorithm=AKAv2-MD5,stale=TRUE, Bearer"
    )
    a, b = digest.parse_challenges(header)
    assert (a.realm, a.nonce, a.algorithm, a.qop, a.stale) == ("a", "n1", AKAV1_MD5, ("auth", "auth-int"), False)
    assert (b.realm, b.nonce, b.algorithm, b.qop, b.stale) == ("b", "n2", AKAV2_MD5, (), True)


def test_several_headers() -> None:
    challenges = digest.parse_challenges(
        ['Basic realm="x"', 'Digest realm="r", nonce="n"', 'DIGEST REALM="s", NONCE=m']
    )
    assert [(c.realm, c.nonce) for c in challenges] == [("r", "n"), ("s", "m")]
    assert challenges[0].algorithm == "MD5" and not challenges[0].is_aka


def test_whitespace_order_and_folding() -> None:
    header = 'Digest\t  qop = "auth-int" ,opaque=abc,\r\n   nonce =\t"n" ,, realm="r\\\\x"  ,'
    (c,) = digest.parse_challenges(header)
    assert (c.realm, c.nonce, c.opaque, c.qop) == ("r\\x", "n", "abc", ("auth-int",))
    assert dict(c.params) == {"qop": "auth-int", "opaque": "abc", "nonce": "n", "realm": "r\\x"}


def test_qop_list_normalised() -> None:
    (c,) = digest.parse_challenges('Digest realm="r", nonce="n", qop=" AUTH , auth-int,,auth "')
    assert c.qop == ("auth", "auth-int")


def test_no_digest_challenge_is_empty_list() -> None:
    assert digest.parse_challenges('Basic realm="x", Negotiate abc==') == []
    assert digest.parse_challenges("") == []
    assert digest.parse_challenges([]) == []


@pytest.mark.parametrize(
    "header",
    [
        'Digest realm="r", nonce="unterminated',
        'Digest realm="r", nonce=',
        'Digest realm="r"',  # no nonce
        'Digest nonce="n"',  # no realm
        'Digest realm="r", realm="s", nonce="n"',  # duplicate parameter
        'Digest realm="r" nonce="n"',  # missing comma
        'Digest realm="r\x01", nonce="n"',  # control character
        "Digest abcd==",  # token68 for Digest
        "=",
        '"Digest"',
        'Digest realm="r", nonce="n", qop="auth int"',  # qop option that is not a token
        'Digest realm="r", nonce="n", "x"',
        "Digest, realm=r",
        'Digest realm="r", nonce="n"\r\nX: y',  # a bare line break is not folding
        'Digest realm="r\\',
        'Digest@ realm="r"',
    ],
)
def test_malformed_challenges(header: str) -> None:
    with pytest.raises(DigestParseError):
        digest.parse_challenges(header)


def test_select_challenge() -> None:
    challenges = digest.parse_challenges(
        'Digest realm="a", nonce="1", algorithm=MD5, '
        'Digest realm="b", nonce="2", algorithm=AKAv2-MD5, qop="auth-conf", '
        'Digest realm="c", nonce="3", algorithm=AKAv2-MD5, qop=auth, '
        'Digest realm="d", nonce="4", algorithm=AKAv1-MD5, qop=auth-int'
    )
    chosen = digest.select_challenge(challenges)
    assert chosen is not None and chosen.realm == "d"
    chosen = digest.select_challenge(challenges, (AKAV2_MD5, AKAV1_MD5))
    assert chosen is not None and chosen.realm == "c"
    assert digest.select_challenge(challenges[:2]) is None


@pytest.mark.parametrize(
    "nonce",
    ["", "not base64!", "I1U8vpY3qJ0hiuZNrke/NQ==", "I1U8vpY3qJ0hiuZNrke/NVXzKLQ1d7m5Sp/6w1Tfr7M", "é" * 44],
)
def test_bad_nonces(nonce: str) -> None:
    with pytest.raises(DigestParseError):
        digest.split_nonce(nonce)


# --- Authorization parsing (server side) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwdw==",
        "Digest",
        'Digest realm="r", nonce="n"',  # no username
        'Digest username="u", qop=auth, nc=00000001',  # no cnonce
        'Digest username="u", qop=auth, cnonce="c"',  # no nc
        'Digest username="u", qop=auth, nc=1, cnonce="c"',  # nc not 8 hex digits
        'Digest username="u", qop=auth-conf, nc=00000001, cnonce="c"',
        'Digest username="u", auts="!!!"',
        'Digest username="u", username="v"',
        'Digest username="u", Digest username="v"',
    ],
)
def test_malformed_authorization(header: str) -> None:
    with pytest.raises(DigestParseError):
        digest.parse_authorization(header)


def test_parse_errors_blame_no_side() -> None:
    """Client and BSF share the parser: its error names no culprit, each end assigns one."""
    for parse, header in (
        (digest.parse_challenges, 'Digest realm="r'),
        (digest.parse_authorization, 'Digest username="u", username="v"'),
        (digest.parse_auth_params, 'rspauth="x'),
    ):
        with pytest.raises(DigestParseError) as info:
            parse(header)
        assert type(info.value) is DigestParseError and info.value.culprit is Culprit.LOCAL
    creds = digest.parse_authorization('Digest username="u", realm="r", nonce="n", uri="/", algorithm=SHA-256')
    with pytest.raises(DigestParseError) as info:  # the server side: the client named the algorithm
        digest.verify_response(creds, b"p", method="GET")
    assert info.value.culprit is Culprit.LOCAL


def test_authentication_info_syntax_errors_raise() -> None:
    state = digest.build_authorization(digest.parse_challenges('Digest realm="r", nonce="n", qop=auth')[0], "u", b"p")[
        1
    ]
    with pytest.raises(DigestParseError):
        digest.verify_rspauth(state, 'rspauth="unterminated')
    assert not digest.verify_rspauth(state, "")


# --- properties ------------------------------------------------------------------------------------------------

_header_text = st.text(
    alphabet=st.sampled_from(list(' \t,=";\\\r\nabcDigestrealmnonceqopauth-int\x00\x7fé\ud800')) | st.characters(),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(_header_text)
def test_arbitrary_headers_raise_only_digest_parse_error(text: str) -> None:
    for parse in (digest.parse_challenges, digest.parse_auth_params, digest.parse_authorization, digest.split_nonce):
        with contextlib.suppress(DigestParseError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(_header_text)
def test_arbitrary_digest_params_raise_only_digest_parse_error(text: str) -> None:
    state = digest.build_authorization(digest.parse_challenges('Digest realm="r", nonce="n", qop=auth')[0], "u", b"p")[
        1
    ]
    for header in ("Digest " + text, 'Digest realm="r", nonce="n", ' + text):
        with contextlib.suppress(DigestParseError):
            digest.parse_challenges(header)
    with contextlib.suppress(DigestParseError):
        digest.verify_rspauth(state, text)


_printable = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(realm=_printable, nonce=_printable, opaque=st.none() | _printable, stale=st.booleans())
def test_built_challenges_parse_back(realm: str, nonce: str, opaque: str | None, stale: bool) -> None:
    header = digest.build_challenge(realm=realm, nonce=nonce, opaque=opaque, stale=stale, qop=("auth", "auth-int"))
    (c,) = digest.parse_challenges([header, 'Basic realm="other"'])
    assert (c.realm, c.nonce, c.opaque, c.stale, c.qop, c.algorithm) == (
        realm,
        nonce,
        opaque,
        stale,
        ("auth", "auth-int"),
        AKAV1_MD5,
    )


@settings(max_examples=100, deadline=None)
@given(username=_printable.filter(bool), password=st.binary(max_size=16), body=st.binary(max_size=64))
def test_client_and_server_agree(username: str, password: bytes, body: bytes) -> None:
    challenge = digest.parse_challenges(
        digest.build_challenge(realm="r", nonce=digest.make_nonce(bytes(16), bytes(16)))
    )[0]
    header, state = digest.build_authorization(challenge, username, password, method="POST", body=body)
    creds = digest.parse_authorization(header)
    assert creds.username == username
    assert digest.verify_response(creds, password, method="POST", body=body)
    assert digest.verify_rspauth(state, digest.build_authentication_info(creds, password, body[::-1]), body[::-1])
