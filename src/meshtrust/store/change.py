"""The rules of a write, decided once for every backend.

A backend locks, reads the stored object, asks ``apply`` what the write turns
it into, and persists the answer with the next revision. Keeping the rules
here (compare-and-swap, who may change the status, when ``generation``
moves, which timestamps change) means SQLite, files, PostgreSQL and the
in-memory fake cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum

from meshtrust import errors
from meshtrust.store import base

Key = tuple[str, str, str]
"""(kind, namespace, name): how every backend addresses an object."""


class Action(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    UPDATE_STATUS = "update_status"
    UPDATE_WITH_STATUS = "update_with_status"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Write:
    """One requested write: the action, its target and the caller's object."""

    action: Action
    key: Key
    obj: base.Object | None = None
    expected: int | None = None
    """The resource version the caller read; None only for an unconditional delete."""

    @classmethod
    def create(cls, obj: base.Object) -> Write:
        return cls(action=Action.CREATE, key=key_of(obj), obj=obj)

    @classmethod
    def update(cls, obj: base.Object, *, with_status: bool = False) -> Write:
        if with_status and not isinstance(obj, base.Resource):
            raise TypeError(f"only a Resource has a status, got {type(obj).__name__}")
        return cls(action=Action.UPDATE_WITH_STATUS if with_status else Action.UPDATE,
                   key=key_of(obj), obj=obj, expected=_read_version(obj, "update"))

    @classmethod
    def update_status(cls, obj: base.Resource) -> Write:
        if not isinstance(obj, base.Resource):
            raise TypeError(f"update_status takes a Resource, got {type(obj).__name__}")
        return cls(action=Action.UPDATE_STATUS, key=key_of(obj), obj=obj,
                   expected=_read_version(obj, "update_status"))

    @classmethod
    def delete(cls, kind: str, namespace: str, name: str,
               resource_version: int | None = None) -> Write:
        base.check_kind(kind)
        base.check_namespace(namespace)
        base.check_name(name)
        if resource_version is not None and resource_version < 1:
            raise ValueError("delete's resource_version must be positive when given")
        return cls(action=Action.DELETE, key=(kind, namespace, name), expected=resource_version)


def key_of(obj: base.Object) -> Key:
    if not isinstance(obj, (base.Secret, base.Resource)):
        raise TypeError(f"a store holds Secret and Resource values, got {type(obj).__name__}")
    return (obj.kind, obj.namespace, obj.name)


def stored(obj: base.ObjectT, event: base.WatchEvent) -> base.ObjectT:
    """The object ``event`` stored for a write of ``obj``, typed as ``obj`` is."""
    result = event.object
    if not isinstance(result, type(obj)):
        raise TypeError(f"stored a {type(result).__name__} for a {type(obj).__name__}")
    return result


def describe(key: Key) -> str:
    kind, namespace, name = key
    return f"{kind.lower()} {namespace}/{name}"


def _read_version(obj: base.Object, action: str) -> int:
    if obj.resource_version < 1:
        raise ValueError(f"{action} needs the resource_version the object was read at; "
                         "use create for a new object")
    return obj.resource_version


def check(write: Write, current: base.Object | None) -> None:
    """Raise the error the write meets against ``current``, if any."""
    if write.action is Action.CREATE:
        if current is not None:
            raise errors.AlreadyExists(f"{describe(write.key)} exists already")
        return
    if current is None:
        raise errors.NotFound(f"{describe(write.key)} not found")
    if write.expected is not None and write.expected != current.resource_version:
        raise errors.Conflict(
            f"{describe(write.key)} changed: read at resource version {write.expected}, "
            f"now at {current.resource_version}; read it again and retry")


def apply(write: Write, current: base.Object | None, revision: int,
          now: dt.datetime) -> base.WatchEvent:
    """The event that ``write`` makes of ``current`` at ``revision``; raises as ``check``."""
    check(write, current)
    if write.action is Action.DELETE:
        assert current is not None
        gone = dataclasses.replace(current, resource_version=revision)
        return base.WatchEvent(type=base.EventType.DELETED, object=gone,
                               resource_version=revision)
    obj = write.obj
    assert obj is not None
    if write.action is Action.CREATE:
        stored: base.Object = dataclasses.replace(obj, resource_version=revision, created=now,
                                                  updated=now)
        if isinstance(stored, base.Resource):
            stored = dataclasses.replace(stored, generation=1)
        return base.WatchEvent(type=base.EventType.ADDED, object=stored,
                               resource_version=revision)
    assert current is not None
    if isinstance(obj, base.Secret):
        stored = dataclasses.replace(obj, resource_version=revision,
                                     created=current.created, updated=now)
    else:
        assert isinstance(current, base.Resource)
        stored = _next_resource(write.action, obj, current, revision, now)
    return base.WatchEvent(type=base.EventType.MODIFIED, object=stored,
                           resource_version=revision)


def _next_resource(action: Action, obj: base.Resource, current: base.Resource,
                   revision: int, now: dt.datetime) -> base.Resource:
    if action is Action.UPDATE_STATUS:
        return dataclasses.replace(current, status=obj.status, resource_version=revision,
                                   updated=now)
    generation = current.generation + (1 if obj.spec != current.spec else 0)
    status = obj.status if action is Action.UPDATE_WITH_STATUS else current.status
    return dataclasses.replace(obj, status=status, generation=generation,
                               resource_version=revision, created=current.created,
                               updated=now)
