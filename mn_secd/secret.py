"""Secrets held for a long time in memory: in mutable buffers that a wipe really overwrites.

Used for GBA_ME's Ks (:mod:`mn_secd.gba.session`), the NAF keys the keystore caches
(:mod:`mn_secd.gba.keystore`), the encoded key answers CoAP messages hold (:mod:`mn_secd.control.server`)
and the SIM PIN the daemon may enter (:mod:`mn_secd.uicc.pin`); all share this one leaf class.
"""

from __future__ import annotations


class SecretBytes:
    """Key material (or a PIN) in a mutable buffer, so that dropping it can overwrite it.

    Python cannot promise that no copy of a secret survives (``bytes`` handed to ``hmac`` are
    immutable and garbage-collected at leisure), but the long-lived copy, the one that sits in
    memory for the whole key lifetime, is this buffer, and :meth:`wipe` zeroes it in place. The
    repr never shows the value, and the object refuses to be pickled. :meth:`get` hands out a
    short-lived copy; :meth:`lend` the buffer itself, to a holder that needs bytes-like data for as
    long as it holds it (an outgoing CoAP message's payload): :meth:`wipe` empties it there too.
    """

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray) -> None:
        self._buf = bytearray(value)

    def get(self) -> bytes:
        """A short-lived copy for one computation; raises once wiped (a use-after-wipe bug)."""
        if not self._buf:
            raise ValueError("secret was wiped")
        return bytes(self._buf)

    def lend(self) -> bytearray:
        """The buffer itself (not a copy), for a holder that must keep bytes-like data; empty once wiped.

        Whoever takes it must not resize it or take a view of it (a wipe that cannot clear the
        buffer raises ``BufferError``), and must not copy it into ``bytes`` it keeps.
        """
        return self._buf

    def wipe(self) -> None:
        """Overwrite the buffer in place (an equal-length slice assignment copies into it), then empty it."""
        self._buf[:] = bytes(len(self._buf))
        self._buf.clear()

    @property
    def wiped(self) -> bool:
        return not self._buf

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return "SecretBytes(<wiped>)" if self.wiped else f"SecretBytes(<{len(self._buf)} octets>)"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("secrets are not picklable")
