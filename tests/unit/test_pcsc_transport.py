"""The PC/SC transport's pure parts, and pyscard as an optional dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mn_secd.errors import Culprit, PcscUnavailable, ReaderError, ReaderGone, ReaderNotFound, UiccAbsent
from mn_secd.uicc import pcsc
from mn_secd.uicc.apdu import Apdu

ROOT = Path(__file__).resolve().parents[2]
READERS = [
    "Identiv uTrust 3700 F CL Reader [uTrust 3700 F CL Reader] (55041937601111) 00 00",
    "OMNIKEY AG CardMan 3121 01 00",
    "mn-secd vicc 02 00",
    "mn-secd vicc 02 01",
]


def test_a_reader_is_chosen_by_any_part_of_its_name_ignoring_case() -> None:
    assert pcsc.choose_reader(READERS, "utrust") == READERS[0]
    assert pcsc.choose_reader(READERS, "CardMan 3121") == READERS[1]
    assert pcsc.choose_reader(READERS, "vicc 02 01") == READERS[3]


def test_several_matches_take_the_only_one_holding_a_card_or_fail_naming_them() -> None:
    assert pcsc.choose_reader(READERS, "vicc", with_card=[READERS[2]]) == READERS[2]
    with pytest.raises(ReaderNotFound, match="2 readers match 'vicc' and none hold a card"):
        pcsc.choose_reader(READERS, "vicc")
    with pytest.raises(ReaderNotFound, match="and 2 hold a card"):
        pcsc.choose_reader(READERS, "vicc", with_card=READERS[2:])


def test_no_match_names_the_readers_there_are() -> None:
    with pytest.raises(ReaderNotFound, match=r"'gemalto' \(readers: 'Identiv"):
        pcsc.choose_reader(READERS, "gemalto")
    with pytest.raises(ReaderNotFound, match=r"readers: none"):
        pcsc.choose_reader([], "gemalto")


def test_t0_sends_case_4_without_le_and_leaves_other_cases_alone() -> None:
    select = Apdu(0x00, 0xA4, 0x04, 0x04, bytes.fromhex("A0000000871002"), le=256)
    assert pcsc.wire_command(select, t0=True) == bytes.fromhex("00A4040407A0000000871002")
    assert pcsc.wire_command(select, t0=False) == bytes.fromhex("00A4040407A000000087100200")
    read = Apdu(0x00, 0xB0, 0, 0, le=10)
    assert pcsc.wire_command(read, t0=True) == bytes.fromhex("00B000000A")
    status = Apdu(0x80, 0xF2, 0x00, 0x0C)
    assert pcsc.wire_command(status, t0=True) == bytes.fromhex("80F2000C")


@pytest.mark.parametrize(
    ("code", "kind", "text"),
    [
        (pcsc.SCARD_W_REMOVED_CARD, UiccAbsent, "no card"),
        (pcsc.SCARD_E_NO_SMARTCARD, UiccAbsent, "no card"),
        (pcsc.SCARD_E_READER_UNAVAILABLE, ReaderGone, "reader went away"),
        (pcsc.SCARD_E_NO_SERVICE, ReaderGone, "pcscd went away"),
        (pcsc.SCARD_E_SHARING_VIOLATION, ReaderGone, "another program"),
        (0x80100001, ReaderError, "80100001"),
    ],
)
def test_pcsc_codes_become_typed_errors(code: int, kind: type[Exception], text: str) -> None:
    error = pcsc.error_for(code - (1 << 32), "SCardTransmit")  # pyscard may hand back a signed value
    assert type(error) is kind and text in str(error)


def test_reader_errors_blame_the_reader_and_a_missing_pyscard_blames_the_installation() -> None:
    assert ReaderGone("x").culprit is Culprit.READER
    assert PcscUnavailable("x").culprit is Culprit.LOCAL


async def test_without_pyscard_asking_for_pcsc_is_a_clear_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "smartcard", None)
    monkeypatch.setitem(sys.modules, "smartcard.scard", None)
    with pytest.raises(PcscUnavailable, match=r"pip install 'mn-secd\[pcsc\]'"):
        await pcsc.PcscTransport.open("any reader")
    with pytest.raises(PcscUnavailable):
        await pcsc.list_readers()
    with pytest.raises(PcscUnavailable):
        await pcsc.ReaderWatcher("any", lambda event: None).start()


def test_the_daemon_imports_and_starts_its_cli_without_pyscard() -> None:
    """Every daemon-side module imports with pyscard made unimportable, and none pulls it in by itself."""
    script = """
import importlib, pkgutil, sys
sys.modules["smartcard"] = None
import mn_secd
for info in pkgutil.walk_packages(mn_secd.__path__, "mn_secd."):
    if not info.name.startswith(("mn_secd.sim", "mn_secd.commands.demo", "mn_secd.__main__")):
        importlib.import_module(info.name)
from mn_secd.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
