"""Card profiles: strict loading with precise errors, atomic 0600 saves, IMPI derivation."""

from __future__ import annotations

import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from mn_secd.errors import ConfigError
from mn_secd.sim.profile import CardProfile, GbaCardState, derive_impi, load_profile, render_profile, save_profile
from mn_secd.sim.sqn import SqnPolicy, SqnState

ETC = Path(__file__).parent.parent.parent / "etc" / "sim"
K1 = "465b5ce8b199b49faa5f0a2ee238a6bc"
OPC1 = "cd63cb71954a9f4e48a5994e37a02baf"
OP1 = "cdc202d5123e20f62b6d676ac72cb318"

MINIMAL = f"""
iccid = "89882110000000000018"
imsi = "001010000000001"
mnc_length = 2
k = "{K1}"
opc = "{OPC1}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "card.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.file == str(path)
    return info.value


def test_derive_impi() -> None:
    assert derive_impi("001010000000001", 2) == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert derive_impi("310150123456789", 3) == "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"
    assert derive_impi("234150999999999", 2) == "234150999999999@ims.mnc015.mcc234.3gppnetwork.org"
    with pytest.raises(ValueError):
        derive_impi("31015012345678x", 3)
    with pytest.raises(ValueError):
        derive_impi("310150123456789", 4)


def test_minimal_profile_defaults(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, MINIMAL))
    assert p.k == bytes.fromhex(K1) and p.opc == bytes.fromhex(OPC1) and p.op is None
    assert p.amf == bytes.fromhex("8000") and p.sqn == bytes(6)
    assert (p.isim, p.gba_u, p.gsm_access) == (False, False, True)
    assert p.impi == "001010000000001@ims.mnc001.mcc001.3gppnetwork.org"
    assert p.impu == ("sip:001010000000001@ims.mnc001.mcc001.3gppnetwork.org",)
    assert p.domain == "ims.mnc001.mcc001.3gppnetwork.org"
    assert p.card_state == SqnState.new(5)
    assert p.sqn_policy == SqnPolicy()


def test_example_profiles_load() -> None:
    isim = load_profile(ETC / "card-isim.toml")
    assert (isim.imsi, isim.mnc_length, isim.isim, isim.gba_u) == ("001010000000001", 2, True, True)
    assert isim.opc.hex() == OPC1 and isim.amf.hex() == "8000"
    usim = load_profile(ETC / "card-usim-mnc3.toml")
    assert (usim.mnc_length, usim.isim, usim.gba_u) == (3, False, False)
    assert usim.effective_impi == "310150123456789@ims.mnc150.mcc310.3gppnetwork.org"
    assert usim.opc.hex() == "1006020f0a478bf6b699f15c062e42b3"  # 35.208 set 3 OPc from OP


def test_op_gives_opc_and_is_written_back_as_op(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(f'opc = "{OPC1}"', f'op = "{OP1}"'))
    p = load_profile(path)
    assert p.opc.hex() == OPC1 and p.op is not None and p.op.hex() == OP1
    save_profile(path, p)
    text = path.read_text()
    assert f'op = "{OP1}"' in text and "opc" not in text
    assert load_profile(path) == p


def test_round_trip_with_state_and_identities(tmp_path: Path) -> None:
    path = tmp_path / "new.toml"
    state = SqnState(3, (0, 7, 0, 0, 12, 0, 0, 1))
    p = CardProfile(
        iccid="8901150123456789012", imsi="310150123456789", mnc_length=3, k=bytes(16), opc=bytes(range(16)),
        amf=b"\x00\x01", sqn=bytes.fromhex("0000000000e0"), isim=True, gba_u=True, impi="alice@example.org",
        impu=("sip:alice@example.org", "tel:+15551234"), domain="example.org", gsm_access=False,
        card_state=state, sqn_policy=SqnPolicy(delta=1000, age_limit=50), res_length=16,
        gba_state=(("isim", GbaCardState(bytes(range(32)), bytes(16), b"\x10" + bytes(16) + b"\x01b\x00")),),
    )  # fmt: skip
    save_profile(path, p)
    assert load_profile(path) == p
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ["new.toml"]  # no temporary file left behind


def test_save_keeps_the_header_comment_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "card-isim.toml"
    shutil.copy(ETC / "card-isim.toml", path)
    path.chmod(0o644)
    p = load_profile(path)
    save_profile(path, replace(p, card_state=SqnState(5, (3,) + (0,) * 31)))
    text = path.read_text()
    assert text.startswith("# LAB CARD")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_profile(path).card_state.seq_ms[0] == 3
    assert "impi" not in text  # the derived IMPI stays implicit


def test_keys_never_in_repr(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, MINIMAL))
    text = repr(p) + str(p)
    assert K1 not in text and OPC1 not in text
    assert repr(bytes.fromhex(K1)) not in text and repr(bytes.fromhex(OPC1)) not in text


def test_render_is_valid_toml_that_loads_back(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, MINIMAL))
    again = write(tmp_path, render_profile(p))
    assert load_profile(again) == p


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (MINIMAL + "colour = 'red'\n", "colour", "unknown key"),
        (MINIMAL.replace("mnc_length = 2", "mnc_length = 4"), "mnc_length", "2 or 3"),
        (MINIMAL.replace("mnc_length = 2", 'mnc_length = "2"'), "mnc_length", "integer"),
        (MINIMAL.replace("mnc_length = 2", "mnc_length = true"), "mnc_length", "integer"),
        (MINIMAL.replace('"89882110000000000018"', '"8988211"'), "iccid", "19 or 20"),
        (MINIMAL.replace('"001010000000001"', '"00101000000000X"'), "imsi", "digits"),
        (MINIMAL.replace(K1, K1[:-2]), "k", "16 octets"),
        (MINIMAL.replace(K1, "zz" + K1[2:]), "k", "hexadecimal"),
        (MINIMAL.replace(f'k = "{K1}"', ""), "k", "missing"),
        (MINIMAL.replace(f'opc = "{OPC1}"', ""), "opc", "missing"),
        (MINIMAL + f'op = "{OP1}"\n', "op", "either"),
        (MINIMAL + 'amf = "80"\n', "amf", "2 octets"),
        (MINIMAL + "sqn = 5\n", "sqn", "string"),
        (MINIMAL + 'isim = "yes"\n', "isim", "true or false"),
        (MINIMAL + "res_length = 3\n", "res_length", "4 to 16 octets"),
        (MINIMAL + "res_length = 17\n", "res_length", "4 to 16 octets"),
        (MINIMAL + 'impu = "sip:a@b"\n', "impu", "list of strings"),
        (MINIMAL + 'impi = ""\n', "impi", "UTF-8 octets"),
        (MINIMAL + 'domain = "' + "d" * 128 + '"\n', "domain", "UTF-8 octets"),
        (MINIMAL + "card_state = 3\n", "card_state", "table"),
        (MINIMAL + "[card_state]\nind_len = 11\n", "card_state.ind_len", "between 0 and 10"),
        (MINIMAL + "[card_state]\nseq_ms = [0, 0]\n", "card_state.seq_ms", "32 entries"),
        (MINIMAL + "[card_state]\nseq_ms = ['0']\n", "card_state.seq_ms", "list of integers"),
        (MINIMAL + "[card_state]\nind_len = 1\nseq_ms = [0, -1]\n", "card_state.seq_ms", "out of range"),
        (MINIMAL + "[card_state]\ndelta = 0\n", "card_state.delta", "at least 1"),
        (MINIMAL + "[card_state]\nage_limit = 0\n", "card_state.age_limit", "at least 1"),
        (MINIMAL + "[card_state]\nseq = []\n", "card_state.seq", "unknown key"),
        (MINIMAL + "gba_state = 3\n", "gba_state", "table"),
        (MINIMAL + "[gba_state.esim]\n", "gba_state.esim", "usim"),
        (MINIMAL + f'[gba_state.usim]\nks = "{K1}"\nrand = "{K1}"\ngbabp = ""\n', "gba_state.usim.ks", "32 octets"),
        (MINIMAL + f'[gba_state.usim]\nks = "{K1 * 2}"\nrand = "{K1}"\ngbabp = "x"\n', "gba_state.usim.gbabp", "hex"),
        (MINIMAL + f'[gba_state.usim]\nks = "{K1 * 2}"\nrand = "{K1}"\n', "gba_state.usim.gbabp", "missing"),
        ("iccid = \n", "(syntax)", "not valid TOML"),
    ],
)
def test_precise_errors(tmp_path: Path, text: str, key: str, problem: str) -> None:
    err = load_error(tmp_path, text)
    assert err.key == key
    assert problem in err.problem
    assert K1 not in str(err) and OPC1 not in str(err)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(tmp_path / "absent.toml")
    assert info.value.key == "(file)"


def test_save_into_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError) as info:
        save_profile(tmp_path / "nope" / "card.toml", p)
    assert info.value.key == "(file)"


def test_constructor_validates_op_against_opc() -> None:
    with pytest.raises(ValueError):
        CardProfile(iccid="89882110000000000018", imsi="001010000000001", mnc_length=2, k=bytes.fromhex(K1),
                    opc=bytes(16), op=bytes.fromhex(OP1))  # fmt: skip
