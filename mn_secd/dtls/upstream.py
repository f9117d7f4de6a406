"""The upstream code mn_secd's DTLS transports are written against, and the limits of our tinydtls.

aiocoap's DTLS support is marked "highly experimental" upstream, and mn_secd runs its own server
and client transports built on aiocoap internals (:mod:`.server`, :mod:`.client`). Those internals
are private API, so the exact upstream sources are pinned here by hash: a new aiocoap or DTLSSocket
release, or the unpatched DTLSSocket whose buffers GBA keys would overrun, fails loudly when the
first mn_secd context is made instead of half-working. The tests in ``tests/unit/test_dtls_fix.py``
that exercise upstream's own code fail the day upstream changes the behaviour we work around.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import aiocoap.meta

from mn_secd.errors import DtlsFixMismatch

UPSTREAM_AIOCOAP = "0.4.17"
UPSTREAM_DTLSSOCKET = "0.2.3"
#: The version our patched build of DTLSSocket 0.2.3 carries (a local version: it satisfies ==0.2.3).
PATCHED_DTLSSOCKET = UPSTREAM_DTLSSOCKET + "+mnsecd.gbapsk"
#: sha256 of the upstream modules whose internals our transports subclass or rely upon.
UPSTREAM_SOURCES: dict[str, str] = {
    # Context._append_tokenmanaged_messagemanaged_transport, the hook that adds our client transport
    # (the server transport is appended the same way, by hand, with its own message manager);
    # Context.render_to_pipe and _render_to_pipe, which the server context re-states without the
    # per-request repr.
    "aiocoap.protocol": "587229a3fc443ecb13582eabe757a7296ec07009df9bef8d8df733a0950cdcd4",
    # error_to_message and run_driving_pipe, which that render_to_pipe calls as upstream's does, and
    # what error_to_message answers to an exception, which the short way for plain requests
    # re-states (mn_secd.dtls.rendering); TokenManager.process_request (below) is its other half.
    "aiocoap.pipe": "ff281de2368da43b528ed48720e35d3a34957f3d05d05cd1e5170d2fbeeceb0d",
    # Subclassed for bounded deduplication; dispatch_error ends a session's exchanges and observations.
    "aiocoap.messagemanager": "05dacf78ce9162fb8dd12cefdde9146d426ae91e7189c3b3384800ef7a0e2107",
    # Subclassed for the short way for plain requests (mn_secd.dtls.rendering): incoming_requests.
    "aiocoap.tokenmanager": "a2d753515aa7af26bf87a7791b32883776a30642119fa5e4a17bf52413ebb534",
    # Site's routing (_resources, _find_child_and_pathstripped_message) and Resource.render, which
    # the key service's site and resources re-state without a copy of the request or its method's
    # name formatted (mn_secd.control.server).
    "aiocoap.resource": "27d8a5fa85f11a9f3d8a6be1085f3972966a0c082fb347229066ce5cd10e2516",
    # The base of our server's message interface.
    "aiocoap.transports.generic_udp": "122174962990f2cc9a0800f68c7a11ab1660780bea7d5a15ea7a83c98bbd9670",
    # The base of our client transport (DTLSClientConnection, MessageInterfaceTinyDTLS).
    "aiocoap.transports.tinydtls": "b4398936cb3322c41e0462be903c196e358cd0ca36d44566d5c405c3ffff2b40",
    # Message keeps the payload object it is given and encodes what it holds at the time, which the
    # key service relies on to zero key answers in place on a wipe (ObservableResource, here, holds
    # an observation's first answer for as long as the observation lives).
    "aiocoap.message": "4d5c24d05fd455976790d5cb8768cfc9929f4e8b2ccda81311086f34f44bee3d",
    # ... and ObservableResource._render_to_pipe, which the key service's resources call for a
    # request with Observe (they render any other request themselves, as Resource._render_to_pipe
    # does without block-wise assembly).
    "aiocoap.interfaces": "d0b70787c469686b2b05ad7c950a4dc0189e9cbc81392a8487dbcfce008d284c",
}

#: tinydtls's DTLS_PSK_MAX_KEY_LEN in our patched build (upstream: 16): room for the 32-octet Ks_NAF.
MAX_PSK_LENGTH = 64
#: tinydtls's DTLS_PSK_MAX_CLIENT_IDENTITY_LEN in our patched build (upstream: 32): room for a B-TID.
MAX_IDENTITY_LENGTH = 128

_checked = False


def check_psk(psk: bytes) -> bytes:
    """Return ``psk`` if our tinydtls can hold it; raise ValueError otherwise.

    Upstream DTLSSocket 0.2.3 copies the PSK into tinydtls's buffer without a length check; our
    patched build (``patches/dtlssocket-0.2.3-gba-psk.patch``) checks it in C, and this refuses such
    a key before it reaches C at all.
    """
    if not isinstance(psk, bytes) or not 1 <= len(psk) <= MAX_PSK_LENGTH:
        length = len(psk) if isinstance(psk, bytes) else "?"
        raise ValueError(f"a DTLS PSK must be 1 to {MAX_PSK_LENGTH} octets with our tinydtls, got {length}")
    return psk


def installed_version(distribution: str, package: str) -> str | None:
    """The version pip recorded for ``distribution``, whose import package is ``package``: the
    ``Version:`` of the ``<name>-<version>.dist-info`` beside the package (PEP 376 and 427).

    This is what ``importlib.metadata.version`` answers for a wheel installed there; that module
    would stay in the daemon for good, with the ~0.8 MB of modules it imports, for one lookup.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    wanted = _normalised(distribution)
    for info in Path(spec.origin).parent.parent.glob("*.dist-info"):
        name, _, _ = info.name.removesuffix(".dist-info").partition("-")
        if _normalised(name) != wanted:
            continue
        for line in (info / "METADATA").read_text(encoding="utf-8").splitlines():
            if not line:
                break  # the end of the headers
            header, _, value = line.partition(":")
            if header == "Version":
                return value.strip()
    return None


def _normalised(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_upstream() -> None:
    """Raise :class:`DtlsFixMismatch` unless the upstream code is exactly what our transports expect."""
    versions = {
        "aiocoap": (aiocoap.meta.version, UPSTREAM_AIOCOAP),
        "DTLSSocket": (installed_version("DTLSSocket", "DTLSSocket"), PATCHED_DTLSSOCKET),
    }
    for name, (found, expected) in versions.items():
        if found == UPSTREAM_DTLSSOCKET and name == "DTLSSocket":
            raise DtlsFixMismatch(
                f"the unpatched DTLSSocket {found} is installed: its buffers are too small for GBA keys;"
                " install the patched build (./dev setup builds it with patches/dtlssocket-0.2.3-gba-psk.patch)"
            )
        if found != expected:
            raise DtlsFixMismatch(
                f"mn_secd.dtls was written for {name} {expected}, found {found}: "
                "re-check the transports against the new upstream code before changing the pin"
            )
    for module, expected_hash in UPSTREAM_SOURCES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise DtlsFixMismatch(f"cannot find the source of {module}")
        with open(spec.origin, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected_hash:
            raise DtlsFixMismatch(f"{module} ({spec.origin}) differs from aiocoap {UPSTREAM_AIOCOAP}'s")


def ensure_upstream() -> None:
    """:func:`check_upstream` once per process (every mn_secd DTLS context is made after it)."""
    global _checked
    if not _checked:
        check_upstream()
        _checked = True
