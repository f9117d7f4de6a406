"""Copies of keys among the live objects of this process: what a memory scan of the daemon would find.

Walks every object the garbage collector tracks (containers: dicts, lists, instances, frames,
futures, ...) and, recursively, the objects it does not track that they refer to: ``bytes`` and
``str`` are never tracked, and neither are tuples and dicts holding only such atoms (CPython stops
tracking those), so a key in a tuple in a dict is found through them. It reports every object
holding a key in any form the daemon could have put it in: raw octets, lowercase or uppercase hex
(JSON answers, AT+CSIM lines), base64.
Unreachable cycles are collected first, so what is counted is live. Memory that was freed is not
an object any more and is out of reach of this (and of any) Python-level scan.

Keys are passed masked (XOR with :data:`MASK`) so that the caller's own copies are never among the
findings; the needles this module builds are excluded by identity.
"""

from __future__ import annotations

import base64
import gc
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

MASK = 0x5A


def mask(key: bytes) -> bytes:
    """A key as a test may hold it without being found: each octet XOR :data:`MASK`."""
    return bytes(b ^ MASK for b in key)


@dataclass
class Findings:
    """Objects holding a key, by type name; ``holders`` says what refers to each (for a failing test)."""

    count: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    holders: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in self.by_type.most_common())
        return f"{self.count} live objects hold a key ({kinds or 'none'})" + "".join(
            f"\n  {h}" for h in self.holders[:30]
        )


def find_copies(masked_keys: Iterable[bytes], *, explain: bool = False) -> Findings:
    """Every live object holding one of the keys (given masked); ``explain`` names their referrers."""
    raw = [mask(k) for k in masked_keys]
    needles_bytes = [*raw, *(k.hex().encode() for k in raw), *(k.hex().upper().encode() for k in raw)]
    needles_str = [
        *(k.hex() for k in raw),
        *(k.hex().upper() for k in raw),
        *(base64.b64encode(k).decode() for k in raw),
        *(base64.b64encode(k).decode().rstrip("=") for k in raw),
    ]
    own = {id(o) for o in (raw, needles_bytes, needles_str, *raw, *needles_bytes, *needles_str)}
    shortest = min((len(n) for n in [*needles_bytes, *needles_str]), default=0)
    gc.collect()
    found: dict[int, object] = {}
    seen: set[int] = set()
    container: dict[int, object] = {}  # found object -> the tracked object it was reached from

    def check(obj: object, via: object = None) -> None:
        ident = id(obj)
        if ident in seen or ident in own:
            return
        seen.add(ident)
        hit = False
        if isinstance(obj, (bytes, bytearray)):
            hit = len(obj) >= shortest and any(n in obj for n in needles_bytes)
        elif isinstance(obj, memoryview):
            try:
                data = obj.tobytes()
            except ValueError:  # released
                return
            hit = any(n in data for n in needles_bytes)
        elif isinstance(obj, str):
            hit = len(obj) >= shortest and any(n in obj for n in needles_str)
        if hit:
            found[ident] = obj
            container[ident] = via

    objects = gc.get_objects()
    for obj in objects:
        check(obj)
        pending = [r for r in gc.get_referents(obj) if not gc.is_tracked(r)]
        while pending:
            untracked = pending.pop()
            if id(untracked) in seen:
                continue
            check(untracked, obj)
            if isinstance(untracked, (tuple, dict, frozenset)):
                pending.extend(r for r in gc.get_referents(untracked) if not gc.is_tracked(r))
    findings = Findings(count=len(found), by_type=Counter(type(o).__name__ for o in found.values()))
    if explain:
        for ident, obj in found.items():
            via = container[ident]
            chain = [type(via).__name__] if via is not None else []
            if via is not None:
                chain += [
                    type(r).__name__ + (f"[{r.__qualname__}]" if hasattr(r, "__qualname__") else "")
                    for r in gc.get_referrers(via)
                    if r is not objects and r is not found
                ][:4]
            shown = repr(obj[:24]) if isinstance(obj, (bytes, str)) else type(obj).__name__
            findings.holders.append(f"{type(obj).__name__}({len(obj)}) {shown} <- {' <- '.join(chain) or '?'}")  # type: ignore[arg-type]
    del objects
    return findings
