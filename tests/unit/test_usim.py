"""The software UICC at the APDU level: files, channels, T=0, AUTHENTICATE (3G and GBA), persistence."""

from __future__ import annotations

import shutil
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mn_secd.aka import AkaSuccess, AuthContext
from mn_secd.gba.kdf import ks_int_naf, ks_naf
from mn_secd.sim.milenage import Milenage, generate_autn, verify_auts
from mn_secd.sim.profile import CardProfile, load_profile
from mn_secd.sim.sqn import SqnState, join_sqn, split_sqn
from mn_secd.sim.usim import ISIM_AID, USIM_AID, AppKind, SoftUicc
from mn_secd.ua import UaId, naf_id
from mn_secd.uicc.auth import build_authenticate, parse_authenticate_response

ETC = Path(__file__).parent.parent.parent / "etc" / "sim"
K1 = bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc")
OPC1 = bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf")
IMPI = "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def profile(**changes: Any) -> CardProfile:
    base = CardProfile(
        iccid="89882110000000000018", imsi="001010000000001", mnc_length=2, k=K1, opc=OPC1, isim=True, gba_u=True
    )
    return replace(base, **changes)


class Host:
    """A minimal T=0 host: follows 61xx with GET RESPONSE and 6Cxx with a resend, on the command's channel."""

    def __init__(self, card: SoftUicc) -> None:
        self.card = card
        self.raw: list[tuple[bytes, bytes]] = []

    def send(self, apdu: bytes) -> bytes:
        answer = self.card.process_apdu(apdu)
        self.raw.append((apdu, answer))
        return answer

    def transmit(self, apdu: bytes | str) -> tuple[bytes, int]:
        cmd = h(apdu) if isinstance(apdu, str) else apdu
        answer = self.send(cmd)
        sw = int.from_bytes(answer[-2:], "big")
        if sw >> 8 == 0x6C:
            answer = self.send(cmd[:4] + bytes([sw & 0xFF]))
            sw = int.from_bytes(answer[-2:], "big")
        data = answer[:-2]
        while sw >> 8 == 0x61:
            answer = self.send(bytes([cmd[0], 0xC0, 0x00, 0x00, sw & 0xFF]))
            data += answer[:-2]
            sw = int.from_bytes(answer[-2:], "big")
        return data, sw

    def select_aid(self, aid: bytes, cla: int = 0x00) -> bytes:
        data, sw = self.transmit(bytes([cla, 0xA4, 0x04, 0x04, len(aid)]) + aid)
        assert sw == 0x9000
        return data

    def select_fid(self, fid: int, cla: int = 0x00) -> bytes:
        data, sw = self.transmit(bytes([cla, 0xA4, 0x00, 0x04, 0x02]) + fid.to_bytes(2, "big"))
        assert sw == 0x9000, f"{sw:04X}"
        return data

    def read_binary(self, cla: int = 0x00) -> bytes:
        data, sw = self.transmit(bytes([cla, 0xB0, 0x00, 0x00, 0x00]))
        assert sw == 0x9000
        return data

    def read_record(self, n: int, cla: int = 0x00) -> bytes:
        data, sw = self.transmit(bytes([cla, 0xB2, n, 0x04, 0x00]))
        assert sw == 0x9000
        return data

    def authenticate(self, p2: int, body: bytes, cla: int = 0x00) -> tuple[bytes, int]:
        return self.transmit(bytes([cla, 0x88, 0x00, p2, len(body)]) + body)


def tlvs(data: bytes) -> dict[int, bytes]:
    """One level of simple one-octet-tag, one-octet-length TLVs (enough for this card's FCPs)."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data) and data[i] != 0xFF:
        tag, length = data[i], data[i + 1]
        out[tag] = data[i + 2 : i + 2 + length]
        i += 2 + length
    return out


def fresh_state_for(sqn: bytes) -> SqnState:
    seq, _ = split_sqn(sqn, 5)
    return SqnState(5, (seq - 1,) * 32)


def kc_of(ck: bytes, ik: bytes) -> bytes:
    return bytes(a ^ b ^ c ^ d for a, b, c, d in zip(ck[:8], ck[8:], ik[:8], ik[8:], strict=True))


def challenge(p: CardProfile, sqn: bytes, rand: bytes = bytes(range(16)), amf: bytes = b"\x80\x00") -> bytes:
    """RAND (16) ‖ AUTN (16) for this card and SQN."""
    return rand + generate_autn(Milenage(p.k, p.opc), rand, sqn, amf)


def auth_body(rand_autn: bytes, gba: bool = False) -> bytes:
    return (b"\xdd" if gba else b"") + b"\x10" + rand_autn[:16] + b"\x10" + rand_autn[16:]


# --- TS 35.208 through AUTHENTICATE ---------------------------------------------------------------


def test_every_35208_set_through_authenticate(milenage_vectors: list[dict[str, Any]]) -> None:
    assert len(milenage_vectors) == 20
    for v in milenage_vectors:
        sqn, rand = h(v["SQN"]), h(v["RAND"])
        p = profile(k=h(v["K"]), opc=h(v["OPc"]), amf=h(v["AMF"]), card_state=fresh_state_for(sqn))
        saved: list[CardProfile] = []
        card = SoftUicc(p, on_state_change=saved.append)
        host = Host(card)
        host.select_aid(USIM_AID)
        autn = h(v["derived_AUTN"])
        apdu = h("00 88 00 81 22 10") + rand + b"\x10" + autn
        first = card.process_apdu(apdu)
        assert first == h("61 35"), f"set {v['set']}"
        answer = card.process_apdu(h("00 C0 00 00 35"))
        ck, ik = h(v["f3_CK"]), h(v["f4_IK"])
        expected = b"\xdb\x08" + h(v["f2_RES"]) + b"\x10" + ck + b"\x10" + ik + b"\x08" + kc_of(ck, ik)
        assert answer == expected + h("90 00"), f"set {v['set']}"
        # The host-side codec reads the same bytes back.
        result = parse_authenticate_response(answer[:-2], 0x9000, AuthContext.UMTS)
        assert isinstance(result, AkaSuccess) and result.res == h(v["f2_RES"])
        # The accepted SEQ is recorded in its IND slot and handed over for persistence before RES left.
        seq, ind = split_sqn(sqn, 5)
        assert len(saved) == 1 and saved[0].card_state.seq_ms[ind] == seq
        assert card.profile.card_state == saved[0].card_state


def test_isim_3g_answer_has_no_kc_and_usim_without_gsm_access_neither() -> None:
    sqn = join_sqn(1, 0, 5)
    p = profile()
    host = Host(SoftUicc(p))
    host.select_aid(ISIM_AID)
    data, sw = host.authenticate(0x81, auth_body(challenge(p, sqn)))
    assert sw == 0x9000 and len(data) == 44
    p2 = profile(gsm_access=False)
    host2 = Host(SoftUicc(p2))
    host2.select_aid(USIM_AID)
    data, sw = host2.authenticate(0x81, auth_body(challenge(p2, sqn)))
    assert sw == 0x9000 and len(data) == 44
    res, ck, ik, _ = Milenage(K1, OPC1).f2345(bytes(range(16)))
    assert data == b"\xdb\x08" + res + b"\x10" + ck + b"\x10" + ik


@pytest.mark.parametrize("length", [4, 8, 11, 16])
def test_res_has_the_profiles_length_in_both_contexts(length: int) -> None:
    """TS 33.102 allows 4 to 16 octets: 8 is Milenage's f2, shorter ones its leading octets."""
    p = profile(res_length=length, gba_u=True)
    host = Host(SoftUicc(p))
    host.select_aid(USIM_AID)
    data, sw = host.authenticate(0x81, auth_body(challenge(p, join_sqn(1, 0, 5))))
    res, ck, _, _ = Milenage(K1, OPC1).f2345(bytes(range(16)), length)
    assert sw == 0x9000 and data[: 2 + length] == bytes([0xDB, length]) + res and data[2 + length :][1:17] == ck
    eight = Milenage(K1, OPC1).f2345(bytes(range(16)))[0]
    assert res[:8] == eight[:length]  # the same f2, cut or extended
    data, sw = host.authenticate(0x84, auth_body(challenge(p, join_sqn(2, 0, 5)), gba=True))
    assert sw == 0x9000 and data[:2] == bytes([0xDB, length]) and len(data) == 2 + length


def test_host_codec_command_is_accepted_with_trailing_le() -> None:
    p = profile()
    host = Host(SoftUicc(p))
    host.select_aid(USIM_AID)
    rand_autn = challenge(p, join_sqn(1, 0, 5))
    data, sw = host.transmit(build_authenticate(rand_autn[:16], rand_autn[16:], AuthContext.UMTS))
    assert sw == 0x9000 and data[0] == 0xDB


# --- resynchronisation and MAC failure ------------------------------------------------------------


@pytest.mark.parametrize("v_index", [0, 7, 19])
def test_stale_sqn_gives_auts_that_verifies(milenage_vectors: list[dict[str, Any]], v_index: int) -> None:
    v = milenage_vectors[v_index]
    sqn = h(v["SQN"])
    seq, _ = split_sqn(sqn, 5)
    # Every slot has already seen this SEQ (slot 3 one more): the challenge is a replay wherever its IND.
    state = SqnState(5, tuple(seq + (i == 3) for i in range(32)))
    p = profile(k=h(v["K"]), opc=h(v["OPc"]), card_state=state)
    saved: list[CardProfile] = []
    card = SoftUicc(p, on_state_change=saved.append)
    host = Host(card)
    host.select_aid(USIM_AID)
    data, sw = host.authenticate(0x81, auth_body(h(v["RAND"]) + h(v["derived_AUTN"])))
    assert sw == 0x9000 and data[:2] == h("DC 0E") and len(data) == 16
    assert host.raw[-2][1] == h("61 10")
    m = Milenage(h(v["K"]), h(v["OPc"]))
    sqn_ms = verify_auts(m, h(v["RAND"]), data[2:])
    assert sqn_ms == join_sqn(seq + 1, 3, 5) == state.sqn_ms  # f5* recovers SQN_MS, f1* checks MAC-S
    assert verify_auts(Milenage(h(v["K"]), bytes(16)), h(v["RAND"]), data[2:]) is None
    assert saved == [] and card.profile.card_state == state


def test_replayed_challenge_is_answered_with_auts() -> None:
    p = profile()
    host = Host(SoftUicc(p))
    host.select_aid(USIM_AID)
    body = auth_body(challenge(p, join_sqn(4, 2, 5)))
    assert host.authenticate(0x81, body)[0][0] == 0xDB
    data, sw = host.authenticate(0x81, body)
    assert sw == 0x9000 and data[0] == 0xDC
    assert verify_auts(Milenage(K1, OPC1), bytes(range(16)), data[2:]) == join_sqn(4, 2, 5)


def test_mac_failure_is_9862_and_checked_before_sqn() -> None:
    p = profile()
    card = SoftUicc(p)
    host = Host(card)
    host.select_aid(USIM_AID)
    rand_autn = bytearray(challenge(p, join_sqn(1, 0, 5)))
    rand_autn[-1] ^= 0x01
    assert host.authenticate(0x81, auth_body(bytes(rand_autn))) == (b"", 0x9862)
    assert card.process_apdu(h("00 C0 00 00 00")) == h("69 85")  # nothing to fetch
    assert card.profile.card_state == SqnState.new()
    # A stale SQN with a wrong MAC is still a MAC failure: the card tells a forger nothing about SQN_MS.
    stale = profile(card_state=SqnState(5, (9,) * 32))
    host2 = Host(SoftUicc(stale))
    host2.select_aid(USIM_AID)
    forged = bytearray(challenge(stale, join_sqn(1, 0, 5)))
    forged[-3] ^= 0x80
    assert host2.authenticate(0x81, auth_body(bytes(forged))) == (b"", 0x9862)


# --- GBA_U ----------------------------------------------------------------------------------------


def gba_bootstrap(host: Host, p: CardProfile, sqn: bytes, rand: bytes) -> bytes:
    data, sw = host.authenticate(0x84, auth_body(challenge(p, sqn, rand), gba=True))
    assert sw == 0x9000
    return data


def test_gba_bootstrap_and_naf_derivation() -> None:
    p = profile()
    card = SoftUicc(p)
    host = Host(card)
    host.select_aid(USIM_AID)
    rand = bytes.fromhex("0f" * 16)
    data = gba_bootstrap(host, p, join_sqn(1, 0, 5), rand)
    res, ck, ik, _ = Milenage(K1, OPC1).f2345(rand)
    assert data == b"\xdb\x08" + res  # RES only: CK and IK stay in the card
    assert host.raw[-2][1] == h("61 0A")

    host.select_fid(0x6FD6)
    assert host.read_binary()[:19] == b"\x10" + rand + b"\x00\x00"
    btid = b"DwcnHrCvvy8SdlcRG2GN+Q==@bsf.mnc001.mcc001.pub.3gppnetwork.org"
    lifetime = b"2030-01-01T00:00:00Z"
    gbabp = b"\x10" + rand + bytes([len(btid)]) + btid + bytes([len(lifetime)]) + lifetime
    assert host.transmit(h("00 D6 00 00") + bytes([len(gbabp)]) + gbabp) == (b"", 0x9000)
    assert host.read_binary()[: len(gbabp)] == gbabp

    nid = naf_id("naf.example.org", UaId.parse("dtls-psk"))
    body = b"\xde" + bytes([len(nid)]) + nid + bytes([len(IMPI)]) + IMPI.encode()
    data, sw = host.authenticate(0x84, body)
    assert sw == 0x9000
    assert data == b"\xdb\x20" + ks_naf(ck + ik, rand, IMPI, nid)
    assert card.ks_int_naf(nid) == ks_int_naf(ck + ik, rand, IMPI, nid)
    assert card.ks_int_naf(nid, AppKind.ISIM) is None

    host.select_fid(0x6FDA)
    record = host.read_record(1)
    assert len(record) == 255
    assert record[: 4 + len(nid) + len(btid)] == b"\x80" + bytes([len(nid)]) + nid + b"\x81" + bytes([len(btid)]) + btid
    assert set(host.read_record(2)) == {0xFF}


def test_gba_on_the_isim_uses_its_own_files() -> None:
    p = profile()
    card = SoftUicc(p)
    host = Host(card)
    host.select_aid(ISIM_AID)
    rand = bytes.fromhex("a5" * 16)
    gba_bootstrap(host, p, join_sqn(1, 1, 5), rand)
    host.select_fid(0x6FD5)
    assert host.read_binary()[:17] == b"\x10" + rand
    nid = naf_id("naf.example.org", UaId.parse("http-digest"))
    body = b"\xde" + bytes([len(nid)]) + nid + bytes([len(IMPI)]) + IMPI.encode()
    data, sw = host.authenticate(0x84, body)
    _, ck, ik, _ = Milenage(K1, OPC1).f2345(rand)
    assert sw == 0x9000 and data[2:] == ks_naf(ck + ik, rand, IMPI, nid)
    host.select_fid(0x6FD7)
    assert host.read_record(1)[:2] == b"\x80" + bytes([len(nid)])
    # The USIM has not bootstrapped: it refuses a NAF derivation.
    host.select_aid(USIM_AID)
    assert host.authenticate(0x84, body) == (b"", 0x6985)


def test_naf_derivation_without_bootstrap_is_6985() -> None:
    host = Host(SoftUicc(profile()))
    host.select_aid(USIM_AID)
    nid = naf_id("naf.example.org", UaId.parse("dtls-psk"))
    assert host.authenticate(0x84, b"\xde" + bytes([len(nid)]) + nid + b"\x01a") == (b"", 0x6985)


def test_gba_bootstrap_sync_and_mac_failures() -> None:
    p = profile(card_state=SqnState(5, (3,) * 32))
    card = SoftUicc(p)
    host = Host(card)
    host.select_aid(USIM_AID)
    data, sw = host.authenticate(0x84, auth_body(challenge(p, join_sqn(2, 0, 5)), gba=True))
    assert sw == 0x9000 and data[:2] == h("DC 0E")
    forged = bytearray(challenge(p, join_sqn(9, 0, 5)))
    forged[20] ^= 0x01
    assert host.authenticate(0x84, auth_body(bytes(forged), gba=True)) == (b"", 0x9862)
    nid = naf_id("naf.example.org", UaId.parse("dtls-psk"))
    assert host.authenticate(0x84, b"\xde" + bytes([len(nid)]) + nid + b"\x01a") == (b"", 0x6985)


def test_gbanl_reuses_a_naf_record_and_overwrites_the_least_recently_used() -> None:
    p = profile()
    card = SoftUicc(p)
    host = Host(card)
    host.select_aid(USIM_AID)
    gba_bootstrap(host, p, join_sqn(1, 0, 5), bytes(16))

    def derive(fqdn: str) -> None:
        nid = naf_id(fqdn, UaId.parse("dtls-psk"))
        data, sw = host.authenticate(0x84, b"\xde" + bytes([len(nid)]) + nid + bytes([len(IMPI)]) + IMPI.encode())
        assert sw == 0x9000 and len(data) == 34

    for name in ("a.example", "b.example", "c.example", "d.example", "a.example", "e.example"):
        derive(name)
    host.select_fid(0x6FDA)
    names = [tlvs(host.read_record(n))[0x80][:-5].decode() for n in range(1, 5)]
    assert names == ["a.example", "e.example", "c.example", "d.example"]  # b was least recently used
    assert card.ks_int_naf(naf_id("b.example", UaId.parse("dtls-psk"))) is None


def test_gba_context_refused_without_gba_u() -> None:
    p = profile(gba_u=False, isim=False)
    host = Host(SoftUicc(p))
    fcp = host.select_aid(USIM_AID)
    assert tlvs(tlvs(fcp)[0x62])[0x84] == USIM_AID
    assert host.authenticate(0x84, auth_body(challenge(p, join_sqn(1, 0, 5)), gba=True)) == (b"", 0x9864)
    assert host.transmit("00 A4 00 04 02 6F D6") == (b"", 0x6A82)
    host.select_fid(0x6F38)
    ust = host.read_binary()
    assert not ust[8] & 0x08 and ust[3] & 0x04  # service 68 (GBA) off, service 27 (GSM access) on


def test_naf_derivation_malformed_data() -> None:
    p = profile()
    host = Host(SoftUicc(p))
    host.select_aid(USIM_AID)
    gba_bootstrap(host, p, join_sqn(1, 0, 5), bytes(16))
    for body in (h("DE"), h("DE 05 61"), h("DE 01 61 05 62"), h("DE 00 01 61"), h("DE 01 61 00"), h("DE 01 61 01 FF"),
                 h("DF 00"), h("DD 10") + bytes(16)):  # fmt: skip
        assert host.authenticate(0x84, body)[1] in (0x6A80, 0x6700), body.hex()


# --- file system and identity ---------------------------------------------------------------------


def test_discovery_and_identity_files() -> None:
    host = Host(SoftUicc(profile()))
    fcp = tlvs(tlvs(host.select_fid(0x2F00))[0x62])
    assert fcp[0x82] == h("42 21 00 20 03") and fcp[0x83] == h("2F 00") and fcp[0x88] == bytes([0x1E << 3])
    apps = [tlvs(tlvs(host.read_record(n)).get(0x61, b"")) for n in (1, 2, 3)]
    assert apps[0][0x4F] == USIM_AID and apps[0][0x50] == b"USIM"
    assert apps[1][0x4F] == ISIM_AID and apps[1][0x50] == b"ISIM"
    assert apps[2] == {}  # the spare record is all FF

    host.select_fid(0x2FE2)
    assert host.read_binary() == h("98 88 12 01 00 00 00 00 00 81")

    host.select_aid(h("A0 00 00 00 87 10 02"))  # partial AID
    host.select_fid(0x6F07)
    assert host.read_binary() == h("08 09 10 10 00 00 00 00 10")
    host.select_fid(0x6FAD)
    assert host.read_binary()[3] & 0x0F == 2

    host.select_aid(h("A0 00 00 00 87 10 04"))
    host.select_fid(0x6F02)
    assert tlvs(host.read_binary())[0x80] == IMPI.encode()
    host.select_fid(0x6F03)
    assert tlvs(host.read_binary())[0x80] == b"ims.mnc001.mcc001.3gppnetwork.org"
    fcp = tlvs(tlvs(host.select_fid(0x6F04))[0x62])
    assert fcp[0x82][0] == 0x42
    assert tlvs(host.read_record(1))[0x80] == ("sip:" + IMPI).encode()
    host.select_fid(0x6F07)
    assert host.read_binary()[0] & 0x02  # IST service 2: GBA


def test_three_digit_mnc_card_from_the_example_profile(tmp_path: Path) -> None:
    path = tmp_path / "card.toml"
    shutil.copy(ETC / "card-usim-mnc3.toml", path)
    host = Host(SoftUicc.from_file(path))
    host.select_aid(USIM_AID)
    host.select_fid(0x6F07)
    assert host.read_binary() == h("08 39 01 51 10 32 54 76 98")
    host.select_fid(0x6FAD)
    assert host.read_binary()[3] == 3
    assert host.transmit(bytes([0x00, 0xA4, 0x04, 0x04, 16]) + ISIM_AID) == (b"", 0x6A82)
    host.select_fid(0x3F00)
    host.select_fid(0x2F00)
    assert tlvs(host.read_record(2)) == {}  # only the USIM, then the spare record


def test_select_by_path_parent_and_current_adf() -> None:
    card = SoftUicc(profile())
    host = Host(card)
    assert host.transmit("00 A4 00 04 02 7F FF") == (b"", 0x6A82)  # no application selected yet
    host.select_aid(USIM_AID)
    data, sw = host.transmit("00 A4 08 04 04 7F FF 6F 07")
    assert sw == 0x9000 and tlvs(tlvs(data)[0x62])[0x83] == h("6F 07")
    assert host.read_binary()[0] == 0x08
    assert host.transmit("00 A4 08 0C 02 2F 00") == (b"", 0x9000)
    assert host.read_record(1)[0] == 0x61
    assert host.transmit("00 A4 09 0C 02 2F E2") == (b"", 0x9000)
    assert host.read_binary()[0] == 0x98
    host.select_fid(0x7FFF)
    assert host.transmit("00 A4 09 0C 02 6F AD") == (b"", 0x9000)
    assert host.transmit("00 A4 03 04 00")[1] == 0x9000  # parent of the ADF: the MF
    assert host.transmit("00 A4 03 04 00") == (b"", 0x6A82)  # the MF has no parent
    assert host.transmit("00 A4 01 0C 02 7F FF") == (b"", 0x9000)
    assert host.transmit("00 A4 08 04 04 2F 00 6F 07") == (b"", 0x6A82)  # an EF is not a directory
    # SELECT by FID reaches the parent's children: EF_DIR from inside the ADF.
    host.select_fid(0x7FFF)
    host.select_fid(0x2F00)
    assert host.read_record(1)[0] == 0x61
    # A select with P2 0C answers no data.
    assert card.process_apdu(h("00 A4 00 0C 02 3F 00")) == h("90 00")


def test_sfi_reads_and_record_navigation() -> None:
    host = Host(SoftUicc(profile()))
    host.select_aid(USIM_AID)
    data, sw = host.transmit("00 B0 87 00 00")  # SFI 07 = EF_IMSI
    assert sw == 0x9000 and data[0] == 0x08
    data, sw = host.transmit("00 B0 83 03 01")  # SFI 03 = EF_AD, offset 3
    assert (data, sw) == (b"\x02", 0x9000)
    host.select_fid(0x3F00)
    data, sw = host.transmit("00 B2 01 F4 20")  # SFI 1E record 1
    assert sw == 0x9000 and data[0] == 0x61
    assert host.transmit("00 B2 00 02 20")[0][2:4] == h("4F 10")  # next: record 2
    assert host.transmit("00 B2 00 02 20")[0][0] == 0xFF  # record 3
    assert host.transmit("00 B2 00 02 20") == (b"", 0x6A83)  # beyond the last
    assert host.transmit("00 B2 00 03 20")[0][4:20] == ISIM_AID  # previous: record 2
    assert host.transmit("00 B2 00 04 20")[0][4:20] == ISIM_AID  # current
    assert host.transmit("00 B2 04 04 20") == (b"", 0x6A83)


def test_update_binary_rules() -> None:
    host = Host(SoftUicc(profile()))
    host.select_aid(USIM_AID)
    host.select_fid(0x6F07)
    assert host.transmit("00 D6 00 00 01 00") == (b"", 0x6982)  # EF_IMSI is not writable
    host.select_fid(0x6FD6)
    assert host.transmit("00 D6 00 C7 02 00 00") == (b"", 0x6700)  # past the end of the file
    assert host.transmit("00 D6 01 00 01 00") == (b"", 0x6B00)  # offset beyond the file
    assert host.transmit("00 D6 00 10 02 AB CD") == (b"", 0x9000)
    assert host.transmit("00 B0 00 10 02") == (h("AB CD"), 0x9000)
    host.select_fid(0x6FDA)
    assert host.transmit("00 D6 00 00 01 00") == (b"", 0x6981)
    assert host.transmit("00 DC 01 04 02 80 00") == (b"", 0x6982)


# --- T=0 ------------------------------------------------------------------------------------------


def test_t0_get_response_and_wrong_le() -> None:
    card = SoftUicc(profile())
    assert card.process_apdu(h("00 A4 04 04 10") + USIM_AID) == h("61 23")
    assert card.process_apdu(h("00 C0 00 00 30")) == h("6C 23")  # too much asked: 6C with the right Le
    first = card.process_apdu(h("00 C0 00 00 10"))  # less: that much, and 61 for the rest
    assert first[:2] == h("62 21") and first[-2:] == h("61 13")
    rest = card.process_apdu(h("00 C0 00 00 13"))
    assert rest[-2:] == h("90 00") and len(first) - 2 + len(rest) - 2 == 0x23
    assert card.process_apdu(h("00 C0 00 00 13")) == h("69 85")  # nothing left
    assert card.process_apdu(h("00 C0 01 00 13")) == h("6A 86")
    # Another command discards a pending answer.
    assert card.process_apdu(h("00 A4 00 04 02 6F 07")) == h("61 14")
    assert card.process_apdu(h("00 B0 00 00 09"))[-2:] == h("90 00")
    assert card.process_apdu(h("00 C0 00 00 14")) == h("69 85")
    # Case 2 with a wrong Le: 6Cxx, then the same command with the right Le.
    assert card.process_apdu(h("00 B0 00 00 00")) == h("6C 09")
    assert card.process_apdu(h("00 B0 00 05 00")) == h("6C 04")
    assert card.process_apdu(h("00 B0 00 07 02")) == h("00 10 90 00")
    assert card.process_apdu(h("80 F2 00 00 00")) == h("6C 23")
    assert card.process_apdu(h("80 F2 00 01 00")) == h("6C 12")
    assert card.process_apdu(h("80 F2 00 01 12")) == h("84 10") + USIM_AID + h("90 00")
    assert card.process_apdu(h("80 F2 00 0C")) == h("90 00")
    card.process_apdu(h("00 A4 00 04 02 2F 00"))
    assert card.process_apdu(h("00 B2 01 04 10")) == h("6C 20")


def test_whole_gbabp_in_one_read() -> None:
    card = SoftUicc(profile())
    card.process_apdu(h("00 A4 04 0C 10") + USIM_AID)
    assert card.process_apdu(h("00 A4 00 04 02 6F D6")) == h("61 13")
    fcp = tlvs(tlvs(card.process_apdu(h("00 C0 00 00 13"))[:-2])[0x62])
    assert fcp[0x80] == h("00 C8") and fcp[0x82] == h("41 21")
    assert card.process_apdu(h("00 B0 00 00 00")) == h("6C C8")
    answer = card.process_apdu(h("00 B0 00 00 C8"))
    assert len(answer) == 202 and answer[:3] == h("00 00 00") and answer[-2:] == h("90 00")


# --- logical channels -----------------------------------------------------------------------------


def test_logical_channels_keep_their_own_state() -> None:
    card = SoftUicc(profile())
    host = Host(card)
    assert host.transmit("00 70 00 00 01") == (b"\x01", 0x9000)
    assert host.transmit("00 70 00 00 01") == (b"\x02", 0x9000)
    assert card.process_apdu(h("00 70 00 00 00")) == h("6C 01")
    host.select_aid(USIM_AID, cla=0x01)
    host.select_aid(ISIM_AID, cla=0x02)
    host.select_fid(0x6F07, cla=0x01)
    host.select_fid(0x6F07, cla=0x02)
    assert host.read_binary(cla=0x01)[0] == 0x08  # EF_IMSI on the USIM
    assert host.read_binary(cla=0x02) == b"\x02"  # EF_IST on the ISIM
    assert host.transmit("00 B0 00 00 00") == (b"", 0x6986)  # the basic channel has no EF selected

    # An answer waits on its own channel only.
    assert card.process_apdu(h("01 A4 00 04 02 6F AD")) == h("61 14")
    assert card.process_apdu(h("02 C0 00 00 14")) == h("69 85")
    assert card.process_apdu(h("01 C0 00 00 14"))[-2:] == h("90 00")

    # AUTHENTICATE on channel 1 while channel 0 has no application.
    p = card.profile
    data, sw = host.authenticate(0x81, auth_body(challenge(p, join_sqn(1, 0, 5))), cla=0x01)
    assert sw == 0x9000 and data[0] == 0xDB
    assert host.authenticate(0x81, auth_body(challenge(p, join_sqn(2, 0, 5)))) == (b"", 0x6985)

    assert host.transmit("00 70 00 03 00") == (b"", 0x9000)  # open channel 3 explicitly
    assert host.transmit("00 70 00 03 00") == (b"", 0x6985)  # already open
    assert host.transmit("00 70 00 00 01") == (b"", 0x6A81)  # none left
    assert host.transmit("00 70 00 04 00") == (b"", 0x6881)
    assert host.transmit("00 70 80 02 00") == (b"", 0x9000)
    assert host.transmit("02 B0 00 00 01") == (b"", 0x6881)  # closed
    assert host.transmit("00 70 80 02 00") == (b"", 0x6881)
    assert host.transmit("00 70 80 00 00") == (b"", 0x6A86)  # the basic channel stays
    assert host.transmit("00 70 40 00 01") == (b"", 0x6A86)
    assert host.transmit("40 B0 00 00 01") == (b"", 0x6881)  # channel 4: beyond what the card offers

    # Opened from a non-basic channel, a channel inherits its application.
    assert host.transmit("01 70 00 00 01") == (b"\x02", 0x9000)
    assert host.transmit("02 B0 00 00 01") == (b"", 0x6986)
    host.select_fid(0x7FFF, cla=0x02)
    host.select_fid(0x6F07, cla=0x02)
    assert host.read_binary(cla=0x02)[0] == 0x08

    card.reset()
    assert card.process_apdu(h("01 B0 00 00 01")) == h("68 81")
    assert card.process_apdu(h("00 70 00 00 01")) == h("01 90 00")


# --- status words ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "apdu", "sw"),
    [
        ([], "00 A4 00 04 02 6F 07", 0x6A82),
        ([], "00 A4 04 04 05 A0 00 00 00 99", 0x6A82),
        ([], "00 A4 00 05 02 3F 00", 0x6A86),
        ([], "00 A4 05 04 02 3F 00", 0x6A86),
        ([], "00 A4 00 04 03 3F 00 00", 0x6700),
        ([], "00 A4 04 04 11" + "A0" * 17, 0x6700),
        ([], "00 A4 08 04 03 7F FF 6F", 0x6700),
        ([], "00 A4 00 04 04 3F 00", 0x6700),  # data field shorter than Lc
        ([], "00 A4 00 04 02 3F 00 00 00", 0x6700),  # more than Lc + Le
        ([], "00 12 00 00 00", 0x6D00),
        ([], "00 89 00 81 00", 0x6D00),
        ([], "A0 A4 00 00 02 3F 00", 0x6E00),  # the GSM class
        ([], "80 A4 00 04 02 3F 00", 0x6E00),
        ([], "00 F2 00 00 00", 0x6E00),
        ([], "FF A4 00 04 02 3F 00", 0x6E00),
        ([], "0C A4 00 04 02 3F 00", 0x6882),
        ([], "10 A4 00 04 02 3F 00", 0x6884),
        ([], "60 A4 00 04 02 3F 00", 0x6882),
        ([], "00 B0 00 00 01", 0x6986),
        ([], "00 B2 01 04 01", 0x6986),
        ([], "00 D6 00 00 01 00", 0x6986),
        (["00 A4 00 0C 02 2F 00"], "00 B0 00 00 01", 0x6981),
        (["00 A4 00 0C 02 2F E2"], "00 B2 01 04 01", 0x6981),
        (["00 A4 00 0C 02 2F 00"], "00 B2 05 04 20", 0x6A83),
        (["00 A4 00 0C 02 2F 00"], "00 B2 00 04 20", 0x6A83),  # no current record
        (["00 A4 00 0C 02 2F 00"], "00 B2 01 05 20", 0x6A86),
        (["00 A4 00 0C 02 2F 00"], "00 B2 01 02 20", 0x6A86),
        (["00 A4 00 0C 02 2F E2"], "00 B0 00 0A 01", 0x6B00),
        (["00 A4 00 0C 02 2F E2"], "00 B0 C2 00 01", 0x6A86),
        (["00 A4 00 0C 02 2F E2"], "00 B0 99 00 01", 0x6A82),  # no EF with SFI 19
        ([], "01 A4 00 04 02 3F 00", 0x6881),
        ([], "00 B0", 0x6700),
        ([], "", 0x6700),
        ([], "00 88 00 81 22" + "10" + "00" * 16 + "10" + "00" * 16, 0x6985),  # no application
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 80 11 10" + "00" * 16, 0x9864),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 82 00", 0x9864),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 01 00", 0x6A86),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 01 81 00", 0x6A86),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 89 00", 0x6A86),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 81 21" + "10" + "00" * 16 + "10" + "00" * 15, 0x6700),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 81 22" + "11" + "00" * 16 + "10" + "00" * 16, 0x6A80),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 84 00", 0x6700),
        (["00 A4 04 0C 07 A0 00 00 00 87 10 02"], "00 88 00 84 01 DA", 0x6A80),
        ([], "80 F2 03 00 00", 0x6A86),
        ([], "80 F2 00 02 00", 0x6A86),
        ([], "80 F2 00 01 00", 0x6985),  # no application: no DF name
        ([], "80 F2 00 0C 05", 0x6700),
        ([], "00 70 00 01 01", 0x6700),
        ([], "00 70 80 01 01", 0x6700),
    ],
)
def test_status_words(setup: list[str], apdu: str, sw: int) -> None:
    card = SoftUicc(profile())
    for command in setup:
        assert card.process_apdu(h(command)) == h("90 00")
    answer = card.process_apdu(h(apdu))
    assert answer == sw.to_bytes(2, "big"), answer.hex()


# --- persistence ----------------------------------------------------------------------------------


def test_state_is_persisted_and_a_restarted_card_rejects_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "card-isim.toml"
    shutil.copy(ETC / "card-isim.toml", path)
    p = load_profile(path)
    body = auth_body(challenge(p, join_sqn(7, 5, 5)))

    host = Host(SoftUicc.from_file(path))
    host.select_aid(USIM_AID)
    data, sw = host.authenticate(0x81, body)
    assert sw == 0x9000 and data[0] == 0xDB
    assert load_profile(path).card_state.seq_ms[5] == 7
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("# LAB CARD")

    restarted = Host(SoftUicc.from_file(path))
    restarted.select_aid(USIM_AID)
    data, sw = restarted.authenticate(0x81, body)
    assert sw == 0x9000 and data[0] == 0xDC
    assert verify_auts(Milenage(p.k, p.opc), body[1:17], data[2:]) == join_sqn(7, 5, 5)


def test_gba_state_survives_a_restart_of_the_card_like_a_real_cards_memory(tmp_path: Path) -> None:
    """Ks, its RAND and EF_GBABP are in the profile: a card started again from it still answers DE
    for its last bootstrap, and shows the host the same EF_GBABP (what a resumed GBA_U session needs)."""
    path = tmp_path / "card-isim.toml"
    shutil.copy(ETC / "card-isim.toml", path)
    p = load_profile(path)
    rand = bytes.fromhex("3c" * 16)
    host = Host(SoftUicc.from_file(path))
    host.select_aid(ISIM_AID)
    gba_bootstrap(host, p, join_sqn(9, 2, 5), rand)
    host.select_fid(0x6FD5)
    btid, lifetime = b"opaque-btid@bsf.example", b"2030-01-01T00:00:00Z"
    gbabp = b"\x10" + rand + bytes([len(btid)]) + btid + bytes([len(lifetime)]) + lifetime
    assert host.transmit(h("00 D6 00 00") + bytes([len(gbabp)]) + gbabp) == (b"", 0x9000)
    assert "[gba_state.isim]" in path.read_text() and "[gba_state.usim]" not in path.read_text()

    restarted = Host(SoftUicc.from_file(path))
    restarted.select_aid(ISIM_AID)
    restarted.select_fid(0x6FD5)
    assert restarted.read_binary()[: len(gbabp)] == gbabp
    nid = naf_id("naf.example.org", UaId.parse("dtls-psk"))
    impi = p.effective_impi
    data, sw = restarted.authenticate(0x84, b"\xde" + bytes([len(nid)]) + nid + bytes([len(impi)]) + impi.encode())
    _, ck, ik, _ = Milenage(p.k, p.opc).f2345(rand)
    assert (data, sw) == (b"\xdb\x20" + ks_naf(ck + ik, rand, impi, nid), 0x9000)
    assert repr(load_profile(path)).count(ck.hex()) == 0  # Ks is in the file, never in a repr
    restarted.select_aid(USIM_AID)  # the USIM never bootstrapped: nothing was kept for it
    assert restarted.authenticate(0x84, b"\xde" + bytes([len(nid)]) + nid + b"\x01a") == (b"", 0x6985)


def test_persistence_failure_withholds_res() -> None:
    def broken(_: CardProfile) -> None:
        raise OSError("disk full")

    p = profile()
    card = SoftUicc(p, on_state_change=broken)
    host = Host(card)
    host.select_aid(USIM_AID)
    body = auth_body(challenge(p, join_sqn(1, 0, 5)))
    assert host.authenticate(0x81, body) == (b"", 0x6581)
    # The card still never accepts that SQN again.
    card._on_state_change = None
    assert host.authenticate(0x81, body)[0][0] == 0xDC


def test_repr_hides_keys() -> None:
    card = SoftUicc(profile())
    assert K1.hex() not in repr(card) and repr(K1) not in repr(card)
    assert repr(K1) not in repr(card.profile) and repr(OPC1) not in repr(card.profile)


# --- robustness -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_get_a_status_word(apdu: bytes) -> None:
    card = SoftUicc(profile())
    answer = card.process_apdu(apdu)
    assert len(answer) >= 2 and answer[-2:] != h("6F 00")


_INS = [0xA4, 0xB0, 0xB2, 0xD6, 0xDC, 0x88, 0x70, 0xC0, 0xF2, 0x12]
_CLA = [0x00, 0x01, 0x02, 0x03, 0x80, 0x81, 0x40, 0xA0]


@st.composite
def plausible_apdu(draw: st.DrawFn) -> bytes:
    header = bytes([draw(st.sampled_from(_CLA)), draw(st.sampled_from(_INS)), draw(st.integers(0, 255)),
                    draw(st.integers(0, 255))])  # fmt: skip
    body = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        body = bytes([len(body)]) + body
    return header + body


_OPEN_USIM = h("00 A4 04 0C 10") + USIM_AID


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(plausible_apdu(), st.just(_OPEN_USIM), st.just(h("00 70 00 00 01"))), max_size=25))
def test_command_sequences_never_break_the_card(apdus: list[bytes]) -> None:
    p = profile()
    card = SoftUicc(p)
    for apdu in apdus:
        answer = card.process_apdu(apdu)
        assert len(answer) >= 2 and answer[-2:] != h("6F 00")
    # Whatever happened, the card still authenticates on a fresh channel-0 USIM selection.
    card.reset()
    host = Host(card)
    host.select_aid(USIM_AID)
    data, sw = host.authenticate(0x81, auth_body(challenge(p, join_sqn(1 << 20, 0, 5))))
    assert sw == 0x9000 and data[0] == 0xDB
