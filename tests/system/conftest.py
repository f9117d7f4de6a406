"""The system test runs only when asked for: `./dev system-test` (pytest tests/system -m system).

It boots a container and takes minutes, so a plain `pytest` / `./dev test` deselects it (it is
reported as deselected, never as passed or skipped).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: the Debian package under a real systemd (./dev system-test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "system" in (config.option.markexpr or ""):
        return
    chosen = [item for item in items if item.get_closest_marker("system") is None]
    dropped = [item for item in items if item.get_closest_marker("system") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen
