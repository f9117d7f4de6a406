"""The NAF's key cache: Zn answers by (B-TID, NAF_Id), each until the expiry the BSF gave it.

A NAF asks Zn once per B-TID and then serves every further handshake of that UE from here, which
TS 33.220 allows until the key expires. The cache is sans-IO: the caller passes the time, so tests
can step past an expiry without sleeping. It is bounded (least recently used entries go first), so
a stream of valid B-TIDs cannot grow it without limit; when it is full, expired keys go first.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from mn_secd.naf.zn import ZnAnswer


class NafKeyCache:
    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("the cache needs room for at least one key")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], ZnAnswer] = OrderedDict()

    def put(self, answer: ZnAnswer, now: datetime) -> bool:
        """Keep ``answer`` until its expiry; False (and nothing kept) if it has already expired."""
        if answer.expires <= now:
            return False
        key = (answer.btid, answer.naf_id)
        self._entries[key] = answer
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._purge(now)  # expired keys go before live ones
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, btid: str, naf_id: bytes, now: datetime) -> ZnAnswer | None:
        """The live answer for (B-TID, NAF_Id), or None; an expired one is dropped on the way."""
        key = (btid, naf_id)
        answer = self._entries.get(key)
        if answer is None:
            return None
        if answer.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    def _purge(self, now: datetime) -> None:
        for key in [k for k, a in self._entries.items() if a.expires <= now]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
