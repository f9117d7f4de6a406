"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def milenage_vectors() -> list[dict[str, Any]]:
    """TS 35.208 test sets 1-20 (conformance data of the Milenage specification, clause 4.3)."""
    return list(json.loads((DATA / "milenage.json").read_text())["test_sets"])


@pytest.fixture(scope="session")
def gba_vectors() -> dict[str, dict[str, Any]]:
    """GBA KDF and Ub digest vectors by name."""
    return {v["name"]: v for v in json.loads((DATA / "gba_kdf.json").read_text())["vectors"]}
