"""The state every cluster keeps: Kubernetes-shaped objects behind one async port.

Every backend (SQLite, a directory of files, PostgreSQL, the in-memory fake in
``meshtrust.testing``) stores the same two kinds of value, ``Secret`` and
``Resource``, and offers the same ``Store`` protocol: reads, writes with
compare-and-swap on the resource version, and a resumable watch. The
resource version is one revision counter per store, as in etcd: every write
takes the next number, and a watch resumes after any number it has seen.

Values check themselves: an invalid name is a caller's mistake and raises
``InvalidField`` (a ``ValueError`` that names the field). Code that builds
values from files or YAML turns it into ``errors.ConfigError``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import enum
import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, TypeVar

from meshtrust import clock

SECRET_KIND = "Secret"
SECRET_API_VERSION = "v1"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DATA_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_KIND_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
_API_VERSION_RE = re.compile(rf"({_DNS_LABEL}(\.{_DNS_LABEL})*/)?v[0-9]+((alpha|beta)[0-9]+)?")
_SECRET_TYPE_RE = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_./]*")


class InvalidField(ValueError):
    """A value was built with a field that breaks the Kubernetes naming rules."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_namespace(value: object, field: str = "namespace") -> str:
    """Return ``value`` if it is a DNS-1123 label (a Kubernetes namespace name)."""
    if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL_RE.fullmatch(value):
        raise InvalidField(field, f"{value!r} is not a DNS-1123 label "
                                  "(lower-case letters, digits and '-', at most 63)")
    return value


def check_name(value: object, field: str = "name") -> str:
    """Return ``value`` if it is a DNS-1123 subdomain, such as ``root-trust.default``."""
    if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(value):
        raise InvalidField(field, f"{value!r} is not a DNS-1123 subdomain "
                                  "(lower-case letters, digits, '-' and '.', at most 253)")
    return value


def check_kind(value: object, field: str = "kind") -> str:
    """Return ``value`` if it is a CamelCase Kubernetes kind."""
    if not isinstance(value, str) or len(value) > 63 or not _KIND_RE.fullmatch(value):
        raise InvalidField(field, f"{value!r} is not a kind (CamelCase, such as 'Lease')")
    return value


def check_data_key(value: object, field: str = "data") -> str:
    """Return ``value`` if it may name a key of a Secret's data (and so a file)."""
    if (not isinstance(value, str) or len(value) > 253 or not _DATA_KEY_RE.fullmatch(value)
            or value in (".", "..") or value.startswith("..")):
        raise InvalidField(field, f"key {value!r} must match [-._a-zA-Z0-9]+ "
                                  "and must not be '.' or start with '..'")
    return value


def _check_qualified_key(value: object, field: str) -> str:
    """A label or annotation key: an optional DNS prefix, '/', and a 63-char name."""
    if not isinstance(value, str):
        raise InvalidField(field, f"key {value!r} must be a string")
    prefix, _, name = value.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        raise InvalidField(field, f"key {value!r} has an invalid prefix {prefix!r}")
    if len(name) > 63 or not _LABEL_NAME_RE.fullmatch(name):
        raise InvalidField(field, f"key {value!r} is not a qualified name "
                                  "(alphanumerics, '-', '_', '.'; at most 63)")
    return value


def _check_labels(value: object, field: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidField(field, f"must be a mapping of strings, got {type(value).__name__}")
    labels = {}
    for key, item in value.items():
        _check_qualified_key(key, field)
        if not isinstance(item, str) or (item and (
                len(item) > 63 or not _LABEL_NAME_RE.fullmatch(item))):
            raise InvalidField(field, f"value {item!r} of {key!r} is not a label value "
                                      "(alphanumerics, '-', '_', '.'; at most 63)")
        labels[key] = item
    return labels


def _check_annotations(value: object, field: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidField(field, f"must be a mapping of strings, got {type(value).__name__}")
    annotations = {}
    for key, item in value.items():
        _check_qualified_key(key, field)
        if not isinstance(item, str):
            raise InvalidField(field, f"value of {key!r} must be a string")
        annotations[key] = item
    return annotations


def _check_version(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidField(field, f"must be a non-negative integer, got {value!r}")
    return value


def _check_time(value: object, field: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise InvalidField(field, f"must be a datetime, got {type(value).__name__}")
    try:
        return clock.require_utc(value, field)
    except ValueError as exc:
        raise InvalidField(field, str(exc)) from exc


class _NotPlain(Exception):
    """A value outside plain JSON types: the general check decides about it."""


def _plain_copy(value: object) -> Any:
    """A deep copy of plain JSON data (dict, list, str, int, bool, None, finite float).

    Every object read from a store is such data, and this walk is several times
    faster than encoding it and ``copy.deepcopy``; anything else raises _NotPlain.
    """
    kind = type(value)
    if kind is dict:
        copied = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise _NotPlain
            copied[key] = _plain_copy(item)
        return copied
    if kind is list:
        return [_plain_copy(item) for item in value]  # type: ignore[attr-defined]
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float and math.isfinite(value):  # type: ignore[arg-type]
        return value
    raise _NotPlain


def _check_json_object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidField(field, f"must be a mapping, got {type(value).__name__}")
    try:
        return dict(_plain_copy(dict(value)))
    except (_NotPlain, RecursionError):
        pass
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidField(field, f"must hold only JSON values ({exc})") from exc
    return copy.deepcopy(dict(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Secret:
    """Named bytes, such as a certificate and its key (Kubernetes ``v1/Secret``).

    ``resource_version`` is 0 until the store has written it; ``created`` and
    ``updated`` are ``None`` until then and set by the store.
    """

    namespace: str
    name: str
    type: str = "Opaque"
    data: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    resource_version: int = 0
    created: dt.datetime | None = None
    updated: dt.datetime | None = None

    kind = SECRET_KIND

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_name(self.name)
        if not isinstance(self.type, str) or not _SECRET_TYPE_RE.fullmatch(self.type):
            raise InvalidField("type", f"{self.type!r} is not a secret type such as 'Opaque'")
        if not isinstance(self.data, Mapping):
            raise InvalidField("data", "must be a mapping of bytes, "
                                       f"got {type(self.data).__name__}")
        data = {}
        for key, value in self.data.items():
            check_data_key(key)
            if not isinstance(value, bytes):
                raise InvalidField("data", f"value of {key!r} must be bytes, "
                                           f"got {type(value).__name__}")
            data[key] = value
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "labels", _check_labels(self.labels, "labels"))
        object.__setattr__(self, "annotations",
                           _check_annotations(self.annotations, "annotations"))
        _check_version(self.resource_version, "resource_version")
        object.__setattr__(self, "created", _check_time(self.created, "created"))
        object.__setattr__(self, "updated", _check_time(self.updated, "updated"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resource:
    """Any other Kubernetes-shaped object: a kind, a ``spec`` and a ``status``.

    ``generation`` counts changes of ``spec``: a store bumps it when an update
    changes the spec, and leaves it alone when only the status changes.
    """

    api_version: str
    kind: str
    namespace: str
    name: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: int = 0
    resource_version: int = 0
    created: dt.datetime | None = None
    updated: dt.datetime | None = None
    parsed: dataclasses.InitVar[bool] = False
    """True if ``spec`` and ``status`` were just parsed from JSON text (``json.loads``, with
    every number finite) and nothing else holds them: they are plain JSON data already and
    are kept as they are. Otherwise they are checked and copied."""

    def __post_init__(self, parsed: bool) -> None:
        if not isinstance(self.api_version, str) or not _API_VERSION_RE.fullmatch(
                self.api_version):
            raise InvalidField("api_version", f"{self.api_version!r} is not an apiVersion "
                                              "such as 'coordination.k8s.io/v1'")
        check_kind(self.kind)
        if self.kind == SECRET_KIND:
            raise InvalidField("kind", "'Secret' is reserved: use the Secret value")
        check_namespace(self.namespace)
        check_name(self.name)
        object.__setattr__(self, "labels", _check_labels(self.labels, "labels"))
        object.__setattr__(self, "annotations",
                           _check_annotations(self.annotations, "annotations"))
        if not (parsed and type(self.spec) is dict and type(self.status) is dict):
            object.__setattr__(self, "spec", _check_json_object(self.spec, "spec"))
            object.__setattr__(self, "status", _check_json_object(self.status, "status"))
        _check_version(self.generation, "generation")
        _check_version(self.resource_version, "resource_version")
        object.__setattr__(self, "created", _check_time(self.created, "created"))
        object.__setattr__(self, "updated", _check_time(self.updated, "updated"))


Object = Secret | Resource
ObjectT = TypeVar("ObjectT", Secret, Resource)


class EventType(enum.Enum):
    """What happened to an object, in Kubernetes watch terms."""

    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchEvent:
    """One write, as a watch reports it.

    ``object`` is the object after the write; for ``DELETED`` it is the last
    state, carrying the revision of the deletion as its resource version.
    """

    type: EventType
    object: Object
    resource_version: int

    def __post_init__(self) -> None:
        if not isinstance(self.type, EventType):
            raise InvalidField("type", f"must be an EventType, got {self.type!r}")
        if self.resource_version < 1 or self.object.resource_version != self.resource_version:
            raise InvalidField("resource_version", "must be positive and equal to the object's")


def matches(obj: Object, namespace: str | None, labels: Mapping[str, str] | None) -> bool:
    """Whether ``obj`` is in ``namespace`` (any if None) and carries every label given."""
    if namespace is not None and obj.namespace != namespace:
        return False
    return all(obj.labels.get(key) == value for key, value in (labels or {}).items())


class Store(Protocol):
    """Kubernetes-shaped state with compare-and-swap and a resumable watch.

    Writes return the object as stored: with its new ``resource_version`` (the
    store's revision after the write) and its timestamps. ``update``,
    ``update_status`` and ``delete`` compare the caller's resource version with
    the stored one and raise ``errors.Conflict`` if it changed. To follow the
    state without missing a write: ``rev = await store.revision()``, list, then
    ``watch(kind, since=rev)``; events repeat what the list showed at worst.
    """

    async def get_secret(self, namespace: str, name: str) -> Secret:
        """Return a secret; raise ``errors.NotFound`` if there is none."""
        ...

    async def get_resource(self, kind: str, namespace: str, name: str) -> Resource:
        """Return a resource; raise ``errors.NotFound`` if there is none."""
        ...

    async def list_secrets(self, *, namespace: str | None = None,
                           labels: Mapping[str, str] | None = None) -> list[Secret]:
        """Secrets in ``namespace`` (every one if None) with all the ``labels`` given."""
        ...

    async def list_resources(self, kind: str, *, namespace: str | None = None,
                             labels: Mapping[str, str] | None = None) -> list[Resource]:
        """Resources of ``kind``, filtered as ``list_secrets`` filters."""
        ...

    async def create(self, obj: ObjectT) -> ObjectT:
        """Store a new object; raise ``errors.AlreadyExists`` if the name is taken."""
        ...

    async def update(self, obj: ObjectT, *, with_status: bool = False) -> ObjectT:
        """Replace an object read at ``obj.resource_version``.

        For a resource this writes labels, annotations and spec (bumping
        ``generation`` when the spec changes) and keeps the stored status; with
        ``with_status`` it writes the status too, in the same compare-and-swap.
        Raise ``errors.NotFound`` or ``errors.Conflict``.
        """
        ...

    async def update_status(self, resource: Resource) -> Resource:
        """Replace only the status of a resource, with the same compare-and-swap."""
        ...

    async def delete(self, kind: str, namespace: str, name: str, *,
                     resource_version: int | None = None) -> None:
        """Delete an object (kind ``"Secret"`` for secrets), optionally only at a version."""
        ...

    async def revision(self) -> int:
        """The store's current revision: the resource version of the latest write."""
        ...

    def watch(self, kind: str, *, namespace: str | None = None,
              since: int | None = None) -> AsyncIterator[WatchEvent]:
        """Every write to ``kind`` after revision ``since`` (after now if None), in order.

        Raise ``errors.Conflict`` if ``since`` is older than the history the
        store keeps: list again and watch from the new revision.
        """
        ...

    async def close(self) -> None:
        """Release connections, threads and files; the store is unusable after."""
        ...
