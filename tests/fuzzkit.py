"""What the fuzz suites in ``tests/fuzz`` share: settings, examples, mutations, oracles.

Settings. ``FUZZ`` is the Hypothesis profile every fuzz test runs with:
``ci`` (the default: 10,000 examples per target, derandomized so a failure
reproduces, no example database) or ``long`` (``MESHTRUST_FUZZ=long``: a
million examples, a new seed each run; ``make fuzz``). ``MESHTRUST_FUZZ_EXAMPLES``
overrides the count of either.

Examples. Each example is one ``st.binary`` draw that a ``Picker`` reads its
choices from, as libFuzzer's FuzzedDataProvider does: Hypothesis makes bytes
far faster than structured values, and shrinking the bytes shrinks every
choice towards the first and plainest.

Mutations. ``mutate`` damages a valid input (a seed) by a short "program" of
bytes, read four at a time as operations: bit flips, byte edits, truncation,
insertion, deletion, splices with another seed, and DER-aware edits (a TLV's
length field, its tag, its content, or the element itself duplicated, dropped
or grafted from another seed, with the enclosing lengths fixed up so the
parser gets past them). ``mutate_document`` does the same to YAML and JSON
trees: values replaced by ones of every wrong type and range, keys dropped,
added or renamed.

Properties. ``refusal`` checks an exception is a meshtrust domain error with a
message; ``watchdog`` fails an example that runs far past any reasonable time
(Hypothesis's own deadline catches the slow ones); ``check_relay_client`` and
``check_istio_intermediate`` say whether a certificate is exactly what its
profile allows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import os
import random
import signal
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from meshtrust import errors
from meshtrust.authority import audit, registry, relay_pki
from meshtrust.pki import issuer, keys

T = TypeVar("T")
PROFILE_ENV = "MESHTRUST_FUZZ"
EXAMPLES_ENV = "MESHTRUST_FUZZ_EXAMPLES"
CI_EXAMPLES = 10_000
LONG_EXAMPLES = 1_000_000
HANG_SECONDS = 20.0

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]


def _examples(default: int) -> int:
    text = os.environ.get(EXAMPLES_ENV, "")
    return int(text) if text.strip() else default


settings.register_profile(
    "ci", max_examples=_examples(CI_EXAMPLES), derandomize=True, database=None,
    deadline=dt.timedelta(seconds=2), suppress_health_check=_QUIET, print_blob=True)
settings.register_profile(
    "long", max_examples=_examples(LONG_EXAMPLES), derandomize=False, database=None,
    deadline=dt.timedelta(seconds=2), suppress_health_check=_QUIET, print_blob=True)

PROFILE = os.environ.get(PROFILE_ENV, "ci") or "ci"
FUZZ = settings.get_profile(PROFILE)


def scaled(count: int) -> settings:
    """``FUZZ`` with ``count`` examples in CI, or the same share of a longer run."""
    share = max(1, FUZZ.max_examples * count // CI_EXAMPLES)
    return settings(FUZZ, max_examples=share)


class Loop:
    """Runs each example's coroutine on one event loop.

    ``asyncio.Runner.run`` also installs and removes a SIGINT handler on every
    call, which costs more than a small example.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)


# -- properties --------------------------------------------------------------------------------


class Hang(Exception):
    """An example ran past ``HANG_SECONDS``."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail the example with ``Hang`` if its body runs longer than ``seconds``."""
    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"an example ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refusal(exc: BaseException) -> errors.MeshTrustError:
    """``exc`` if it is a domain error with a message; an AssertionError otherwise."""
    assert isinstance(exc, errors.MeshTrustError), f"not a domain error: {exc!r}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"
    return exc


@dataclasses.dataclass
class Tally:
    """How many examples ended which way, so a test can require its deep paths were reached."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def __getitem__(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))


# -- examples ---------------------------------------------------------------------------------

_INT64S = (0, 1, -1, 2**31, 2**32, 1_780_000_000, 253402300800, -62135596801, 2**63 - 1, -2**63)
# Where text characters come from: printable ASCII most often, then the rest of Unicode.
_TEXT_RANGES = ((0x20, 0x7E),) * 8 + ((0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0xFF), (0x100, 0x7FF),
                                      (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF),
                                      (0x2028, 0x202E))


class Picker:
    """Reads an example's choices from its bytes, as libFuzzer's FuzzedDataProvider does.

    Every fuzz example is one ``st.binary`` draw, the cheapest thing Hypothesis
    makes (a structured strategy of a dozen draws costs several times more than
    the code it tests). When the bytes run out every choice reads as zero, the
    first and plainest; so Hypothesis, shrinking the bytes, shrinks each choice.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, count: int) -> bytes:
        chunk = self._data[self._at:self._at + count]
        self._at += count
        return chunk.ljust(count, b"\x00")

    def integer(self, low: int, high: int) -> int:
        span = high - low
        if span <= 0:
            return low
        return low + int.from_bytes(self.take((span.bit_length() + 7) // 8), "big") % (span + 1)

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.integer(0, len(items) - 1)]

    def flag(self) -> bool:
        return self.integer(0, 1) == 1

    def bytes(self, max_size: int) -> bytes:
        return self.take(self.integer(0, max_size))

    def text(self, max_size: int = 40) -> str:
        characters = []
        for _ in range(self.integer(0, max_size)):
            low, high = self.choice(_TEXT_RANGES)
            code = self.integer(low, high)
            characters.append(chr(code if not 0xD800 <= code <= 0xDFFF else 0xFFFD))
        return "".join(characters)

    def int64(self) -> int:
        if self.flag():
            return int.from_bytes(self.take(8), "big", signed=True)
        return int(self.choice(_INT64S))

    def program(self, max_ops: int = 4) -> bytes:
        """A mutation program (see ``mutate``) of one to ``max_ops`` operations."""
        return self.take(4 * self.integer(1, max_ops))

    def mutated(self, seeds: Sequence[bytes], max_ops: int = 4, *,
                structured: bool = True) -> bytes:
        return mutate(self.choice(seeds), self.program(max_ops), seeds, structured=structured)


def examples(min_size: int = 32, max_size: int = 256) -> st.SearchStrategy[bytes]:
    """The bytes a ``Picker`` reads one example from."""
    return st.binary(min_size=min_size, max_size=max_size)


# -- DER --------------------------------------------------------------------------------------


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


@dataclasses.dataclass
class Node:
    """One DER element: a primitive ``content``, or ``children`` (``lead`` is a BIT
    STRING's unused-bits byte before the DER it wraps)."""

    tag: int
    content: bytes = b""
    children: list[Node] | None = None
    lead: bytes = b""

    def dump(self) -> bytes:
        if self.children is None:
            return tlv(self.tag, self.content)
        return tlv(self.tag, self.lead + b"".join(c.dump() for c in self.children))

    def walk(self) -> Iterator[tuple[Node, Node | None]]:
        """Every node below and including this one, with its parent, depth first."""
        stack: list[tuple[Node, Node | None]] = [(self, None)]
        while stack:
            node, parent = stack.pop()
            yield node, parent
            for child in reversed(node.children or []):
                stack.append((child, node))

    def copy(self) -> Node:
        return Node(self.tag, self.content,
                    None if self.children is None else [c.copy() for c in self.children],
                    self.lead)


def _elements(data: bytes, depth: int) -> list[Node] | None:
    """``data`` as a sequence of DER elements, or None if it is not exactly that."""
    found, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data) or data[pos] & 0x1F == 0x1F:
            return None
        tag, first = data[pos], data[pos + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 3 or pos + 2 + count > len(data):
                return None
            length, head = int.from_bytes(data[pos + 2:pos + 2 + count], "big"), 2 + count
        end = pos + head + length
        if end > len(data):
            return None
        found.append(_node(tag, data[pos + head:end], depth))
        pos = end
    return found


def _node(tag: int, content: bytes, depth: int) -> Node:
    if depth < 24:
        if tag & 0x20:
            inner = _elements(content, depth + 1)
            if inner is not None:
                return Node(tag, children=inner)
        elif tag == 0x04 and content[:1] in (b"\x30", b"\x31", b"\x03", b"\x04", b"\x02"):
            inner = _elements(content, depth + 1)  # an extension's value wraps DER
            if inner:
                return Node(tag, children=inner)
        elif tag == 0x03 and content[:2] in (b"\x00\x30", b"\x00\x03"):
            inner = _elements(content[1:], depth + 1)
            if inner:
                return Node(tag, children=inner, lead=content[:1])
    return Node(tag, content)


def parse_der(data: bytes) -> Node | None:
    """One DER element as a tree, or None if ``data`` is not exactly one element."""
    found = _elements(data, 0)
    return found[0] if found and len(found) == 1 else None


# -- mutation ---------------------------------------------------------------------------------

_INTERESTING_INTEGERS = (b"\x00", b"\x80", b"\xff", b"\x00\x00", b"\x7f" + b"\xff" * 40,
                         b"\x01\x00\x00\x00\x00", b"")
_INTERESTING_STRINGS = (b"", b"\x00", b"\xff\xfe", b"c1\x00evil", b"*", b"*.", b"a" * 300,
                        b"\xc0\x80", "\u202e\u00e9".encode(), b"%", b"\xed\xa0\x80")


def _pick(items: Sequence[Any], value: int) -> Any:
    return items[value % len(items)]


def _tree_op(tree: Node, op: int, where: int, value: int, pool: Sequence[Node]) -> None:
    """Edit ``tree`` in place; lengths are recomputed when it is dumped."""
    nodes = list(tree.walk())
    node, parent = nodes[where % len(nodes)]
    kind = op % 8
    if kind == 0:  # damage the content
        if node.children is None:
            content = node.content
            if value % 4 == 0:
                node.content = content[:value % (len(content) + 1)]
            elif value % 4 == 1:
                node.content = content + bytes([value]) * (1 + value % 7)
            elif content:
                index = value % len(content)
                node.content = content[:index] + bytes([content[index] ^ (1 << (value % 8))]) \
                    + content[index + 1:]
            else:
                node.content = bytes([value])
        else:
            node.children = node.children[:value % (len(node.children) + 1)]
    elif kind == 1 and parent is not None and parent.children is not None:  # duplicate
        index = next(i for i, c in enumerate(parent.children) if c is node)
        parent.children.insert(index, node.copy())
    elif kind == 2 and parent is not None and parent.children is not None:  # drop
        parent.children = [c for c in parent.children if c is not node]
    elif kind == 3 and parent is not None and parent.children is not None:  # swap
        children = parent.children
        index = next(i for i, c in enumerate(children) if c is node)
        other = value % len(children)
        children[index], children[other] = children[other], children[index]
    elif kind == 4:  # retag
        node.tag = value
    elif kind == 5 and pool:  # graft an element of another seed here
        donors = list(_pick(pool, value).walk())
        donor = donors[(value * 7 + where) % len(donors)][0].copy()
        node.tag, node.content, node.children, node.lead = (
            donor.tag, donor.content, donor.children, donor.lead)
    elif kind == 6:  # an edge-case value of the node's type
        table = _INTERESTING_INTEGERS if node.tag == 0x02 else _INTERESTING_STRINGS
        node.children, node.lead, node.content = None, b"", _pick(table, value)
    elif kind == 7 and node.children is not None:  # turn a constructed node primitive
        node.content = node.dump()[2:]
        node.children = None


def _headers(data: bytes) -> list[tuple[int, int, int]]:
    """(start, header size, content size) of every TLV header found walking ``data``."""
    spans: list[tuple[int, int, int]] = []

    def walk(start: int, end: int, depth: int) -> None:
        pos = start
        while pos + 2 <= end and len(spans) < 1024:
            tag, first = data[pos], data[pos + 1]
            if first < 0x80:
                length, head = first, 2
            else:
                count = first & 0x7F
                if not 1 <= count <= 3 or pos + 2 + count > end:
                    return
                length, head = int.from_bytes(data[pos + 2:pos + 2 + count], "big"), 2 + count
            if pos + head + length > end:
                return
            spans.append((pos, head, length))
            if depth < 24 and (tag & 0x20 or tag == 0x04):
                walk(pos + head, pos + head + length, depth + 1)
            elif depth < 24 and tag == 0x03 and length > 1 and data[pos + head] == 0:
                walk(pos + head + 1, pos + head + length, depth + 1)
            pos += head + length

    walk(0, len(data), 0)
    return spans


def _length_edit(data: bytes, where: int, value: int) -> bytes:
    """Rewrite the length field of the ``where``-th TLV header found in ``data``."""
    spans = _headers(data)
    if not spans:
        return data
    start, head, length = spans[where % len(spans)]
    choice = value % 8
    if choice == 0:
        field = der_length(length + 1 + value // 8 % 4)
    elif choice == 1:
        field = der_length(max(length - 1 - value // 8 % 4, 0))
    elif choice == 2:
        field = b"\x00"
    elif choice == 3:
        field = b"\x80"  # the indefinite form, which DER forbids
    elif choice == 4:
        field = b"\x84\xff\xff\xff\xff"
    elif choice == 5:
        field = b"\x82" + length.to_bytes(2, "big") if length < 65536 else b"\x82\xff\xff"
    elif choice == 6:
        field = b"\x81" + bytes([length % 256])  # the long form where the short one fits
    else:
        field = bytes([0x80 | (value >> 3) % 16])
    return data[:start + 1] + field + data[start + head:]


def _raw_op(data: bytes, op: int, where: int, value: int, pool: Sequence[bytes]) -> bytes:
    size = len(data)
    at = where % (size + 1)
    kind = op % 8
    if kind == 0 and size:  # flip one bit
        at %= size
        return data[:at] + bytes([data[at] ^ (1 << (value % 8))]) + data[at + 1:]
    if kind == 1 and size:  # set one byte
        at %= size
        return data[:at] + bytes([value]) + data[at + 1:]
    if kind == 2:  # truncate
        return data[:at]
    if kind == 3:  # delete a run
        return data[:at] + data[at + 1 + value % 32:]
    if kind == 4:  # insert a run
        return data[:at] + bytes([value]) * (1 + value % 8) + data[at:]
    if kind == 5 and pool:  # splice: this one's head, another's tail
        other = _pick(pool, value)
        return data[:at] + other[where % (len(other) + 1):]
    if kind == 6:
        return _length_edit(data, where, value)
    if kind == 7 and size:  # duplicate a run
        at %= size
        return data[:at] + data[at:at + 1 + value % 64] + data[at:]
    return data


@functools.lru_cache(maxsize=512)
def _seed_tree(data: bytes) -> Node | None:
    """``parse_der`` of a seed, parsed once; copy it before changing it."""
    return parse_der(data)


def mutate(seed: bytes, program: bytes, pool: Sequence[bytes] = (), *,
           structured: bool = True) -> bytes:
    """``seed`` edited by each four-byte operation of ``program``.

    Operations whose first byte is odd edit the DER tree (when the data is DER
    and ``structured``), even ones edit raw bytes.
    """
    data = seed
    tree: Node | None = None
    parsed = False  # whether ``tree`` is ``data`` parsed
    donors: list[Node] | None = None
    program = program or b"\x00"
    for index in range(0, len(program), 4):
        chunk = program[index:index + 4].ljust(4, b"\x00")
        op, where, value = chunk[0], int.from_bytes(chunk[1:3], "big"), chunk[3]
        if op & 1 and structured:
            if not parsed:
                found = _seed_tree(data) if data is seed else parse_der(data)
                tree, parsed = (found.copy() if found is not None else None), True
            if tree is not None:
                if donors is None:
                    donors = [t for t in map(_seed_tree, pool) if t is not None]
                _tree_op(tree, op >> 1, where, value, donors)
                data = tree.dump()
                continue
        data = _raw_op(data, op >> 1, where, value, pool)
        tree, parsed = None, False
    return data


def pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {label}-----\n".encode() + b"\n".join(lines)
            + f"\n-----END {label}-----\n".encode())


# -- documents (YAML and JSON trees) ------------------------------------------------------------


def _places(document: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value in a tree of dicts and lists, depth first."""
    found: list[tuple[Any, Any]] = []
    stack = [document]
    while stack and len(found) < 512:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, value in items:
            found.append((node, key))
            if isinstance(value, (dict, list)):
                stack.append(value)
    return found


def mutate_document(seed: Any, program: bytes, pool: Sequence[Any], *,
                    keys: Sequence[Any], values: Sequence[Any]) -> Any:
    """A copy of the tree ``seed`` edited by each four-byte operation of ``program``:
    a value replaced (by one of ``values`` or a part of another seed), a key dropped,
    added or renamed (to one of ``keys``), a value wrapped in a list."""
    document = copy.deepcopy(seed)
    program = program or b"\x00"
    for index in range(0, len(program), 4):
        chunk = program[index:index + 4].ljust(4, b"\x00")
        op, where, value = chunk[0] % 6, int.from_bytes(chunk[1:3], "big"), chunk[3]
        places = _places(document)
        if not places:
            return copy.deepcopy(_pick(values, value))
        node, key = places[where % len(places)]
        if op == 0:
            node[key] = copy.deepcopy(_pick(values, value))
        elif op == 1:
            del node[key]
        elif op == 2:
            target = node if isinstance(node, dict) else node[key]
            if isinstance(target, dict):
                target[_pick(keys, value)] = copy.deepcopy(_pick(values, where))
            elif isinstance(target, list):
                target.append(copy.deepcopy(_pick(values, where)))
        elif op == 3:
            donors = _places(_pick(pool, value))
            if donors:
                donor, donor_key = donors[(where + value) % len(donors)]
                node[key] = copy.deepcopy(donor[donor_key])
        elif op == 4 and isinstance(node, dict):
            node[_pick(keys, value)] = node.pop(key)
        elif op == 5:
            node[key] = [node[key]] if value % 2 else {_pick(keys, value): node[key]}
    return document


# -- keys and CSRs -----------------------------------------------------------------------------


ACCEPTED_KEYS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-2048-e3")
REFUSED_KEYS = ("rsa-1024", "ec-p521", "ec-k256", "ed25519", "ed448")
_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1, "ec-p521": ec.SECP521R1,
    "ec-k256": ec.SECP256K1}
_SMALL_PRIMES = tuple(n for n in range(3, 2000, 2) if all(n % d for d in range(3, int(n**0.5) + 1,
                                                                                2)))


def _probably_prime(n: int, chooser: random.Random) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    odd, twos = n - 1, 0
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    for _ in range(24):  # Miller-Rabin
        x = pow(chooser.randrange(2, n - 2), odd, n)
        if x in (1, n - 1):
            continue
        for _ in range(twos - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _rsa_key(bits: int, exponent: int, chooser: random.Random) -> rsa.RSAPrivateKey:
    """An RSA key made from primes ``chooser`` finds: the same key for the same chooser."""
    def prime() -> int:
        while True:
            candidate = chooser.getrandbits(bits // 2) | 3 << (bits // 2 - 2) | 1
            if candidate % exponent != 1 and _probably_prime(candidate, chooser):
                return candidate
    p, q = prime(), prime()
    d = pow(exponent, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(
        p=p, q=q, d=d, dmp1=d % (p - 1), dmq1=d % (q - 1), iqmp=pow(q, -1, p),
        public_numbers=rsa.RSAPublicNumbers(exponent, p * q)).private_key()


@functools.cache
def key(name: str) -> Any:
    """The private key named ``kind`` or ``kind#label`` (such as ``ec-p256#3``), the same on
    every run: seeds made with it are the same bytes, so a failure replays exactly."""
    kind = name.split("#")[0]
    seed = hashlib.sha512(name.encode()).digest()
    if kind in _CURVES:
        curve = _CURVES[kind]()
        scalar = int.from_bytes(seed[:(curve.key_size + 7) // 8], "big") >> 1
        return ec.derive_private_key(scalar, curve)
    if kind.startswith("rsa-"):
        bits = int(kind.split("-")[1])
        return _rsa_key(bits, 3 if kind.endswith("-e3") else 65537, random.Random(seed))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed[:32])
    if kind == "ed448":
        return ed448.Ed448PrivateKey.from_private_bytes(seed[:57])
    raise ValueError(f"no key named {name!r}")


def make_keys() -> None:
    """Make every named key now, so that no example pays for it against its deadline."""
    for name in (*ACCEPTED_KEYS, *REFUSED_KEYS):
        key(name)


def sign_hash(private: Any) -> hashes.HashAlgorithm | None:
    if isinstance(private, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def sign_request(builder: x509.CertificateSigningRequestBuilder,
                 private: Any) -> x509.CertificateSigningRequest:
    """``builder`` signed by ``private``; the same bytes every time (deterministic ECDSA)."""
    deterministic = True if isinstance(private, ec.EllipticCurvePrivateKey) else None
    return builder.sign(private, sign_hash(private), ecdsa_deterministic=deterministic)


def sign_raw(private: Any, info: bytes) -> bytes:
    """A CSR of the CertificationRequestInfo ``info`` (DER, any content), signed by ``private``."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
        signature = private.sign(info, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    elif isinstance(private, rsa.RSAPrivateKey):
        algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d01010b")) + b"\x05\x00")
        signature = private.sign(info, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2b6570")))
        signature = private.sign(info)
    else:
        raise TypeError(f"cannot sign with {type(private).__name__}")
    return tlv(0x30, info + algorithm + tlv(0x03, b"\x00" + signature))


class _FixedSecrets:
    """What meshtrust takes from the ``secrets`` module, from one seeded generator."""

    def __init__(self, chooser: random.Random) -> None:
        self._chooser = chooser

    def token_bytes(self, count: int = 32) -> bytes:
        return self._chooser.randbytes(count)

    def token_hex(self, count: int = 32) -> str:
        return self.token_bytes(count).hex()

    def token_urlsafe(self, count: int = 32) -> str:
        return base64.urlsafe_b64encode(self.token_bytes(count)).rstrip(b"=").decode()

    def randbits(self, count: int) -> int:
        return self._chooser.getrandbits(count)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Inside, meshtrust makes the same keys, serial numbers, tokens and signatures each run.

    The fuzz suites build their seeds (a server's state, CSRs, backups) inside it:
    Hypothesis's derandomized examples then meet the same bytes on every run, so a
    failure in CI replays anywhere.
    """
    made = itertools.count(1)
    fixed = _FixedSecrets(random.Random(20260301))

    def generate_key(key_type: keys.KeyType) -> keys.PrivateKey:
        return key(f"{key_type.value.replace('ecdsa-', 'ec-')}#{next(made)}")  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keys, "generate_key", generate_key)
        patch.setattr(issuer, "random_serial", lambda: fixed.randbits(127) | 1)
        for module, attribute in ((registry, "secrets"), (relay_pki, "secrets_module"),
                                  (audit, "secrets")):
            patch.setattr(module, attribute, fixed)
        for builder in (x509.CertificateBuilder, x509.CertificateSigningRequestBuilder):
            patch.setattr(builder, "sign", _deterministic_sign(builder.sign))
        yield


def _deterministic_sign(original: Callable[..., Any]) -> Callable[..., Any]:
    def sign(self: Any, private_key: Any, algorithm: Any, backend: Any = None,
             **options: Any) -> Any:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            options.setdefault("ecdsa_deterministic", True)
        return original(self, private_key, algorithm, backend, **options)
    return sign


def request_info(csr_der: bytes) -> bytes:
    """The CertificationRequestInfo of a CSR, as the DER its signature covers."""
    tree = parse_der(csr_der)
    assert tree is not None and tree.children, "not a DER CSR"
    return tree.children[0].dump()


# -- the policy oracles ------------------------------------------------------------------------


def _spki(key_: Any) -> bytes:
    return key_.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _extensions(cert: x509.Certificate) -> dict[type[x509.ExtensionType], x509.Extension[Any]]:
    found = {type(e.value): e for e in cert.extensions}
    assert len(found) == len(cert.extensions), "an extension appears twice"
    return found


def _check_common(cert: x509.Certificate, ca: issuer.CA, public_key: Any,
                  now: dt.datetime, lifetime: dt.timedelta) -> None:
    assert _spki(cert.public_key()) == _spki(public_key), "the key is not the CSR's"
    assert cert.issuer == ca.certificate.subject
    issued_by = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert issued_by.key_identifier == ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc <= now + lifetime, "it outlives the configured lifetime"
    assert cert.not_valid_after_utc <= ca.certificate.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= lifetime + issuer.BACKDATE


def check_relay_client(cert: x509.Certificate, *, cluster: str, ca: issuer.CA,
                       public_key: Any, now: dt.datetime, lifetime: dt.timedelta) -> None:
    """Fail unless ``cert`` is exactly a relay client certificate for ``cluster``."""
    _check_common(cert, ca, public_key, now, lifetime)
    found = _extensions(cert)
    assert set(found) == {x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage,
                          x509.SubjectAlternativeName, x509.SubjectKeyIdentifier,
                          x509.AuthorityKeyIdentifier}, f"extensions {sorted(map(str, found))}"
    basic = found[x509.BasicConstraints].value
    assert isinstance(basic, x509.BasicConstraints)
    assert not basic.ca and basic.path_length is None
    usage = found[x509.KeyUsage].value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature and usage.key_encipherment
    assert not (usage.key_cert_sign or usage.crl_sign or usage.content_commitment
                or usage.data_encipherment or usage.key_agreement)
    assert list(found[x509.ExtendedKeyUsage].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert list(found[x509.SubjectAlternativeName].value) == [x509.DNSName(cluster)]
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cluster)])


def check_istio_intermediate(cert: x509.Certificate, *, cluster: str, ca: issuer.CA,
                             public_key: Any, now: dt.datetime, lifetime: dt.timedelta,
                             trust_domain: str = "cluster.local",
                             organization: str = "Istio") -> None:
    """Fail unless ``cert`` is exactly the Istio intermediate of ``cluster``."""
    _check_common(cert, ca, public_key, now, lifetime)
    found = _extensions(cert)
    assert set(found) == {x509.BasicConstraints, x509.KeyUsage, x509.SubjectAlternativeName,
                          x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier}, \
        f"extensions {sorted(map(str, found))}"
    basic = found[x509.BasicConstraints]
    assert basic.critical and basic.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = found[x509.KeyUsage]
    assert usage.critical
    value = usage.value
    assert isinstance(value, x509.KeyUsage)
    assert value.key_cert_sign and value.crl_sign and value.digital_signature
    assert not (value.key_encipherment or value.content_commitment or value.data_encipherment
                or value.key_agreement)
    assert list(found[x509.SubjectAlternativeName].value) == [
        x509.DNSName("istiod.istio-system.svc"),
        x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/ns/istio-system/sa/istiod")]
    assert cert.subject == x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate CA"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, cluster)])


def accepted_key(public_key: Any) -> bool:
    try:
        keys.check_public_key(public_key)
    except errors.KeyPolicyError:
        return False
    return True
