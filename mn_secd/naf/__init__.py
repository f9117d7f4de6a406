"""The IN side of GBA: what an IN-CSE (the NAF) embeds to accept DTLS-PSK peers keyed by GBA.

* :mod:`.zn` — Zn client for the BSF's HTTP/JSON interface (TS 29.309 shape);
* :mod:`.cache` — the NAF's key cache by (B-TID, NAF_Id), honouring the key expiry;
* :mod:`.psk` — the PSK lookup as aiocoap server credentials, and the claim of a peer (the
  psk_identity forms themselves are :mod:`mn_secd.psk_identity`, shared with the MN side);
* :mod:`.records` / :mod:`.gate` — fetching a key over Zn before tinydtls asks for it;
* :mod:`.endpoint` — one call to serve an aiocoap site over GBA-keyed DTLS.

Nothing here imports the simulated world.
"""
