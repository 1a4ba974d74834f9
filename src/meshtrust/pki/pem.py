"""Reading a PEM block without a round trip through cryptography's PEM reader.

``csr.load_csr`` reads a PEM request on every bootstrap and renewal.
cryptography's PEM reader costs several times what parsing the DER inside it
does (see docs/benchmarks.md, "Issuance"); a request in the plain form —
one block, base64 lines, nothing around it but whitespace — is decoded here
instead. Anything else is left to cryptography, so what is refused and how
stays the same.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Collection

# Padding only at the end: with that, the lenient base64 decoder (which skips the line
# breaks) reads exactly what a strict one reads from the lines joined.
_BLOCK = re.compile(
    rb"\A\s*-----BEGIN ([A-Z0-9 ]+)-----\r?\n([A-Za-z0-9+/\r\n]+={0,2})\r?\n"
    rb"-----END \1-----\s*\Z")


def decode_single(data: bytes, labels: Collection[bytes]) -> bytes | None:
    """The DER inside ``data`` if it is one plain PEM block with one of ``labels``, else None.

    None means "not in the plain form": the caller hands ``data`` to a full PEM
    reader, which decides whether it is valid at all.
    """
    match = _BLOCK.match(data)
    if match is None or match.group(1) not in labels:
        return None
    try:
        return binascii.a2b_base64(match.group(2))
    except binascii.Error:
        return None
