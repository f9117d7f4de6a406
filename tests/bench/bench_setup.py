"""Benchmark the fast set-up: `./dev setup` in a fresh copy of this checkout, with an empty pip cache.

What a new user waits for before `./dev demo` prints its first line. The copy holds the tracked
and new files of this tree (not .venv/ or build/), so nothing built earlier is reused; pip runs
with no cache (PIP_NO_CACHE_DIR), so every package is downloaded and DTLSSocket is built from its
sdist. Prints the wall time split as `./dev` measures it: apt (excluded from the target: the
Debian packages are usually there already, and their time is the mirror's), pip (every other
package, downloaded as wheels, plus systemd-python, which is published as source only), and the
DTLSSocket build (download, hash check, patch, wheel). Target: pip + DTLSSocket within 180 s on
2 cores.

    .venv/bin/python tests/bench/bench_setup.py [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import Targets

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = 180.0


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the copy (its .venv/pip.log) for inspection")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mn-secd-bench-setup-"))
    try:
        copy_checkout(work)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["PIP_NO_CACHE_DIR"] = "1"
        start = time.monotonic()
        result = subprocess.run(["./dev", "setup"], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            print(f"./dev setup failed after {wall:.1f} s", file=sys.stderr)
            return 1
        parts = dict(
            line.split("=", 1) for line in (work / ".venv" / "setup-times").read_text().splitlines() if "=" in line
        )
        apt, pip, dtls = (float(parts[k]) for k in ("apt", "pip", "dtlssocket"))
        print(f"./dev setup in a fresh copy, empty pip cache, {os.cpu_count()} cores:")
        print(f"  apt              {apt:6.1f} s   (excluded from the target)")
        print(f"  pip              {pip:6.1f} s")
        print(f"  DTLSSocket build {dtls:6.1f} s   (sdist, hash check, patch, wheel)")
        targets = Targets()
        verdict = targets.check("set-up, apt excluded", round(pip + dtls, 1), TARGET_S, "s")
        print(f"  set-up, apt excluded: {pip + dtls:6.1f} s {verdict}; whole command {wall:.1f} s")
        if args.keep:
            print(f"  the copy: {work}")
        print(targets.summary())
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
