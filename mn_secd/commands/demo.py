"""``mn-secd demo``: the whole chain on the embedded simulated world, told as a short story.

The world (software UICC behind the AT modem emulator on a pty, reference BSF on loopback HTTP,
reference IN-CSE on loopback DTLS) runs in this process; the daemon runs as a real subprocess from
a generated configuration, with a notify socket, exactly as systemd would run it. The demo then
plays an AE. Each step is named, so a failure says where the chain broke (exit 1).
Key material is shown only with ``--reveal-keys``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from mn_secd.client.association import NafAssociation, latest_data, post_data, register_ae
from mn_secd.client.keys import KeyAnswer, KeyServiceClient
from mn_secd.errors import KeyServiceRejected, MnSecdError
from mn_secd.naf_keys import KeyServiceStatus
from mn_secd.sim.in_cse import ReferenceInCse
from mn_secd.sim.launcher import DaemonProcess
from mn_secd.sim.world import DEFAULT_NAF_FQDN, AeCredential, SimulatedWorld, free_udp_port

T = TypeVar("T")

AE_IDENTITY = "ae-demo"
INS_AUTHENTICATE = 0x88


class StepFailed(Exception):
    def __init__(self, number: int, name: str, cause: BaseException) -> None:
        self.number = number
        self.name = name
        self.cause = cause
        kind = cause.kind if isinstance(cause, MnSecdError) else type(cause).__name__
        super().__init__(f"step {number} ({name}) failed: {kind}: {cause}")


class Story:
    """Prints numbered steps with their duration; turns any failure into :class:`StepFailed`."""

    def __init__(self, reveal_keys: bool) -> None:
        self.reveal_keys = reveal_keys
        self.number = 0
        self.started = time.monotonic()

    async def step(self, name: str, action: Callable[[], Awaitable[T]]) -> T:
        self.number += 1
        print(f"\n[{self.number}] {name}", flush=True)
        t0 = time.monotonic()
        try:
            result = await action()
        except Exception as exc:
            raise StepFailed(self.number, name, exc) from exc
        print(f"    ({(time.monotonic() - t0) * 1000:.0f} ms)", flush=True)
        return result

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def show_key(self, answer: KeyAnswer) -> None:
        self.say(f"B-TID     {answer.btid}")
        self.say(f"NAF_Id    {answer.naf_fqdn} + {answer.ua_id.hex}  ({answer.gba_mode.value})")
        self.say(f"expires   {answer.expires.isoformat()}")
        if self.reveal_keys:
            self.say(f"key       {answer.key.hex()}  (--reveal-keys)")
        else:
            self.say(f"key       {len(answer.key)} octets (hidden; --reveal-keys shows it)")


def _show_status(story: Story, status: KeyServiceStatus) -> None:
    story.say(f"card      {'present' if status.card_present else 'ABSENT'}, IMPI {status.impi}")
    state = "bootstrapped" if status.bootstrapped else "not bootstrapped"
    mode = status.gba_mode.value if status.gba_mode else "-"
    story.say(f"state     {state} ({mode}), B-TID {status.btid}, until {status.expires}")
    if status.last_error:
        story.say(f"last error {status.last_error}")


async def _wait_for_status(
    keys: KeyServiceClient, accept: Callable[[KeyServiceStatus], bool], timeout: float
) -> KeyServiceStatus:
    async with asyncio.timeout(timeout):
        while True:
            status = await keys.status()
            if accept(status):
                return status
            await asyncio.sleep(0.1)


class Demo:
    """One run of the story; after :meth:`run`, :meth:`secrets` lists every secret that was in play.

    The list lets a test prove that none of them leaked into the demo's output or the daemon's log.
    """

    def __init__(self, workdir: Path, *, reveal_keys: bool = False) -> None:
        self.workdir = workdir
        self.story = Story(reveal_keys)
        self.world = SimulatedWorld(workdir)
        self.ae = AeCredential(AE_IDENTITY, secrets.token_bytes(16))
        self.control_port = free_udp_port()
        self.cse: ReferenceInCse | None = None
        self.daemon: DaemonProcess | None = None
        self.answers: list[KeyAnswer] = []
        self._bsf_secrets: list[bytes] = []

    def secrets(self) -> list[bytes]:
        """The AE's PSK, every NAF key handed out, and every Ks the BSF made (what must never leak)."""
        return [self.ae.psk, *(a.key for a in self.answers), *self._bsf_secrets]

    async def run(self) -> int:
        story = self.story
        print("mn-secd demo: a oneM2M Middle Node gets GBA keys from its SIM, and uses them at the IN-CSE.")
        print(f"working directory: {self.workdir} (daemon log: {self.workdir / 'mn-secd.log'})")
        try:
            await story.step("start the simulated world (SIM + modem, BSF, IN-CSE)", self._start_world)
            await story.step("start the daemon as systemd would (Type=notify)", self._start_daemon)
            async with KeyServiceClient(AE_IDENTITY, self.ae.psk, "127.0.0.1", self.control_port) as keys:
                first = await story.step(
                    f"AE '{AE_IDENTITY}' asks for a key for {DEFAULT_NAF_FQDN} over DTLS-PSK", lambda: self._key(keys)
                )
                await story.step("AE reads the daemon's status", lambda: self._status(keys))
                await story.step(
                    "AE registers at the IN-CSE over DTLS keyed by GBA (psk_identity from the B-TID)",
                    lambda: self._register(keys, "demo-ae"),
                )
                await story.step(
                    "AE forces a re-bootstrap (as after a NAF rejected the B-TID)",
                    lambda: self._rebootstrap(keys, first),
                )
                await story.step("swap the SIM: keys are wiped, the new card bootstraps", lambda: self._swap(keys))
            await story.step("stop the daemon (SIGTERM)", self._stop_daemon)
            self._summary()
            return 0
        except StepFailed as exc:
            print(f"\nmn-secd demo: {exc}", file=sys.stderr)
            if self.daemon is not None and self.daemon.stderr:
                print("last daemon log lines:\n  " + "\n  ".join(self.daemon.stderr[-8:]), file=sys.stderr)
            return 1
        finally:
            await self._teardown()

    async def _start_world(self) -> None:
        await self.world.start()
        self.cse = ReferenceInCse(DEFAULT_NAF_FQDN, self.world.bsf_url)
        await self.cse.start("127.0.0.1", 0)
        card = self.world.profile()
        say = self.story.say
        say(f"SIM       ICCID {card.iccid}, IMSI {card.imsi}, ISIM {card.isim}, GBA_U {card.gba_u}")
        say(f"modem     AT port on a pseudo-terminal: {self.world.modem_link}")
        say(f"BSF       {self.world.bsf_url} (Ub: HTTP Digest AKA; Zn: JSON)")
        say(f"IN-CSE    coaps://{self.cse.address[0]}:{self.cse.address[1]} as {DEFAULT_NAF_FQDN} (keys over Zn)")

    async def _start_daemon(self) -> None:
        config = self.world.write_daemon_config([self.ae], control_port=self.control_port)
        t0 = time.monotonic()
        self.daemon = await DaemonProcess.start(config, log_file=self.workdir / "mn-secd.log")
        await self.daemon.wait_ready()
        self.story.say(f"mn-secd run --config {config}")
        self.story.say(f"READY=1 after {(time.monotonic() - t0) * 1000:.0f} ms; STATUS lines so far:")
        for line in self.daemon.notify.statuses():
            self.story.say(f"  STATUS={line}")

    async def _key(self, keys: KeyServiceClient) -> KeyAnswer:
        answer = await keys.get_key(DEFAULT_NAF_FQDN, "dtls-psk")
        self.answers.append(answer)
        self.story.show_key(answer)
        return answer

    async def _status(self, keys: KeyServiceClient) -> None:
        _show_status(self.story, await keys.status())

    async def _register(self, keys: KeyServiceClient, name: str) -> None:
        cse = self.cse
        assert cse is not None
        async with NafAssociation(keys, DEFAULT_NAF_FQDN, host=cse.address[0], port=cse.address[1]) as assoc:
            registration = await register_ae(assoc, name)
            await post_data(assoc, registration.ae_id, "21.5 C")
            value = await latest_data(assoc, registration.ae_id)
            owner = cse.aes[registration.ae_id].owner
            self.story.say(f"AE registered at the IN-CSE as {registration.ae_id}, posted and read back {value!r}")
            self.story.say(f"the IN-CSE authenticated B-TID {assoc.btid} and sees IMPI {owner}")
            self.story.say("no pre-provisioned secret: the IN-CSE got the same key from the BSF over Zn")

    async def _rebootstrap(self, keys: KeyServiceClient, first: KeyAnswer) -> None:
        try:
            await keys.force_bootstrap()
        except KeyServiceRejected as exc:
            if exc.retry_after is None or exc.retry_after > 30:
                raise
            self.story.say(f"the daemon allows one forced bootstrap per interval: retrying in {exc.retry_after:.1f} s")
            await asyncio.sleep(exc.retry_after + 0.05)
            await keys.force_bootstrap()
        answer = await self._key(keys)
        if answer.btid == first.btid:
            raise RuntimeError("the forced re-bootstrap did not give a new B-TID")

    async def _swap(self, keys: KeyServiceClient) -> None:
        before = (await keys.status()).impi
        new = self.world.swap_card()
        self.story.say(f"SIM out, SIM in: ICCID {new.iccid}, IMSI {new.imsi} (USIM only, 3-digit MNC)")
        status = await _wait_for_status(keys, lambda s: s.card_present and s.impi not in (None, before), 20)
        _show_status(self.story, status)
        await self._key(keys)
        await self._register(keys, "demo-ae-2")

    async def _stop_daemon(self) -> None:
        daemon, self.daemon = self.daemon, None
        assert daemon is not None
        code = await daemon.stop()
        stopping = any("STOPPING=1" in m.split("\n") for m in daemon.notify.messages)
        self.story.say(f"SIGTERM -> keys wiped, STOPPING=1 {'sent' if stopping else 'MISSING'}, exit code {code}")
        if code != 0 or not stopping:
            raise RuntimeError("the daemon did not stop cleanly")

    def _summary(self) -> None:
        modem, bsf = self.world.modem, self.world.bsf
        assert modem is not None and bsf is not None
        print(
            f"\ndone in {time.monotonic() - self.story.started:.2f} s: "
            f"{modem.apdu_count(INS_AUTHENTICATE)} AUTHENTICATE commands to the card (bootstraps and GBA_U NAF "
            f"derivations), {bsf.successes} bootstraps at the BSF, {bsf.zn_requests} Zn requests from the IN-CSE."
        )

    async def _teardown(self) -> None:
        if self.daemon is not None:
            await self.daemon.kill()
        if self.world.bsf is not None:
            self._bsf_secrets = [b.ks for b in self.world.bsf.bootstraps.values()]
        if self.cse is not None:
            await self.cse.stop()
        await self.world.stop()


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--reveal-keys", action="store_true", help="also print the keys (lab use only)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the run's files (cards, config, daemon log) here instead of a temp dir"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # aiocoap 0.4.17's DTLS client warns at every context shutdown that tinydtls still tried to write
    # (a close_notify into a closed socket); it is noise for a reader of the story, not a fault.
    warnings.filterwarnings("ignore", message="DTLS module did not shut down", category=UserWarning)
    if args.workdir is not None:
        workdir = args.workdir.resolve()
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, mode=0o700)
        return asyncio.run(Demo(workdir, reveal_keys=args.reveal_keys).run())
    with tempfile.TemporaryDirectory(prefix="mn-secd-demo-") as tmp:
        os.chmod(tmp, 0o700)
        return asyncio.run(Demo(Path(tmp), reveal_keys=args.reveal_keys).run())
