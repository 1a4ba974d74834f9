"""Private keys: the key types meshtrust accepts, and PEM conversion.

RSA 2048/3072/4096 and ECDSA P-256/P-384 are the supported types. A key of
any other type, size or curve — whether ours or a peer's in a CSR — is
refused here, in one place.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, TypeGuard

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import Certificate

from meshtrust import errors
from meshtrust.pki import der

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

MIN_RSA_BITS = 2048
RSA_SIZES = (2048, 3072, 4096)
CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}


class KeyType(enum.Enum):
    """A key algorithm and size, named as on the command line."""

    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    EC_P256 = "ecdsa-p256"
    EC_P384 = "ecdsa-p384"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Read a key type such as ``rsa-4096`` or ``ecdsa-p256``; raise ConfigError if unknown."""
        aliases = {"p256": "ecdsa-p256", "p384": "ecdsa-p384", "ec-p256": "ecdsa-p256",
                   "ec-p384": "ecdsa-p384", "rsa2048": "rsa-2048", "rsa3072": "rsa-3072",
                   "rsa4096": "rsa-4096"}
        normal = text.strip().lower()
        normal = aliases.get(normal, normal)
        for member in cls:
            if member.value == normal:
                return member
        allowed = ", ".join(m.value for m in cls)
        raise errors.ConfigError(f"unknown key type {text!r}; use one of: {allowed}")

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")


def generate_key(key_type: KeyType) -> PrivateKey:
    """Make a new private key of ``key_type``."""
    if key_type.is_rsa:
        bits = int(key_type.value.split("-")[1])
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    curve = ec.SECP256R1() if key_type is KeyType.EC_P256 else ec.SECP384R1()
    return ec.generate_private_key(curve)


def is_rsa_public(key: Any) -> TypeGuard[rsa.RSAPublicKey]:
    """``isinstance(key, rsa.RSAPublicKey)``, remembered per type of key (``_public_family``)."""
    return _public_family(key.__class__) is rsa.RSAPublicKey


def is_ec_public(key: Any) -> TypeGuard[ec.EllipticCurvePublicKey]:
    """``isinstance(key, ec.EllipticCurvePublicKey)``, remembered per type of key."""
    return _public_family(key.__class__) is ec.EllipticCurvePublicKey


@functools.cache
def _public_family(kind: Any) -> type | None:
    """The abstract class of the public keys of type ``kind``: RSA, EC, or neither (None).

    cryptography registers its key types with these abstract classes, and Python
    does not cache ``isinstance`` answers for registered classes: each check runs
    the subclass hook again (about 0.7 µs), and reading a request asks several times.
    """
    for family in (rsa.RSAPublicKey, ec.EllipticCurvePublicKey):
        if issubclass(kind, family):
            return family
    return None


def check_public_key(key: object) -> PublicKey:
    """Return ``key`` if meshtrust accepts it; raise KeyPolicyError naming the problem."""
    if is_rsa_public(key):
        if key.key_size < MIN_RSA_BITS:
            raise errors.KeyPolicyError(
                f"RSA key of {key.key_size} bits is too weak; use at least {MIN_RSA_BITS} bits"
            )
        if key.key_size not in RSA_SIZES:
            raise errors.KeyPolicyError(
                f"RSA key of {key.key_size} bits is not supported; use 2048, 3072 or 4096 bits"
            )
        return key
    if is_ec_public(key):
        if key.curve.name not in CURVES:
            raise errors.KeyPolicyError(
                f"elliptic curve {key.curve.name} is not supported; use P-256 or P-384"
            )
        return key
    raise unsupported_key_type(type(key).__name__.lstrip("_").replace("PublicKey", ""))


def unsupported_key_type(kind: str) -> errors.KeyPolicyError:
    """The refusal of a key of type ``kind`` (such as ``DSA``), which meshtrust does not take."""
    return errors.KeyPolicyError(
        f"key type {kind or 'unknown'} is not supported; use RSA (2048, 3072, 4096) or "
        "ECDSA (P-256, P-384)")


def describe_key(key: object) -> str:
    """A short human name of a public or private key, such as ``RSA 2048`` or ``ECDSA P-256``."""
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"RSA {key.key_size}"
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.lstrip("_")


def key_type_of(key: PublicKey | PrivateKey) -> KeyType | None:
    """The KeyType of a key, or None if it is of no supported type."""
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return next((t for t in KeyType if t.value == f"rsa-{key.key_size}"), None)
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}.get(key.curve.name)
    return None


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest to sign with: SHA-384 for P-384 keys, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def dump_private_key(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM of ``key``, encrypted with ``passphrase`` when one is given."""
    encryption: serialization.KeySerializationEncryption
    if passphrase:
        encryption = serialization.BestAvailableEncryption(passphrase)
    else:
        encryption = serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def load_private_key(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Parse a PEM private key (PKCS#8 or traditional); raise KeyPolicyError if unusable."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:
        if passphrase:
            raise errors.KeyPolicyError("the private key is not encrypted; "
                                        "do not give a passphrase") from exc
        raise errors.KeyPolicyError("the private key is encrypted; give its passphrase") from exc
    except ValueError as exc:
        raise errors.KeyPolicyError(
            "cannot read the private key: not a PEM key, or the wrong passphrase"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise errors.KeyPolicyError(f"cannot read the private key ({exc}); use RSA (2048, "
                                    "3072, 4096) or ECDSA (P-256, P-384)") from exc
    check_public_key(key.public_key())  # refuses every type but RSA and ECDSA
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    return key


def public_key_der(key: PublicKey | PrivateKey) -> bytes:
    """The SubjectPublicKeyInfo DER of a key, for comparing keys."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey,
                                                  ec.EllipticCurvePrivateKey)) else key
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


# What cryptography writes for an EC public key: a named curve and an uncompressed point
# (0x04, then X and Y) in a BIT STRING with no unused bits. Everything before X is fixed,
# the outer SEQUENCE's length (the second octet) included.
_EC_SPKI_PREFIX = {
    "secp256r1": bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004"),
    "secp384r1": bytes.fromhex("3076301006072a8648ce3d020106052b8104002203620004"),
}
# rsaEncryption with its NULL parameters (RFC 3279 2.3.1), as cryptography writes it.
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")


def public_key_der_of(key: PublicKey, encoded: bytes | None) -> bytes:
    """``public_key_der(key)``, reusing ``encoded`` (the SubjectPublicKeyInfo ``key`` was read
    from) when it is byte for byte what that would return.

    cryptography reads a key only from strict DER, so the bytes it accepted are the
    ones it would write unless the key had a choice of form: an EC point may be
    compressed, and rsaEncryption's parameters may be left out. Those are checked;
    any other form is encoded again.
    """
    if encoded is None:
        return public_key_der(key)
    if is_ec_public(key):
        prefix = _EC_SPKI_PREFIX.get(key.curve.name)
        if prefix is not None and len(encoded) == 2 + prefix[1] and encoded.startswith(prefix):
            return encoded
    elif is_rsa_public(key):
        try:
            algorithm, _ = der.public_key_info(encoded)
        except (ValueError, IndexError):
            algorithm = b""
        if algorithm == _RSA_ALGORITHM:
            return encoded
    return public_key_der(key)


def key_matches(certificate: Certificate, key: PrivateKey) -> bool:
    """True if ``key`` is the private half of ``certificate``'s public key."""
    return public_key_der(key) == certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` is an encrypted PKCS#8 PEM key."""
    return ENCRYPTED_PEM in data


@dataclasses.dataclass(frozen=True)
class KeyLock:
    """How CA keys are kept at rest: encrypted with a passphrase, or plain without one.

    ``seal`` writes a key the way the store keeps it; ``open`` reads either
    form, so a store whose keys are not sealed yet keeps working (and can be
    sealed in place) once a passphrase is set.
    """

    passphrase: bytes | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.passphrase is not None and not self.passphrase:
            raise errors.ConfigError("the CA key passphrase is empty")

    @property
    def sealing(self) -> bool:
        return self.passphrase is not None

    def seal(self, key: PrivateKey) -> bytes:
        return dump_private_key(key, self.passphrase)

    def open(self, data: bytes) -> PrivateKey:
        if not is_encrypted(data):
            return load_private_key(data)
        if self.passphrase is None:
            raise errors.KeyPolicyError(
                "the CA keys in the store are encrypted; give their passphrase with "
                "--key-passphrase-file or MESHTRUST_KEY_PASSPHRASE")
        try:
            return load_private_key(data, self.passphrase)
        except errors.KeyPolicyError:
            raise errors.KeyPolicyError(
                "cannot decrypt the CA keys in the store: wrong passphrase") from None
