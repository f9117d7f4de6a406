"""Reference IN-CSE: a NAF reachable only over DTLS-PSK with GBA keys, with a tiny oneM2M-like tree.

It embeds :mod:`mn_secd.naf` exactly as a real IN-CSE would: the psk_identity a peer presents is a
B-TID, the key comes from the BSF over Zn, and the IMPI the BSF vouched for is what the CSE logs
(event ``naf-authenticated``) and what owns the AEs registered over that session. Resources, all
JSON (content format 50):

* ``GET /cse`` — the CSEBase (a cheap authenticated ping);
* ``POST /cse`` with ``{"m2m:ae": {"rn": NAME, "api": APP-ID}}`` — register an AE: 2.01 and
  ``{"m2m:ae": {..., "aei": AE-ID}}`` with Location-Path ``cse/AE-ID``; the same NAME from the same
  IMPI again answers 2.04 with the existing AE (an MN re-registering after a re-bootstrap), from
  another IMPI 4.09;
* ``GET /cse/AE-ID`` — the AE (its owner only);
* ``POST /cse/AE-ID/data`` with ``{"m2m:cin": {"con": TEXT}}`` — store a content instance (2.01);
* ``GET /cse/AE-ID/data`` — the latest content instance.

A session whose key has expired gets 4.01, which tells the MN to fetch a fresh key.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from weakref import WeakSet

import aiocoap
import aiocoap.error
import aiocoap.resource
from aiocoap.numbers.contentformat import ContentFormat

from mn_secd.errors import UnsupportedUaProtocol
from mn_secd.naf.cache import NafKeyCache
from mn_secd.naf.endpoint import NafServer, peer_claim, start_naf_server
from mn_secd.naf.psk import GbaPskCredentials, NafClaim
from mn_secd.naf.zn import ZnClient
from mn_secd.sim.argtypes import listen_address
from mn_secd.ua import UaId

log = logging.getLogger(__name__)

#: Bounds that keep the reference CSE's memory finite whatever its peers send.
MAX_AES = 1000
MAX_INSTANCES_PER_AE = 100
MAX_CONTENT = 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ContentInstance:
    ri: str
    con: str
    ct: datetime


@dataclass(slots=True)
class AeRecord:
    ae_id: str
    name: str
    app_id: str
    owner: str  # the IMPI the BSF vouched for at registration (or the B-TID's hash if it withheld it)
    created: datetime
    instances: deque[ContentInstance] = field(default_factory=lambda: deque(maxlen=MAX_INSTANCES_PER_AE))

    def to_json(self) -> dict[str, Any]:
        return {
            "m2m:ae": {
                "rn": self.name,
                "ri": self.ae_id,
                "aei": self.ae_id,
                "api": self.app_id,
                "ct": _timestamp(self.created),
            }
        }


def _timestamp(when: datetime) -> str:
    """oneM2M's basic time format (``YYYYMMDDThhmmss``)."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def _owner(claim: NafClaim) -> str:
    return claim.impi if claim.impi is not None else f"btid:{claim.btid_hash}"


def _json_body(request: aiocoap.Message, root: str) -> dict[str, Any]:
    if request.opt.content_format not in (None, ContentFormat.JSON):
        raise aiocoap.error.UnsupportedContentFormat("send JSON (content format 50)")
    try:
        doc = json.loads(request.payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise aiocoap.error.BadRequest("the payload is not JSON") from None
    inner = doc.get(root) if isinstance(doc, dict) else None
    if not isinstance(inner, dict):
        raise aiocoap.error.BadRequest(f"expected {{{root!r}: {{...}}}}")
    return inner


def _json_response(doc: dict[str, Any], code: aiocoap.Code, location: Sequence[str] = ()) -> aiocoap.Message:
    return aiocoap.Message(
        code=code,
        payload=json.dumps(doc).encode(),
        content_format=ContentFormat.JSON,
        location_path=tuple(location),
    )


class InCseSite(aiocoap.resource.Resource):  # type: ignore[misc]
    """The whole resource tree; every request must come from a GBA-authenticated session."""

    def __init__(self, cse_id: str, naf_fqdn: str, clock: Callable[[], datetime]) -> None:
        super().__init__()
        self.cse_id = cse_id
        self.naf_fqdn = naf_fqdn
        self._clock = clock
        self.aes: dict[str, AeRecord] = {}
        self._ids = itertools.count(1)
        self._announced: WeakSet[object] = WeakSet()

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        claim = peer_claim(request)
        if claim is None:
            raise aiocoap.error.Unauthorized("only GBA-keyed DTLS peers are served")
        if claim.expires <= self._clock():
            raise aiocoap.error.Unauthorized("the GBA key of this session has expired: bootstrap again")
        self._announce(request.remote, claim)
        path = tuple(request.opt.uri_path)
        code = request.code
        if path == ("cse",):
            if code == aiocoap.GET:
                return _json_response({"m2m:cb": {"csi": self.cse_id, "rn": "cse"}}, aiocoap.CONTENT)
            if code == aiocoap.POST:
                return self._register(request, claim)
            raise aiocoap.error.MethodNotAllowed()
        if len(path) not in (2, 3) or path[0] != "cse" or path[2:] not in ((), ("data",)):
            raise aiocoap.error.NotFound()
        ae = self.aes.get(path[1])
        if ae is None:
            raise aiocoap.error.NotFound(f"no AE {path[1]!r}")
        if ae.owner != _owner(claim):
            raise aiocoap.error.Forbidden("this AE was registered by another subscriber")
        if len(path) == 2 and code == aiocoap.GET:
            return _json_response(ae.to_json(), aiocoap.CONTENT)
        if len(path) == 3 and code == aiocoap.POST:
            return self._store(request, ae)
        if len(path) == 3 and code == aiocoap.GET:
            return self._latest(ae)
        raise aiocoap.error.MethodNotAllowed()

    def _announce(self, remote: object, claim: NafClaim) -> None:
        """Log each authenticated session once: the IMPI the BSF vouched for, the B-TID only hashed."""
        if remote in self._announced:
            return
        self._announced.add(remote)
        log.info(
            "GBA-authenticated peer: %s",
            claim.impi if claim.impi is not None else "(IMPI withheld by the BSF)",
            extra={
                "event": "naf-authenticated",
                "impi": claim.impi,
                "btid_hash": claim.btid_hash,
                "naf_fqdn": self.naf_fqdn,
                "identity_form": str(claim.form),
            },
        )

    def _register(self, request: aiocoap.Message, claim: NafClaim) -> aiocoap.Message:
        ae = _json_body(request, "m2m:ae")
        name, app_id = ae.get("rn"), ae.get("api", "")
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
            raise aiocoap.error.BadRequest("m2m:ae needs an 'rn' of 1 to 64 printable characters")
        if not isinstance(app_id, str) or len(app_id) > 64:
            raise aiocoap.error.BadRequest("'api' must be a string of at most 64 characters")
        owner = _owner(claim)
        existing = next((a for a in self.aes.values() if a.name == name), None)
        if existing is not None:
            if existing.owner != owner:
                raise aiocoap.error.Conflict(f"an AE named {name!r} belongs to another subscriber")
            return _json_response(existing.to_json(), aiocoap.CHANGED, ("cse", existing.ae_id))
        if len(self.aes) >= MAX_AES:
            raise aiocoap.error.ServiceUnavailable("too many AEs registered")
        record = AeRecord(f"C{next(self._ids):06d}", name, app_id, owner, self._clock())
        self.aes[record.ae_id] = record
        log.info(
            "AE registered: %s as %s",
            name,
            record.ae_id,
            extra={"event": "in-cse.ae-registered", "ae_id": record.ae_id, "impi": claim.impi},
        )
        return _json_response(record.to_json(), aiocoap.CREATED, ("cse", record.ae_id))

    def _store(self, request: aiocoap.Message, ae: AeRecord) -> aiocoap.Message:
        con = _json_body(request, "m2m:cin").get("con")
        if not isinstance(con, str) or len(con) > MAX_CONTENT:
            raise aiocoap.error.BadRequest(f"m2m:cin needs a 'con' string of at most {MAX_CONTENT} characters")
        instance = ContentInstance(f"{ae.ae_id}-cin{next(self._ids):06d}", con, self._clock())
        ae.instances.append(instance)
        doc = {"m2m:cin": {"ri": instance.ri, "con": instance.con, "ct": _timestamp(instance.ct)}}
        return _json_response(doc, aiocoap.CREATED, ("cse", ae.ae_id, "data"))

    def _latest(self, ae: AeRecord) -> aiocoap.Message:
        if not ae.instances:
            raise aiocoap.error.NotFound("no content instance yet")
        last = ae.instances[-1]
        return _json_response({"m2m:cin": {"ri": last.ri, "con": last.con, "ct": _timestamp(last.ct)}}, aiocoap.CONTENT)


class ReferenceInCse:
    """The reference IN-CSE as one object: ``await start()``, ``await stop()``.

    ``fqdn`` and ``ua`` make the NAF_Id (default Ua id ``01 00 01 C0 A8``); ``bsf_url`` is where Zn
    goes.
    """

    def __init__(
        self,
        fqdn: str,
        bsf_url: str,
        *,
        ua: UaId | None = None,
        cse_id: str = "/in-cse",
        zn_timeout: float = 2.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.zn = ZnClient(bsf_url, timeout=zn_timeout)
        self.credentials = GbaPskCredentials(self.zn, fqdn, ua=ua, cache=NafKeyCache(), clock=clock)
        self.site = InCseSite(cse_id, self.credentials.naf_fqdn, clock)
        self._server: NafServer | None = None

    @property
    def fqdn(self) -> str:
        return self.credentials.naf_fqdn

    @property
    def naf_id(self) -> bytes:
        return self.credentials.naf_id

    @property
    def aes(self) -> dict[str, AeRecord]:
        """Registered AEs by AE-ID."""
        return self.site.aes

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the CSE listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the IN-CSE is not running")
        return self._server.addresses[0]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); returns the base URI, e.g. ``coaps://127.0.0.1:5684``."""
        if self._server is not None:
            raise RuntimeError("the IN-CSE is already running")
        self._server = await start_naf_server(self.site, self.credentials, [host], port)
        bound_host, bound_port = self.address
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info(
            "reference IN-CSE listening",
            extra={"event": "in-cse.start", "port": bound_port, "naf_fqdn": self.fqdn, "ua": self.credentials.ua.hex},
        )
        return f"coaps://{shown}:{bound_port}"

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()
        await self.zn.aclose()

    async def __aenter__(self) -> ReferenceInCse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- command line ----------------------------------------------------------------------------------


def _ua(text: str) -> UaId:
    try:
        return UaId.parse(text)
    except UnsupportedUaProtocol as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    """``mn-secd sim naf``: arguments and handler."""
    parser.epilog = (
        "Prints the coaps:// base URI on stdout, then serves until SIGINT/SIGTERM. "
        "Peers present psk_identity = B-TID (bare or 3GPP-bootstrapping prefixed) and the 32-octet NAF key as PSK."
    )
    parser.add_argument("--fqdn", required=True, help="the IN-CSE's host name, as it goes into NAF_Id")
    parser.add_argument("--bsf", required=True, metavar="URL", help="the BSF's base URL for Zn")
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 5684),
        metavar="HOST:PORT",
        help="DTLS address (default 127.0.0.1:5684)",
    )
    parser.add_argument(
        "--ua",
        type=_ua,
        default=UaId.dtls_psk(),
        metavar="HEX",
        help="Ua security protocol id for NAF_Id (default 010001c0a8, TLS_PSK_WITH_AES_128_CCM_8)",
    )
    parser.add_argument("--zn-timeout", type=float, default=2.0, metavar="SECONDS", help="Zn timeout (default 2)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mn_secd.logs import setup_logging

    setup_logging("info")
    cse = ReferenceInCse(args.fqdn, args.bsf, ua=args.ua, zn_timeout=args.zn_timeout)
    host, port = args.listen
    asyncio.run(_serve(cse, host, port))
    return 0


async def _serve(cse: ReferenceInCse, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watched = (signal.SIGINT, signal.SIGTERM)
    for sig in watched:
        loop.add_signal_handler(sig, stop.set)
    try:
        print(await cse.start(host, port), flush=True)
        await stop.wait()
    finally:
        for sig in watched:
            loop.remove_signal_handler(sig)
        await cse.stop()
