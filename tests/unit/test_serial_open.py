"""Opening the AT port: a device-policy refusal under systemd names DeviceAllow=.

The refusal itself (EPERM from the cgroup device filter) exists only under a real systemd, where
tests/system/ provokes it; here pyserial's open is made to fail the way it does there.
"""

from __future__ import annotations

import errno

import pytest
import serial

from mn_secd.errors import PortGoneError
from mn_secd.uicc.serial import AtPort


def refuse(code: int):  # type: ignore[no-untyped-def]
    def open_(*args: object, **kwargs: object) -> None:
        # what pyserial raises when open(2) fails
        raise serial.SerialException(code, f"could not open port /dev/mn-secd-modem: [Errno {code}]")

    return open_


async def test_eperm_under_systemd_names_deviceallow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial, "Serial", refuse(errno.EPERM))
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(PortGoneError, match=r"DeviceAllow=/dev/mn-secd-modem rw") as info:
        await AtPort("/dev/mn-secd-modem").open()
    assert "cannot open" in str(info.value)


async def test_eperm_outside_systemd_has_no_unit_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial, "Serial", refuse(errno.EPERM))
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    with pytest.raises(PortGoneError) as info:
        await AtPort("/dev/mn-secd-modem").open()
    assert "DeviceAllow" not in str(info.value)


async def test_eacces_is_file_permissions_not_device_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial, "Serial", refuse(errno.EACCES))
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(PortGoneError) as info:
        await AtPort("/dev/mn-secd-modem").open()
    assert "DeviceAllow" not in str(info.value)
