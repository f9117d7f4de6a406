"""The project's own checks, part of the test command so that no change lands without them."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


# --- one-way layers ---------------------------------------------------------------------------------

#: mn_secd's layers, bottom to top (a name is a module or a package with everything in it). A module
#: may import anything in a lower layer and, within its own layer, its own package; the leaf
#: vocabulary of layer 0 and the composition root may also import each other freely. Anything else
#: (an import that goes up, or sideways into another package of the same layer) fails the suite.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0: leaf vocabulary shared by several layers; none of it does I/O
    (
        "mn_secd",
        "mn_secd.errors",
        "mn_secd.aka",
        "mn_secd.card_identity",
        "mn_secd.nai",
        "mn_secd.ua",
        "mn_secd.psk_identity",
        "mn_secd.naf_keys",
        "mn_secd.clock",
        "mn_secd.secret",
        "mn_secd.interfaces",
        "mn_secd.observers",
        "mn_secd.logs",
    ),
    ("mn_secd.uicc",),  # 1: the card
    ("mn_secd.gba",),  # 2: bootstrapping and keys
    ("mn_secd.dtls",),  # 3: aiocoap's DTLS with mn_secd's fixes
    ("mn_secd.control", "mn_secd.naf", "mn_secd.client"),  # 4: the key service, the NAF side, the AE side
    # 5: the composition root
    (
        "mn_secd.config",
        "mn_secd.daemon",
        "mn_secd.notify",
        "mn_secd.cli",
        "mn_secd.commands",
        "mn_secd.__main__",
        "mn_secd.systemd_generator",  # run by systemd, beside the daemon; standard library only
    ),
)
LEAF, ROOT_LAYER = 0, len(LAYERS) - 1
#: Sideways imports within layer 4 that are deliberate: the AE-side client speaks the key service's
#: wire format and reads PSK files exactly as the daemon does.
SIDEWAYS = {
    ("mn_secd.client", "mn_secd.control.payloads"),
    ("mn_secd.client", "mn_secd.control.registry"),
}
#: The simulated world sits beside the daemon: it may use any layer but the composition root, and
#: only these commands may load it (lazily: the CLI imports a command's module only when it runs).
SIM = "mn_secd.sim"
SIM_LOADERS = frozenset({"mn_secd.commands.sim", "mn_secd.commands.demo"})
#: Third-party packages only the simulated world may import (the daemon process stays small).
SIM_ONLY_PACKAGES = frozenset({"aiohttp", "matplotlib"})
#: A string naming a module, as ``importlib.import_module`` gets it ("pkg.mod" or "pkg.mod:function").
_MODULE_STRING = re.compile(r"^(mn_secd(?:\.\w+)+)(?::\w+)?$")


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package_root: Path, modules: set[str]) -> Iterator[tuple[int, str]]:
    """Every (line, module) the file imports: at top level, in functions, under TYPE_CHECKING, or by
    a module-name string (what ``importlib.import_module`` is given)."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports the module itself
                full = f"{target}.{alias.name}"
                yield node.lineno, full if full in modules else target
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match and match.group(1) in modules:
                yield node.lineno, match.group(1)


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer, unit) of an mn_secd module: the longest layer entry it is or sits in."""
    best: tuple[int, str] | None = None
    for layer, units in enumerate(LAYERS):
        for unit in units:
            inside = module == unit or (unit != "mn_secd" and module.startswith(unit + "."))
            if inside and (best is None or len(unit) > len(best[1])):
                best = (layer, unit)
    return best


def layer_violations(package_root: Path) -> list[str]:
    """Each import that breaks the layer order, as ``file:line: what``; [] when the order holds."""
    files = sorted(package_root.rglob("*.py"))
    modules = {module_name(path, package_root) for path in files}
    problems: list[str] = []
    for path in files:
        importer = module_name(path, package_root)
        where = f"{path.relative_to(package_root.parent)}"
        in_sim = importer == SIM or importer.startswith(SIM + ".")
        placed = unit_of(importer)
        if placed is None and not in_sim:
            problems.append(f"{where}: {importer} is in no layer (add it to LAYERS)")
            continue
        for line, target in imports_of(path, package_root, modules):
            top = target.split(".")[0]
            if top in SIM_ONLY_PACKAGES and not in_sim:
                problems.append(f"{where}:{line}: {importer} imports {target}, which only {SIM} may use")
            if top != "mn_secd":
                continue
            if target == SIM or target.startswith(SIM + "."):
                if not in_sim and importer not in SIM_LOADERS:
                    problems.append(f"{where}:{line}: {importer} imports the simulated world ({target})")
                continue
            goal = unit_of(target)
            if goal is None:
                continue  # reported for its own file
            if in_sim:
                if goal[0] == ROOT_LAYER:
                    problems.append(f"{where}:{line}: {importer} (simulated world) imports {target} (composition root)")
                continue
            assert placed is not None
            (layer, unit), (target_layer, target_unit) = placed, goal
            if target_layer > layer:
                problems.append(
                    f"{where}:{line}: {importer} (layer {layer}) imports {target} (layer {target_layer}): upwards"
                )
            elif (
                target_layer == layer
                and layer not in (LEAF, ROOT_LAYER)
                and target_unit != unit
                and (unit, target) not in SIDEWAYS
            ):
                problems.append(f"{where}:{line}: {importer} imports {target}: sideways within layer {layer}")
    return problems


def test_layer_order_holds_imports_run_one_way_only() -> None:
    """``python -m pytest tests/test_code_quality.py -k layer`` names each import that breaks the order."""
    problems = layer_violations(ROOT / "mn_secd")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"uicc/card.py": "from mn_secd.gba.kdf import ks_naf\n"}, "uicc/card.py:1: mn_secd.uicc.card (layer 1)"),
        ({"uicc/card.py": "def f():\n    import mn_secd.daemon\n"}, "uicc/card.py:2: mn_secd.uicc.card (layer 1)"),
        (
            {"gba/ub.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mn_secd.control import x\n"},
            "gba/ub.py:3: mn_secd.gba.ub (layer 2) imports mn_secd.control",
        ),
        (
            {"gba/ub.py": "from ..control import payloads\n"},
            "mn_secd.gba.ub (layer 2) imports mn_secd.control.payloads",
        ),
        ({"naf/zn.py": "from mn_secd.client import keys\n"}, "imports mn_secd.client.keys: sideways within layer 4"),
        ({"client/keys.py": "from mn_secd.control import server\n"}, "sideways within layer 4"),
        ({"daemon.py": "import mn_secd.sim.world\n"}, "mn_secd.daemon imports the simulated world"),
        ({"control/server.py": "import aiohttp\n"}, "mn_secd.control.server imports aiohttp"),
        ({"sim/world.py": "from mn_secd.commands import demo\n"}, "(simulated world) imports mn_secd.commands.demo"),
        ({"cli.py": "X = 'mn_secd.sim.world:run'\n"}, "mn_secd.cli imports the simulated world"),
        ({"newthing.py": ""}, "mn_secd.newthing is in no layer"),
    ],
)
def test_the_layer_check_catches(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    """The checker itself: a planted import of each kind is named; the same tree without it passes."""
    package = tmp_path / "mn_secd"
    for name in ("", "uicc", "gba", "control", "naf", "client", "sim", "commands"):
        (package / name).mkdir(parents=True, exist_ok=True)
        (package / name / "__init__.py").write_text("")
    for name in ("uicc/card", "gba/kdf", "gba/ub", "control/payloads", "control/server", "naf/zn", "client/keys"):
        (package / f"{name}.py").write_text("")
    for name in ("daemon", "cli", "sim/world", "commands/demo"):
        (package / f"{name}.py").write_text("")
    assert layer_violations(package) == []
    for name, text in files.items():
        (package / name).write_text(text)
    problems = layer_violations(package)
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_layer_check_allows_every_permitted_direction(tmp_path: Path) -> None:
    package = tmp_path / "mn_secd"
    for name in ("", "uicc", "gba", "control", "client", "sim", "commands"):
        (package / name).mkdir(parents=True, exist_ok=True)
        (package / name / "__init__.py").write_text("")
    files = {
        "errors.py": "",
        "card_identity.py": "from mn_secd.errors import X\n",  # leaf to leaf
        "uicc/card.py": "from mn_secd.card_identity import Y\nfrom . import files\n",  # down, own package
        "uicc/files.py": "",
        "gba/ub.py": "from mn_secd.uicc import card\n",  # down
        "control/payloads.py": "from mn_secd.gba import ub\n",
        "client/keys.py": "from mn_secd.control.payloads import CBOR\n",  # the listed sideways import
        "daemon.py": "from mn_secd.config import load\nfrom mn_secd.client import keys\n",  # root
        "config.py": "",
        "sim/world.py": "from mn_secd.gba import ub\nimport aiohttp\n",  # the simulated world
        "commands/demo.py": "from mn_secd.sim import world\n",  # a listed loader
    }
    for name, text in files.items():
        (package / name).write_text(text)
    assert layer_violations(package) == []


def test_each_sim_part_loads_only_itself() -> None:
    """``mn-secd sim bsf`` does not load the modem emulator, and ``sim modem`` not the HTTP or DTLS stacks."""
    probe = (
        "import json, sys\n"
        "from mn_secd.cli import build_parser\n"
        "parser = build_parser('sim')\n"
        "try:\n"
        "    parser.parse_args(['sim', sys.argv[1], '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = {}
    for part in ("modem", "bsf", "naf"):
        result = run(sys.executable, "-c", probe, part)
        assert result.returncode == 0, result.stderr
        loaded[part] = set(json.loads(result.stdout.splitlines()[-1]))
    assert "mn_secd.sim.modem" in loaded["modem"] and "aiohttp" not in loaded["modem"]
    assert "aiocoap" not in loaded["modem"]
    assert "mn_secd.sim.bsf" in loaded["bsf"] and "mn_secd.sim.modem" not in loaded["bsf"]
    assert "mn_secd.sim.in_cse" in loaded["naf"] and "mn_secd.sim.modem" not in loaded["naf"]
