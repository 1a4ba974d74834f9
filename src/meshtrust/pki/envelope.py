"""Sealed files: AES-256-GCM under a passphrase or a 32-byte key, in one small envelope.

Backups of the management store hold every CA key in the clear inside; this
module is what keeps them unreadable outside. A sealed file is two text lines
and the ciphertext::

    meshtrust-sealed\\n                                          magic
    {"cipher":"AES-256-GCM","format":1,"kdf":{...},"nonce":"…"}\\n   header (canonical JSON)
    <ciphertext><16-byte GCM tag>

The header's ``kdf`` is ``{"name":"scrypt","n":…,"r":…,"p":…,"salt":"<base64>"}``
for a passphrase, or ``{"name":"none"}`` for a key used as it is. Both lines,
byte for byte, are the GCM associated data, so changing any byte of the file
— magic, parameters, salt, nonce, ciphertext or tag — makes it fail to open.
Every failure to open raises the one ``CannotOpen``: a wrong passphrase and a
damaged file are indistinguishable by design. Scrypt parameters read from a
file are bounded before any work is done, so a forged header cannot make the
reader allocate gigabytes.

Pure functions only: bytes in, bytes out. Reading the passphrase or key from
a file, and writing the sealed file, is the caller's business.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt as _Scrypt

from meshtrust import errors

MAGIC = b"meshtrust-sealed\n"
FORMAT = 1
CIPHER = "AES-256-GCM"
KEY_SIZE = 32
NONCE_SIZE = 12
SALT_SIZE = 16
TAG_SIZE = 16
MAX_HEADER = 1024
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024  # 128 · n · r bytes; the default needs 128 MiB
DAMAGED = "wrong passphrase or damaged backup file"


class CannotOpen(errors.PKIError):
    """A sealed file does not open: the wrong passphrase or key, or a damaged file."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scrypt:
    """Scrypt cost parameters; the defaults take about 0.3 s and 128 MiB."""

    n: int = 2**17
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "r", "p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"scrypt {name} must be an integer, got {value!r}")
        if self.n < 2**14 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two of at least 2**14, got {self.n}")
        if not 1 <= self.r <= 32 or not 1 <= self.p <= 4:
            raise ValueError(f"scrypt r must be 1..32 and p 1..4, got r={self.r} p={self.p}")
        if 128 * self.n * self.r > MAX_SCRYPT_MEMORY:
            raise ValueError(f"scrypt n={self.n} r={self.r} needs more than "
                             f"{MAX_SCRYPT_MEMORY >> 20} MiB")


@dataclasses.dataclass(frozen=True)
class Passphrase:
    """A passphrase, as bytes; never shown by ``repr``."""

    value: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes) or not self.value:
            raise ValueError("a passphrase is non-empty bytes")


@dataclasses.dataclass(frozen=True)
class Key:
    """A 32-byte AES-256 key used as it is; never shown by ``repr``."""

    value: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes) or len(self.value) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
    """What the first two lines of a sealed file say; ``scrypt`` is None for a key."""

    format: int
    scrypt: Scrypt | None
    salt: bytes
    nonce: bytes

    @property
    def sealed_with(self) -> str:
        return "a key file" if self.scrypt is None else "a passphrase"


def load_passphrase(data: bytes, what: str = "the passphrase file") -> Passphrase:
    """The passphrase a file holds: its bytes less one trailing newline; refuse empty."""
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise errors.ConfigError(f"{what} is empty; put a passphrase in it")
    return Passphrase(data)


def load_key(data: bytes, what: str = "the key file") -> Key:
    """A key file's 32 bytes: raw, or base64 on one line (``openssl rand -base64 32``)."""
    if len(data) == KEY_SIZE:
        return Key(data)
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != KEY_SIZE:
        raise errors.ConfigError(
            f"{what} must hold {KEY_SIZE} random bytes, raw or base64; make one with "
            f"`openssl rand -base64 {KEY_SIZE}`")
    return Key(decoded)


def new_key() -> Key:
    return Key(secrets.token_bytes(KEY_SIZE))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(secret: Passphrase | Key, header: Header) -> bytes:
    if isinstance(secret, Key):
        return secret.value
    assert header.scrypt is not None
    kdf = _Scrypt(salt=header.salt, length=KEY_SIZE, n=header.scrypt.n, r=header.scrypt.r,
                  p=header.scrypt.p)
    return kdf.derive(secret.value)


def _dump_header(header: Header) -> bytes:
    kdf: dict[str, Any] = {"name": "none"}
    if header.scrypt is not None:
        kdf = {"name": "scrypt", "n": header.scrypt.n, "r": header.scrypt.r,
               "p": header.scrypt.p, "salt": _b64(header.salt)}
    document = {"format": header.format, "cipher": CIPHER, "kdf": kdf,
                "nonce": _b64(header.nonce)}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"


def seal(plaintext: bytes, secret: Passphrase | Key, *, scrypt: Scrypt | None = None,
         salt: bytes | None = None, nonce: bytes | None = None) -> bytes:
    """``plaintext`` encrypted and authenticated under ``secret``, as a sealed file.

    A fresh random salt and nonce are drawn unless given (tests give them).
    """
    if not isinstance(secret, (Passphrase, Key)):
        raise TypeError(f"seal takes a Passphrase or a Key, got {type(secret).__name__}")
    salt = secrets.token_bytes(SALT_SIZE) if salt is None else salt
    nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
    if len(salt) != SALT_SIZE or len(nonce) != NONCE_SIZE:
        raise ValueError(f"salt is {SALT_SIZE} bytes and nonce {NONCE_SIZE}")
    header = Header(format=FORMAT, nonce=nonce,
                    scrypt=(scrypt or Scrypt()) if isinstance(secret, Passphrase) else None,
                    salt=salt if isinstance(secret, Passphrase) else b"")
    associated = MAGIC + _dump_header(header)
    return associated + AESGCM(_derive(secret, header)).encrypt(nonce, plaintext, associated)


def load_header(sealed: bytes) -> tuple[Header, int]:
    """The header of a sealed file and where its ciphertext starts; ``CannotOpen`` if unreadable.

    The header is not authenticated until ``unseal`` succeeds: use it only to
    choose how to ask for the secret.
    """
    if not sealed.startswith(MAGIC):
        raise CannotOpen(f"{DAMAGED}: it does not start as a meshtrust sealed file does")
    end = sealed.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise CannotOpen(f"{DAMAGED}: its header is cut off or unreadable")
    try:
        header = _parse_header(json.loads(sealed[len(MAGIC):end]))
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError) as exc:
        raise CannotOpen(f"{DAMAGED}: its header is unreadable") from exc
    return header, end + 1


def _parse_header(document: Any) -> Header:
    if not isinstance(document, dict) or set(document) != {"format", "cipher", "kdf", "nonce"}:
        raise ValueError("unexpected header fields")
    if document["format"] != FORMAT or document["cipher"] != CIPHER:
        raise ValueError("unknown format or cipher")
    nonce = base64.b64decode(document["nonce"], validate=True)
    kdf = document["kdf"]
    if not isinstance(kdf, dict) or len(nonce) != NONCE_SIZE:
        raise ValueError("bad kdf or nonce")
    if kdf == {"name": "none"}:
        return Header(format=FORMAT, scrypt=None, salt=b"", nonce=nonce)
    if kdf.get("name") != "scrypt" or set(kdf) != {"name", "n", "r", "p", "salt"}:
        raise ValueError("unknown kdf")
    salt = base64.b64decode(kdf["salt"], validate=True)
    if len(salt) != SALT_SIZE:
        raise ValueError("bad salt")
    return Header(format=FORMAT, scrypt=Scrypt(n=kdf["n"], r=kdf["r"], p=kdf["p"]),
                  salt=salt, nonce=nonce)


def unseal(sealed: bytes, secret: Passphrase | Key) -> bytes:
    """The plaintext of a sealed file; ``CannotOpen`` for a wrong secret or any damage."""
    if not isinstance(secret, (Passphrase, Key)):
        raise TypeError(f"unseal takes a Passphrase or a Key, got {type(secret).__name__}")
    header, start = load_header(sealed)
    if isinstance(secret, Key) != (header.scrypt is None):
        raise CannotOpen(f"{DAMAGED}: it was sealed with {header.sealed_with}, "
                         "or its header is damaged")
    if len(sealed) - start < TAG_SIZE:
        raise CannotOpen(f"{DAMAGED}: it is cut off")
    try:
        return AESGCM(_derive(secret, header)).decrypt(header.nonce, sealed[start:],
                                                       sealed[:start])
    except InvalidTag:
        raise CannotOpen(DAMAGED) from None
