"""The AE side of the key service: an asyncio client for the daemon's control socket.

An AE holds a PSK identity and a PSK (its own file, the same one the daemon's configuration names)
and asks for NAF keys::

    async with KeyServiceClient("ae-metering", psk) as keys:
        answer = await keys.get_key("in-cse.example.net")      # B-TID, key, expiry, GBA mode
        async for fresh in keys.observe_key("in-cse.example.net"):
            ...                                                 # every refresh, until an error

Failures are typed and fast. A DTLS server drops a handshake with a wrong PSK without a word, and
aiocoap's client would retransmit for about 90 s; here the handshake gets ``handshake_timeout``
(5 s) and then :class:`~mn_secd.errors.KeyServiceTimeout` names the likely cause from how far the
handshake got: no answer at all (the daemon is not running there, or too busy to answer), the
cookie exchange and then silence (busy), or the daemon's ServerHello and then silence (most likely
a wrong PSK). An unknown identity is refused at once (:class:`~mn_secd.errors.KeyServiceRefused`),
nothing listening is :class:`~mn_secd.errors.KeyServiceUnreachable`, as is a handshake the daemon
ended because too many were under way at once, and an error answer is
:class:`~mn_secd.errors.KeyServiceRejected` with the server's error kind, culprit and retry hint.
Once the session is up, an answer may take as long as a bootstrap does (``timeout``).
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiocoap
import aiocoap.error
from aiocoap.numbers.codes import Code
from aiocoap.transports import tinydtls
from aiocoap.util import hostportjoin, hostportsplit

from mn_secd import dtls
from mn_secd.control.payloads import (
    CBOR,
    KeyRequest,
    decode_key_answer,
    decode_status,
    encode_key_request,
    error_from_answer,
)
from mn_secd.control.registry import read_psk_file
from mn_secd.errors import (
    ConfigError,
    KeyServiceError,
    KeyServiceRefused,
    KeyServiceTimeout,
    KeyServiceUnreachable,
    RequestError,
)
from mn_secd.naf_keys import KeyServiceStatus, NafKey
from mn_secd.ua import UaId, normalise_fqdn

#: What :meth:`KeyServiceClient.get_key` returns: NAF FQDN, Ua id, NAF_Id, B-TID, key, expiry, mode.
KeyAnswer = NafKey

T = TypeVar("T")

DEFAULT_SERVER = ("127.0.0.1", 5684)
HANDSHAKE_TIMEOUT = 5.0
ANSWER_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class AeCredentials:
    """An AE's identity and PSK, as read from its files."""

    identity: str
    psk: bytes = field(repr=False)
    server: tuple[str, int] | None = None


def load_credentials(path: str | Path) -> AeCredentials:
    """Read a client credentials file (TOML)::

    identity = "ae-metering"
    psk_file = "ae-metering.psk"   # relative to this file; the PSK verbatim, mode 0600
    server = "127.0.0.1:5684"      # optional
    """
    file = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(file, "(file)", f"cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(file, "(syntax)", f"not valid TOML: {exc}") from None
    unknown = set(data) - {"identity", "psk_file", "server"}
    if unknown:
        raise ConfigError(file, sorted(unknown)[0], "unknown key")
    identity, psk_name = data.get("identity"), data.get("psk_file")
    if not isinstance(identity, str) or not identity:
        raise ConfigError(file, "identity", "missing (the AE's PSK identity)")
    if not isinstance(psk_name, str) or not psk_name:
        raise ConfigError(file, "psk_file", "missing (the file holding the AE's PSK)")
    server = data.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(file, "server", "expected HOST:PORT")
    psk_path = Path(psk_name) if Path(psk_name).is_absolute() else Path(path).parent / psk_name
    return AeCredentials(
        identity, read_psk_file(psk_path, "psk_file"), None if server is None else parse_server(server, file)
    )


def parse_server(text: str, file: str = "--server") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or just a host (port 5684)."""
    try:
        host, port = hostportsplit(text)
    except ValueError:
        raise ConfigError(file, "server", f"expected HOST:PORT, got {text!r}") from None
    if not host or (port is not None and not 0 < port < 65536):
        raise ConfigError(file, "server", f"expected HOST:PORT, got {text!r}")
    return host, port if port is not None else DEFAULT_SERVER[1]


class KeyServiceClient:
    """One AE's DTLS session to the daemon's key service (opened on first use, reused after)."""

    def __init__(
        self,
        identity: str | bytes,
        psk: bytes,
        host: str = DEFAULT_SERVER[0],
        port: int = DEFAULT_SERVER[1],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.identity = identity.encode() if isinstance(identity, str) else identity
        if not 1 <= len(self.identity) <= dtls.MAX_IDENTITY_LENGTH:
            raise ValueError(f"a PSK identity is 1 to {dtls.MAX_IDENTITY_LENGTH} octets")
        self._psk = dtls.check_psk(psk)
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.timeout = timeout
        self._context: aiocoap.Context | None = None
        #: How far the last handshake got, for the error message when it fails.
        self._progress: dtls.HandshakeProgress | None = None

    def __repr__(self) -> str:
        return f"KeyServiceClient({self.identity.decode(errors='replace')!r}, {self.base_uri})"

    @property
    def base_uri(self) -> str:
        return f"coaps://{hostportjoin(self.host, self.port)}"

    async def __aenter__(self) -> KeyServiceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()

    # --- the API ---------------------------------------------------------------------------------------

    async def get_key(self, naf_fqdn: str, ua: str | UaId = "dtls-psk", force: bool = False) -> KeyAnswer:
        """The key for a NAF (from the daemon's cache, or after a bootstrap; ``force`` re-bootstraps)."""
        response = await self._exchange(self._key_request(naf_fqdn, ua, force, aiocoap.FETCH))
        return self._decode(response, decode_key_answer)

    async def status(self) -> KeyServiceStatus:
        response = await self._exchange(aiocoap.Message(code=Code.GET, uri=self._uri("status")))
        return self._decode(response, decode_status)

    async def force_bootstrap(self) -> KeyServiceStatus:
        """Ask for a re-bootstrap now (e.g. after a NAF rejected the B-TID); returns the new status."""
        response = await self._exchange(aiocoap.Message(code=Code.POST, uri=self._uri("bootstrap")))
        return self._decode(response, decode_status)

    async def observe_key(self, naf_fqdn: str, ua: str | UaId = "dtls-psk") -> AsyncIterator[KeyAnswer]:
        """The key now, then again after every refresh or wipe; an error answer ends it (raised).

        Stop iterating (or ``aclose()`` the iterator) to cancel the observation. The daemon holds a
        few observations per AE (``[control] max_observations``); beyond that it answers once, and
        the next iteration raises :class:`~mn_secd.errors.KeyServiceError`.
        """
        message = self._key_request(naf_fqdn, ua, False, aiocoap.FETCH)
        message.opt.observe = 0
        context = await self._context_ready()
        request = context.request(message)
        try:
            first = await self._await(context, request.response)
            yield self._decode(first, decode_key_answer)
            if first.opt.observe is None:
                raise KeyServiceError(
                    f"the key service at {self.base_uri} answered without Observe: this AE already holds as many"
                    " observations as the daemon allows ([control] max_observations)"
                )
            if request.observation is None:
                return
            async for notification in request.observation:
                yield self._decode(notification, decode_key_answer)
        except aiocoap.error.ObservationCancelled:
            return
        except aiocoap.error.NetworkError as exc:
            raise self._network_error(exc) from None
        finally:
            if request.observation is not None and not request.observation.cancelled:
                request.observation.cancel()

    # --- plumbing ----------------------------------------------------------------------------------------

    def _uri(self, path: str) -> str:
        return f"{self.base_uri}/{path}"

    def _key_request(self, naf_fqdn: str, ua: str | UaId, force: bool, code: Code) -> aiocoap.Message:
        ua_id = ua if isinstance(ua, UaId) else UaId.parse(ua)
        payload = encode_key_request(KeyRequest(normalise_fqdn(naf_fqdn), ua_id, force), CBOR)
        return aiocoap.Message(code=code, uri=self._uri("key"), payload=payload, content_format=CBOR, accept=CBOR)

    async def _context_ready(self) -> aiocoap.Context:
        if self._context is None:
            context = await dtls.create_dtls_client_context()
            context.client_credentials.load_from_dict(
                {f"{self.base_uri}/*": {"dtls": {"psk": self._psk, "client-identity": self.identity}}}
            )
            self._context = context
        return self._context

    async def _exchange(self, message: aiocoap.Message) -> aiocoap.Message:
        """One request; retried once on a fresh session if the server had ended ours."""
        for attempt in (1, 2):
            context = await self._context_ready()
            try:
                return await self._await(context, context.request(message.copy()).response)
            except aiocoap.error.NetworkError as exc:
                if attempt == 1 and isinstance(exc.__cause__, tinydtls.CloseNotifyReceived):
                    continue
                raise self._network_error(exc) from None
        raise AssertionError("unreachable")

    async def _await(self, context: aiocoap.Context, response: Any) -> aiocoap.Message:
        """Wait for an answer: ``handshake_timeout`` for the DTLS session, then ``timeout``."""
        task: asyncio.Future[aiocoap.Message] = asyncio.ensure_future(response)
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + self.handshake_timeout
            self._progress = None
            while not task.done():
                progress = dtls.client_handshake_progress(context, self.host, self.port, self.identity)
                self._progress = progress if progress is not None else self._progress
                if progress is dtls.HandshakeProgress.CONNECTED:
                    break
                if loop.time() >= deadline:
                    await self.close()
                    raise self._handshake_timeout(self._progress)
                await asyncio.wait({task}, timeout=0.01)
            try:
                return await asyncio.wait_for(asyncio.shield(task), self.timeout)
            except TimeoutError:
                await self.close()
                raise KeyServiceTimeout(
                    f"the key service at {self.base_uri} did not answer within {self.timeout:g} s"
                ) from None
        finally:
            task.cancel()

    def _handshake_timeout(self, progress: dtls.HandshakeProgress | None) -> KeyServiceTimeout:
        within = f"within {self.handshake_timeout:g} s"
        who = self.identity.decode(errors="replace")
        if progress is None or progress is dtls.HandshakeProgress.SILENT:
            return KeyServiceTimeout(
                f"no answer at all from the key service at {self.base_uri} {within}: it is not running there,"
                " or too busy to answer"
            )
        if progress is dtls.HandshakeProgress.COOKIE:
            return KeyServiceTimeout(
                f"the key service at {self.base_uri} answered the DTLS cookie exchange, then nothing {within}:"
                " it is busy; try again"
            )
        return KeyServiceTimeout(
            f"no DTLS session with the key service at {self.base_uri} {within}: most likely a wrong PSK for"
            f" identity {who!r} (a wrong key is dropped silently)"
        )

    def _network_error(self, exc: aiocoap.error.NetworkError) -> KeyServiceError:
        cause = exc.__cause__
        who = self.identity.decode(errors="replace")
        if isinstance(cause, tinydtls.FatalDTLSError):
            return KeyServiceRefused(
                f"the key service at {self.base_uri} refused the DTLS handshake: "
                f"it most likely does not know the PSK identity {who!r}"
            )
        if isinstance(cause, tinydtls.CloseNotifyReceived) and self._progress is not dtls.HandshakeProgress.CONNECTED:
            return KeyServiceUnreachable(
                f"the key service at {self.base_uri} ended the DTLS handshake before it completed:"
                " too many handshakes at once; try again"
            )
        if isinstance(cause, ConnectionRefusedError):
            return KeyServiceUnreachable(f"nothing listens at {self.base_uri}: is the mn-secd daemon running?")
        return KeyServiceUnreachable(f"no exchange with the key service at {self.base_uri}: {exc}")

    @staticmethod
    def _decode(response: aiocoap.Message, decode: Callable[[bytes, int | None], T]) -> T:
        if not response.code.is_successful():
            raise error_from_answer(response.code, response.payload, response.opt.max_age)
        try:
            return decode(response.payload, response.opt.content_format)
        except RequestError as exc:
            raise KeyServiceError(f"unexpected answer from the key service: {exc}") from None
