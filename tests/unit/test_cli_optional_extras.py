"""A command whose optional extra is missing says which package it needs (the Debian package has no [sim])."""

from __future__ import annotations

import sys

import pytest

from mn_secd import cli


def test_a_missing_extra_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "mn_secd.sim.bsf" or m.startswith("aiohttp")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # what an absent package looks like to import
    assert cli.main(["sim", "bsf", "--subscribers", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "mn-secd sim: needs the Python package 'aiohttp', which is not installed here\n"


def test_a_missing_module_of_our_own_is_a_bug_not_an_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mn_secd.commands.check_config", raising=False)
    monkeypatch.setitem(sys.modules, "mn_secd.commands.check_config", None)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["check-config", "--config", "x"])
