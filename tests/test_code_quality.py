"""The project's own checks, part of the test command so that no change lands without them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMPORTS_SIM = re.compile(r"^\s*(from|import)\s+(mn_secd\.sim|aiohttp)\b", re.MULTILINE)


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format() -> None:
    lint = run(str(BIN / "ruff"), "check", "mn_secd", "tests")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(str(BIN / "ruff"), "format", "--check", "mn_secd", "tests")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_on_the_package() -> None:
    result = run(str(BIN / "mypy"))  # files and strictness come from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_daemon_side_never_imports_the_simulated_world() -> None:
    """Only mn_secd.sim, the demo and the sim commands may import mn_secd.sim or aiohttp."""
    allowed = {ROOT / "mn_secd" / "commands" / "demo.py", ROOT / "mn_secd" / "commands" / "sim.py"}
    offenders = []
    for path in (ROOT / "mn_secd").rglob("*.py"):
        if path.is_relative_to(ROOT / "mn_secd" / "sim") or path in allowed:
            continue
        if IMPORTS_SIM.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
