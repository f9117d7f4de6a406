"""The composition root: build the daemon from its configuration, run it, stop it cleanly.

Start-up, in order:

1. the AE registry and the control socket (CoAP over DTLS-PSK), so AEs get *answers* from the first
   second on: 5.03 with a reason while there is no card yet, never a silent timeout;
2. the card: the modem's AT port (or, with ``transport = "pcsc"``, the PC/SC reader) is opened and
   the card's identity read, retrying with a capped exponential back-off; while the modem may still
   be booting the daemon asks systemd for more start-up time (EXTEND_TIMEOUT_USEC);
3. READY=1 as soon as the control socket is up and the card has answered. The first GBA bootstrap
   is *not* awaited: the session of the last run is resumed if it is still valid (a GBA_U card's
   EF_GBABP, or a GBA_ME session sealed in the state directory: :mod:`mn_secd.gba.session_store`),
   else the bootstrap starts in the background after the start jitter (``[gba] start_jitter``), at
   once if an AE asked for a key while there was no card; the first key request joins it or starts it.

**A modem that does not answer is not fatal.** A port that does not exist at all is a configuration
error and the daemon exits (``modem.port``), but a modem that exists and does not answer (still
booting, firmware hung, SIM missing) is waited for, with back-off, for as long as it takes: a
gateway's modem often comes up after the services that need it, and exiting would only trade our
back-off for systemd's restart limit, which eventually gives up for good. After ``modem_wait``
seconds without a card the daemon reports READY=1 anyway with ``STATUS=degraded: ...`` (so that
start-up finishes and dependent units run), keeps serving 5.03 on the control socket and keeps
retrying. The same holds for a PC/SC reader that is not plugged in yet or a pcscd that is not
running yet; only a missing pyscard is a configuration error (``modem.transport``).

**A card that waits for a person is not waited for.** When the card's answer cannot change until
someone acts (:func:`~mn_secd.errors.needs_person`: a SIM locked by a PIN we have not got or that
it refused, by its PUK or by a modem or network lock, or a card with neither USIM nor ISIM),
READY=1 comes at once with ``STATUS=degraded: the card waits for an operator: ...`` naming the
remedy: waiting ``modem_wait`` would only hold ``systemctl start`` for two minutes. The card is
looked at again on the same back-off, under the same rules (the PIN at most once per insertion,
never a PUK), so a SIM unlocked by hand or swapped is taken when it comes.

Once the card is open, :mod:`mn_secd.uicc.card` itself follows removals, swaps and a vanishing
port or reader; this module only reflects them in STATUS= and the log. A SIM that is busy (the
first seconds after power-up) is asked again within a few seconds; a locked one gets its PIN from
``[modem] pin_file`` at most once per insertion (:class:`~mn_secd.uicc.pin.PinKeeper`, kept for the
whole run), and otherwise STATUS names the lock and the remedy. Another program on the modem's port
is named in every STATUS= line while it is there.

Signals: SIGHUP re-reads the configuration file and swaps the AE registry in (keys are kept; other
sections need a restart and a warning says so); SIGTERM and SIGINT send STOPPING=1, wipe every
key (:meth:`KeyStore.close`), close the control socket and the card, and exit 0.

This module imports nothing from :mod:`mn_secd.sim` (nor aiohttp, which only the simulated world
uses), so the daemon process stays small; a test checks ``sys.modules`` of a running daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC
from typing import Any

from mn_secd.card_identity import CardEvent, CardEventKind, CardIdentity
from mn_secd.config import Config, load_config
from mn_secd.control.payloads import mask_impi
from mn_secd.control.registry import AeRegistry, load_registry
from mn_secd.control.server import ControlServer, start_control_server
from mn_secd.errors import (
    ConfigError,
    MnSecdError,
    SealingUnavailable,
    StoredSessionInvalid,
    UiccAbsent,
    UiccBusy,
    needs_person,
)
from mn_secd.gba.keystore import KeyStore
from mn_secd.gba.planner import StartAction
from mn_secd.gba.sealing import SessionSealer, load_session_key
from mn_secd.gba.session_store import SessionKeeper, StateDirectory
from mn_secd.gba.ub import UbClient
from mn_secd.logs import btid_hash
from mn_secd.naf_keys import KeyEvent, KeyEventKind, KeyServiceStatus, NafKey
from mn_secd.notify import Notifier
from mn_secd.observers import Subscribers
from mn_secd.secret import SecretBytes
from mn_secd.ua import UaId
from mn_secd.uicc.card import Card, PortSharing, open_card
from mn_secd.uicc.pin import PinKeeper

log = logging.getLogger(__name__)

#: Default for how long start-up waits for the card before reporting READY=1 in degraded mode.
MODEM_WAIT = 120.0
#: Back-off between attempts to open the modem: doubles from FIRST to MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
#: A busy SIM is ready within seconds: it is asked again at least this often.
BUSY_RETRY_MAX = 4.0
#: Seconds each shutdown step may take (the unit's TimeoutStopSec=15 covers all of them).
SHUTDOWN_STEP = 3.0
#: Extra start-up time asked of systemd beyond the wait itself (one more attempt may be running).
EXTEND_MARGIN = 15.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MnSecdError):
        return f"{exc.kind}: {exc}"
    if isinstance(exc, TimeoutError):
        return "timeout: no answer in time"
    return f"{type(exc).__name__}: {exc}"


class KeyStoreSlot:
    """Where the :class:`KeyStore` goes once there is a card: the key provider the control server holds.

    The control socket is up before the card is, and the card may come and go, so the server holds
    this stable object (a :class:`~mn_secd.interfaces.KeyProvider` for the daemon's lifetime): it
    forwards to the :class:`KeyStore` once there is one and, until then,
    answers every request with the reason there is none (mapped to 5.03 by the control layer).
    Subscribers stay subscribed across the switch.
    """

    def __init__(self, unavailable: MnSecdError) -> None:
        self._store: KeyStore | None = None
        self._unavailable = unavailable
        self._subscribers = Subscribers[KeyEvent](log, "daemon.subscriber_error")
        self._unsubscribe_store: Callable[[], None] | None = None
        #: An AE asked for a key before there was a keystore: the first bootstrap skips the start jitter.
        self.asked = False

    @property
    def store(self) -> KeyStore | None:
        return self._store

    def set_unavailable(self, reason: MnSecdError) -> None:
        self._unavailable = reason

    def attach(self, store: KeyStore) -> None:
        self._store = store
        self._unsubscribe_store = store.subscribe(self._subscribers.emit)

    async def close(self) -> None:
        """Wipe every key and stop the keystore's timer; later requests get the unavailable answer."""
        store, self._store = self._store, None
        if self._unsubscribe_store is not None:
            self._unsubscribe_store()
        if store is not None:
            await store.close()
        self._subscribers.emit(KeyEvent(KeyEventKind.WIPED))

    async def get_key(self, naf_fqdn: str, ua_id: UaId, force: bool = False) -> NafKey:
        if self._store is None:
            self.asked = True
            raise self._unavailable
        return await self._store.get_key(naf_fqdn, ua_id, force)

    async def force_bootstrap(self) -> None:
        if self._store is None:
            self.asked = True
            raise self._unavailable
        await self._store.force_bootstrap()

    def status(self) -> KeyServiceStatus:
        if self._store is not None:
            return self._store.status()
        return KeyServiceStatus(
            card_present=False,
            impi=None,
            bootstrapped=False,
            btid=None,
            expires=None,
            gba_mode=None,
            last_error=_describe(self._unavailable),
        )

    def subscribe(self, callback: Callable[[KeyEvent], None]) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)


class Daemon:
    """One run of the daemon; :func:`run_daemon` is the entry point."""

    def __init__(
        self, config: Config, notifier: Notifier, *, modem_wait: float = MODEM_WAIT, pin: SecretBytes | None = None
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.modem_wait = modem_wait
        self.keys = KeyStoreSlot(UiccAbsent(f"waiting for {config.modem.where}"))
        self.server: ControlServer | None = None
        self.card: Card | None = None
        self.ub: UbClient | None = None
        self.keeper: SessionKeeper | None = None
        self.ready = False
        self._stop = asyncio.Event()
        self._card_up = asyncio.Event()
        self._person_needed = asyncio.Event()  # the card's answer is final until someone acts: READY now
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe_card: Callable[[], None] | None = None
        self.failed: BaseException | None = None  # an internal error that stopped the daemon
        self.pin = PinKeeper(pin)  # the PIN from [modem] pin_file; wiped at shutdown
        self._port_note: str | None = None  # another program on the modem's port, while it is there

    # --- life cycle ----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        # Everything that can be wrong with the configuration fails here, before anything starts.
        registry = load_registry(self.config.aes, source=str(self.config.path))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            self._spawn(self.notifier.run_watchdog(), "watchdog")
            await self._start_control(registry)
            self._spawn(self._connect_card(), "connect-card")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.modem_wait):
                    await self._wait_first(self._card_up, self._person_needed, self._stop)
            if not self._stop.is_set():
                self.ready = True
                self.notifier.ready(self.notifier.last_status)
                log.info(
                    "ready after %.3f s",
                    time.monotonic() - started,
                    extra={
                        "event": "daemon.ready",
                        "card": self._card_up.is_set(),
                        "needs_operator": self._person_needed.is_set() and not self._card_up.is_set(),
                    },
                )
                await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return 0

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            log.info("stopping", extra={"event": "daemon.stopping"})
            self.notifier.stopping("stopping: wiping keys")

    async def _shutdown(self) -> None:
        """Keys first (wiped; observers are told), then the control socket, the card, the BSF client.

        Each step is bounded, and one failing does not skip the others: a modem that stopped
        answering must not keep the daemon from exiting before systemd's stop timeout kills it.
        """
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._unsubscribe_card is not None:
            self._unsubscribe_card()
        steps: list[tuple[str, Callable[[], Awaitable[None]] | None]] = [
            ("the keystore", self.keys.close),
            ("the session store", self.keeper.aclose if self.keeper is not None else None),
            ("the control socket", self.server.close if self.server is not None else None),
            ("the card", self.card.close if self.card is not None else None),
            ("the BSF client", self.ub.aclose if self.ub is not None else None),
        ]
        for what, close in steps:
            if close is None:
                continue
            try:
                async with asyncio.timeout(SHUTDOWN_STEP):
                    await close()
            except Exception as exc:
                log.warning("closing %s failed: %s", what, _describe(exc), extra={"event": "daemon.close_failed"})
        self.pin.wipe()
        if self.server is not None:
            log.info("stopped; keys wiped", extra={"event": "daemon.stopped"})

    async def _start_control(self, registry: AeRegistry) -> None:
        control = self.config.control
        try:
            self.server = await start_control_server(
                self.keys,
                registry,
                control.addresses,
                control.port,
                max_peers=control.max_peers,
                max_handshakes=control.max_handshakes,
                idle_timeout=control.idle_timeout,
                max_observations=control.max_observations,
            )
        except OSError as exc:
            where = f"{', '.join(control.addresses)} port {control.port}"
            raise ConfigError(
                str(self.config.path), "control.port", f"cannot listen on {where}: {exc.strerror}"
            ) from None
        log.info(
            "control socket up on %s port %d (%d AEs)",
            ", ".join(control.addresses),
            control.port,
            len(self.config.aes),
            extra={"event": "control.up"},
        )

    # --- the card ------------------------------------------------------------------------------------

    async def _connect_card(self) -> None:
        modem = self.config.modem
        deadline = time.monotonic() + self.modem_wait
        delay = RETRY_FIRST
        self._status(f"waiting for {modem.where}")
        self.notifier.extend_timeout(self.modem_wait + EXTEND_MARGIN)
        while True:
            try:
                card, identity = await self._open_card()
            except (MnSecdError, OSError) as exc:
                reason = exc if isinstance(exc, MnSecdError) else UiccAbsent(f"modem unavailable: {exc}")
                self.keys.set_unavailable(reason)
                if isinstance(exc, UiccBusy):
                    delay = min(delay, BUSY_RETRY_MAX)
                if needs_person(exc):
                    # Waiting out modem_wait would only hold systemd's start job (and `systemctl
                    # start`): STATUS= names what to do, READY=1 follows at once. The card is still
                    # looked at on the same back-off (a swapped or re-inserted SIM is taken; the
                    # PinKeeper still allows one PIN entry per insertion and never a PUK).
                    self._degraded(
                        f"the card waits for an operator: {_describe(exc)}; looking again in {delay:.0f} s",
                        "card.needs_person",
                    )
                    self._person_needed.set()
                else:
                    self._degraded(f"no card yet ({_describe(exc)}); retrying in {delay:.0f} s", "modem.unavailable")
                if not self.ready and not self._person_needed.is_set():
                    self.notifier.extend_timeout(max(0.0, deadline - time.monotonic()) + EXTEND_MARGIN)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BUSY_RETRY_MAX if isinstance(exc, UiccBusy) else RETRY_MAX)
                continue
            break
        self.card = card
        self._card_found(identity)
        self.ub = UbClient(
            self.config.gba.bsf_url,
            timeout=self.config.gba.http_timeout,
            retries=self.config.gba.retries,
            require_rspauth=self.config.gba.require_rspauth,
        )
        gba = self.config.gba
        self.keeper = await self._session_keeper()
        store = KeyStore(card, self.ub, gba.mode, timing=gba.timing(), keeper=self.keeper)
        self.keys.attach(store)
        store.subscribe(self._on_key_event)
        self._unsubscribe_card = card.subscribe(self._on_card_event)
        self._card_up.set()
        self._spawn(self._start_keys(store), "start-keys")

    async def _open_card(self) -> tuple[Card, CardIdentity]:
        """One attempt: the port opened, the card up and its identity read, or nothing left open."""
        card = await open_card(self.config.modem, pin=self.pin, notices=self._on_card_notice)
        try:
            return card, await card.identity()
        except BaseException:
            await card.close()
            raise

    def _card_found(self, identity: CardIdentity) -> None:
        log.info(
            "card found: %s via %s (%s, GBA_U %s)",
            mask_impi(identity.impi),
            identity.transport,
            identity.application.value,
            "yes" if identity.gba_u else "no",
            extra={"event": "card.found", "impi": mask_impi(identity.impi)},
        )
        self._status(f"card found: {mask_impi(identity.impi)} ({identity.application.value})")

    def _on_card_event(self, event: CardEvent) -> None:
        if event.kind is CardEventKind.REMOVED:
            path = "reader" if self.config.modem.uses_reader else "modem"
            self._degraded(f"card removed or {path} gone; keys wiped", "card.removed")
            return
        if event.identity is not None:
            self._card_found(event.identity)
        self._bootstrap_in_background()

    def _on_card_notice(self, notice: PortSharing | MnSecdError) -> None:
        """Another program on the port (named in every STATUS= from now on), or why a card that
        came back is not usable (locked, busy)."""
        if isinstance(notice, PortSharing):
            self._port_note = None if notice.clear else notice.describe()
            self._status(self.notifier.last_status or "running")
        else:
            self._degraded(f"card not usable ({_describe(notice)})", "card.unusable")

    # --- GBA -----------------------------------------------------------------------------------------

    async def _session_keeper(self) -> SessionKeeper | None:
        """Where sessions are kept across restarts, or None (said once in the log, with why)."""
        gba = self.config.gba
        path = gba.state_path(os.environ)
        if path is None:
            log.log(
                logging.WARNING if gba.persist_session else logging.INFO,
                "no state directory ($STATE_DIRECTORY unset, no [gba] state_directory): sessions are not"
                " kept across restarts",
                extra={"event": "gba.no_state_directory"},
            )
            return None
        try:
            directory = await asyncio.to_thread(StateDirectory.open, path)
        except StoredSessionInvalid as exc:
            log.warning("sessions are not kept across restarts: %s", exc, extra={"event": "gba.no_state_directory"})
            return None
        sealer = None
        if gba.persist_session:
            try:
                sealer = SessionSealer(load_session_key(os.environ.get("CREDENTIALS_DIRECTORY")))
            except SealingUnavailable as exc:
                log.warning(
                    "persist_session refused, GBA_ME sessions are not kept (Ks is never written unsealed): %s",
                    exc,
                    extra={"event": "gba.persist_refused"},
                )
        keeper = SessionKeeper(directory, sealer)
        await keeper.drop_sealed()
        return keeper

    async def _start_keys(self, store: KeyStore) -> None:
        """Resume the last run's session, or bootstrap after the start jitter (at once if an AE asked)."""
        try:
            decision = await store.start(ae_waiting=self.keys.asked)
        except MnSecdError as exc:  # the card went away meanwhile: its return bootstraps
            self._degraded(f"start-up failed ({_describe(exc)})", "gba.start_failed")
            return
        status = store.status()
        if decision.action is StartAction.RESUME and status.expires is not None and status.btid is not None:
            until = status.expires.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            mode = status.gba_mode.value if status.gba_mode is not None else "?"
            hashed = btid_hash(status.btid)
            self._status(f"bootstrapped until {until} ({mode}, B-TID #{hashed}; resumed from the last run)")
            return
        wait = decision.at - time.time()
        if wait > 0:
            self._status(f"bootstrapping in {wait:.0f} s (start jitter; at once when an AE asks for a key)")
            await asyncio.sleep(wait)
            status = store.status()
            if store is not self.keys.store or status.bootstrapped or not status.card_present:
                return  # an AE's request bootstrapped already, or the card went
        await self._bootstrap()

    def _bootstrap_in_background(self) -> None:
        """The first key request would bootstrap anyway; doing it now makes that request fast."""
        self._spawn(self._bootstrap(), "bootstrap")

    async def _bootstrap(self) -> None:
        store = self.keys.store
        if store is None:
            return
        self._status("bootstrapping with the BSF")
        try:
            await store.ensure_bootstrapped()
        except MnSecdError as exc:
            self._degraded(f"bootstrap failed ({_describe(exc)}); retrying by itself", "gba.failed")

    def _on_key_event(self, event: KeyEvent) -> None:
        store = self.keys.store
        if event.kind is KeyEventKind.REFRESHED and store is not None:
            status = store.status()
            if status.expires is not None and status.btid is not None:
                until = status.expires.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
                mode = status.gba_mode.value if status.gba_mode is not None else "?"
                self._status(f"bootstrapped until {until} ({mode}, B-TID #{btid_hash(status.btid)})")

    # --- reload --------------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: a new AE registry from the file; a bad file changes nothing (and says why)."""
        try:
            config = load_config(self.config.path)
            registry = load_registry(config.aes, source=str(config.path))
        except MnSecdError as exc:
            log.error(
                "reload refused, keeping the running configuration: %s", exc, extra={"event": "config.reload_failed"}
            )
            return
        if self.server is not None:
            self.server.reload_registry(registry)
        stale = [
            name for name in ("modem", "gba", "control", "log") if getattr(config, name) != getattr(self.config, name)
        ]
        if config.pin_file != self.config.pin_file and "modem" not in stale:
            stale.insert(0, "modem")
        if stale:
            log.warning(
                "changes to [%s] take effect after a restart",
                "], [".join(stale),
                extra={"event": "config.restart_needed"},
            )
        self.config = config

    # --- helpers -------------------------------------------------------------------------------------

    def _degraded(self, why: str, event: str) -> None:
        log.warning("degraded: %s", why, extra={"event": event})
        self._status(f"degraded: {why}")

    def _status(self, text: str) -> None:
        """STATUS=, with the warning about another program on the modem's port while there is one."""
        note = f"; warning: {self._port_note}" if self._port_note else ""
        self.notifier.status(text.partition("; warning: ")[0] + note)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"mn-secd-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug, not an operating condition: stop (systemd's Restart=on-failure brings us back).
            log.critical("internal error in %s", task.get_name(), exc_info=exc, extra={"event": "daemon.crash"})
            self.failed = exc
            self.stop()

    @staticmethod
    async def _wait_first(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


async def run_daemon(
    config: Config,
    *,
    notifier: Notifier | None = None,
    modem_wait: float = MODEM_WAIT,
    pin: SecretBytes | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean stop, 1 after an internal error. ``pin``: the SIM PIN
    from ``[modem] pin_file`` (:func:`mn_secd.config.load_pin`), wiped when the daemon stops."""
    daemon = Daemon(config, notifier or Notifier(), modem_wait=modem_wait, pin=pin)
    code = await daemon.run()
    return 1 if daemon.failed is not None else code
