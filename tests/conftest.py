"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def host_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host credential secret of this test's own for ``systemd-creds --with-key=host``.

    systemd-creds reads the host key from ``$SYSTEMD_CREDENTIAL_SECRET`` when it is set (systemd's
    ENVIRONMENT.md), so ``mn-secd setup-sealing`` runs the real tool in tests without creating the
    machine's ``/var/lib/systemd/credential.secret``.
    """
    path = tmp_path / "credential.secret"
    path.write_bytes(os.urandom(4096))
    path.chmod(0o400)
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(path))
    return path
