"""A debootstrapped bookworm tree booted with systemd as PID 1 under ``systemd-nspawn``.

This machine's init is not systemd, so two host-side workarounds are needed, both undone on
exit: ``--register=no --keep-unit`` (no systemd-machined to register with, no scope to move
into), and a tmpfs on ``/run/systemd/nspawn`` (nspawn keeps its propagation directories there and
needs a tmpfs; the host's /run is not one). ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` gives the
container cgroup v2, which systemd 252 wants for the unit's device policy (BPF). The container has
its own network namespace (``--private-network``): its loopback is its own, so its ports never
clash with other work on the host.

Commands run inside with ``nsenter`` into the container's namespaces (there is no machined for
``machinectl shell``), with a clean environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

NSPAWN_RUN = Path("/run/systemd/nspawn")
LOCK = Path("/run/mn-secd-system-test.lock")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


class Machine:
    """A booted container: ``run`` a command inside, read and write files of its tree."""

    def __init__(self, tree: Path, nspawn: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.tree = tree
        self.nspawn = nspawn
        self.leader = leader
        self.console = console

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (as root, clean environment)."""
        cmd = ["nsenter", "--target", str(self.leader), "--all", "--", "/usr/bin/env", "-i"]
        cmd += [f"{k}={v}" for k, v in ENV.items()] + list(argv)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """A file of the tree as the host sees it (not /run, /tmp or /dev: those are the container's tmpfs)."""
        return self.tree / inside.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _mounted_tmpfs(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) and line.split()[2] == "tmpfs" for line in mounts)


def _leader(nspawn_pid: int) -> int | None:
    """The container's PID 1 as the host sees it: the systemd child of systemd-nspawn."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{nspawn_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
    return None


@contextlib.contextmanager
def booted(base: Path, *, name: str, boot_timeout: float = 90) -> Iterator[Machine]:
    """Copy ``base``, boot it, yield the machine; always powers it off and removes every trace."""
    LOCK.touch(exist_ok=True)
    with open(LOCK) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one system test on this host at a time (shared mount)
        mounted_here = False
        work = Path(tempfile.mkdtemp(prefix="mn-secd-system-test-", dir="/var/tmp"))
        nspawn: subprocess.Popen[bytes] | None = None
        try:
            if not _mounted_tmpfs(NSPAWN_RUN):
                NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
                subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUN)], check=True)
                mounted_here = True
            tree = work / "tree"
            subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], check=True, timeout=300)
            console = work / "console.log"
            env = {**ENV, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
            with open(console, "wb") as out:
                nspawn = subprocess.Popen(
                    [
                        "systemd-nspawn",
                        "--quiet",
                        "--register=no",
                        "--keep-unit",
                        "--private-network",
                        "--console=passive",
                        f"--machine={name}",
                        f"--directory={tree}",
                        "--boot",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            deadline = time.monotonic() + boot_timeout
            leader = None
            while leader is None:
                if nspawn.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the container did not start:\n{console.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
                leader = _leader(nspawn.pid)
            machine = Machine(tree, nspawn, leader, console)
            state = ""
            # Until systemd has set up its private socket, systemctl answers nothing at all.
            while state not in ("running", "degraded") and time.monotonic() < deadline:
                left = max(1, int(deadline - time.monotonic()))
                state = machine.run(
                    "timeout", str(left), "systemctl", "is-system-running", "--wait", check=False
                ).stdout.strip()
                if state not in ("running", "degraded"):
                    time.sleep(0.5)
            if state not in ("running", "degraded"):
                failed = machine.run("systemctl", "--failed", "--no-pager", check=False).stdout
                raise RuntimeError(f"the container's boot ended {state!r}:\n{failed}")
            yield machine
        finally:
            if nspawn is not None and nspawn.poll() is None:
                nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
                try:
                    nspawn.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(nspawn.pid, signal.SIGKILL)
                    nspawn.wait(timeout=30)
            if mounted_here:
                subprocess.run(["umount", "--lazy", str(NSPAWN_RUN)], check=False)
            shutil.rmtree(work, ignore_errors=True)
