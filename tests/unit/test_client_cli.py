"""``mn-secd key`` / ``mn-secd status`` as subprocesses against a key service on loopback DTLS."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_control_server import NAF, PSK_A, PSK_B, FakeKeys, registry

from mn_secd.control.server import ControlServer, start_control_server


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    srv = await start_control_server(FakeKeys(), registry(), ["127.0.0.1"], 0)
    yield srv
    await srv.close()


@pytest.fixture
def psk_files(tmp_path: Path) -> Path:
    for name, psk in (("a.psk", PSK_A), ("b.psk", PSK_B), ("wrong.psk", b"wrong-psk")):
        (tmp_path / name).write_bytes(psk)
        (tmp_path / name).chmod(0o600)
    return tmp_path


async def mn_secd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mn_secd", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def where(server: ControlServer) -> str:
    host, port = server.addresses[0]
    return f"{host}:{port}"


async def test_key_hides_the_key_unless_asked(server: ControlServer, psk_files: Path) -> None:
    who = ["--identity", "ae-a", "--psk-file", str(psk_files / "a.psk"), "--server", where(server)]
    code, out, err = await mn_secd("key", "--naf", NAF, *who)
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["btid"] == "btid-1@bsf.example" and lines["gba_mode"] == "gba-me"
    assert lines["key"].startswith("(not shown")
    code, out, err = await mn_secd("key", "--naf", NAF, "--json", "--reveal-key", *who)
    assert code == 0, err
    answer = json.loads(out)
    assert len(bytes.fromhex(answer["key"])) == 32 and answer["naf_fqdn"] == NAF


async def test_key_refused_for_another_naf(server: ControlServer, psk_files: Path) -> None:
    code, out, err = await mn_secd(
        "key", "--naf", "other-naf.example.net", "--identity", "ae-a", "--psk-file", str(psk_files / "a.psk"),
        "--server", where(server),
    )  # fmt: skip
    assert code == 1 and out == ""
    assert "not-authorised: 4.03 Forbidden: AE 'ae-a' is not authorised for NAF other-naf.example.net" in err


async def test_status_with_a_credentials_file(server: ControlServer, psk_files: Path) -> None:
    (psk_files / "client.toml").write_text(f'identity = "ae-b"\npsk_file = "b.psk"\nserver = "{where(server)}"\n')
    code, out, err = await mn_secd("status", "--credentials", str(psk_files / "client.toml"), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["card_present"] is True and status["impi"].startswith("001010*")


async def test_wrong_psk_gives_up_within_5_s_naming_the_cause(server: ControlServer, psk_files: Path) -> None:
    started = time.monotonic()
    code, _, err = await mn_secd(
        "key", "--naf", NAF, "--identity", "ae-a", "--psk-file", str(psk_files / "wrong.psk"), "--server", where(server)
    )
    elapsed = time.monotonic() - started
    assert code == 1
    assert "key-service-timeout" in err and "most likely a wrong PSK for identity 'ae-a'" in err
    assert elapsed < 7.0  # 5 s of handshake budget plus interpreter start-up


async def test_missing_credentials(psk_files: Path) -> None:
    code, _, err = await mn_secd("status")
    assert code == 2 and "--identity ID --psk-file FILE" in err
    (psk_files / "loose.psk").write_bytes(PSK_A)
    (psk_files / "loose.psk").chmod(0o644)
    code, _, err = await mn_secd("status", "--identity", "ae-a", "--psk-file", str(psk_files / "loose.psk"))
    assert code == 1 and "loose.psk" in err and "accessible by group or others" in err
