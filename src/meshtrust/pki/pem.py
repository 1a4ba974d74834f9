"""Reading a PEM block without a round trip through cryptography's PEM reader.

``csr.load_csr`` reads a PEM request on every bootstrap and renewal.
cryptography's PEM reader costs several times what parsing the DER inside it
does (about 4.6 µs against 0.6 µs for an RSA 2048 request, measured here); a
request in the plain form — one block, base64 lines, nothing around it but
whitespace — is decoded here instead. Anything else is left to cryptography,
so what is refused and how stays the same.
"""

from __future__ import annotations

import binascii
import functools
from collections.abc import Collection


def decode_single(data: bytes, labels: Collection[bytes]) -> bytes | None:
    """The DER inside ``data`` if it is one plain PEM block with one of ``labels``, else None.

    Plain: the block alone with whitespace around it, and nothing between its
    lines but base64 (checked strictly, padding only at the end). None means
    "not in the plain form": the caller hands ``data`` to a full PEM reader,
    which decides whether it is valid at all.
    """
    text = data.strip()
    for label in labels:
        begin, end = _markers(label)
        if text.startswith(begin) and text.endswith(end):
            body = text[len(begin):-len(end)].replace(b"\n", b"")
            if b"\r" in body:
                body = body.replace(b"\r", b"")
            try:
                return binascii.a2b_base64(body, strict_mode=True)
            except binascii.Error:
                return None
    return None


@functools.lru_cache(maxsize=16)
def _markers(label: bytes) -> tuple[bytes, bytes]:
    return b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
