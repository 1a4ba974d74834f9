"""Objects as Kubernetes manifests: the shape users write, read and keep on disk.

``dump`` gives the dictionary ``kubectl get -o yaml`` would show (``data``
base64, ``resourceVersion`` a string); ``load`` reads one back. Files, YAML
and stored rows are untrusted input, so ``load`` raises ``errors.ConfigError``
naming the document and the field (``metadata.name``), never a bare
``ValueError``. The stores use the same shape, as compact JSON with one extra
``metadata.updateTimestamp``, for their rows, sidecars and change logs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

import yaml

from meshtrust import errors
from meshtrust.store import base

_FIELD_PATHS = {
    "namespace": "metadata.namespace",
    "name": "metadata.name",
    "labels": "metadata.labels",
    "annotations": "metadata.annotations",
    "resource_version": "metadata.resourceVersion",
    "generation": "metadata.generation",
    "created": "metadata.creationTimestamp",
    "updated": "metadata.updateTimestamp",
    "api_version": "apiVersion",
}


def dump(obj: base.Object, *, show_data: bool = True, record: bool = False) -> dict[str, Any]:
    """The manifest of ``obj``; without ``show_data`` a secret's values become sizes.

    ``record`` adds ``metadata.updateTimestamp``, which stores keep and
    Kubernetes has no field for.
    """
    metadata: dict[str, Any] = {"name": obj.name, "namespace": obj.namespace}
    if obj.labels:
        metadata["labels"] = dict(obj.labels)
    if obj.annotations:
        metadata["annotations"] = dict(obj.annotations)
    if obj.resource_version:
        metadata["resourceVersion"] = str(obj.resource_version)
    if isinstance(obj, base.Resource) and obj.generation:
        metadata["generation"] = obj.generation
    if obj.created is not None:
        metadata["creationTimestamp"] = dump_time(obj.created)
    if record and obj.updated is not None:
        metadata["updateTimestamp"] = dump_time(obj.updated)
    if isinstance(obj, base.Secret):
        data: dict[str, Any] = (
            {key: base64.b64encode(value).decode("ascii") for key, value in obj.data.items()}
            if show_data else {key: len(value) for key, value in obj.data.items()})
        return {"apiVersion": base.SECRET_API_VERSION, "kind": base.SECRET_KIND,
                "metadata": metadata, "type": obj.type, "data": data}
    document: dict[str, Any] = {"apiVersion": obj.api_version, "kind": obj.kind,
                                "metadata": metadata, "spec": obj.spec}
    if obj.status:
        document["status"] = obj.status
    return document


def dump_json(obj: base.Object) -> str:
    """The compact JSON record a store keeps for ``obj``."""
    return json.dumps(dump(obj, record=True), separators=(",", ":"), sort_keys=True)


def load_json(text: str | bytes, *, source: str) -> base.Object:
    """Read a record written by ``dump_json``; ``source`` names where it came from.

    What ``json.loads`` returns is plain JSON data that nothing else holds, so the
    object keeps it without the copy ``load`` makes of other input. Numbers that are
    not finite (``NaN``, ``1e999``), which JSON has no place for, are refused here.
    """
    try:
        document = _RECORDS.decode(text if isinstance(text, str) else text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise errors.ConfigError(f"{source}: not valid JSON ({exc})") from exc
    return load(document, source=source, parsed=True)


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range of a JSON number")
    return value


# One decoder for every record: ``json.loads`` with options would build one per call.
_RECORDS = json.JSONDecoder(parse_constant=_not_finite, parse_float=_finite_float)


def load_documents(text: str, *, source: str, namespace: str = "default") -> list[base.Object]:
    """Every object in a multi-document YAML (or JSON) text; empty documents are skipped.

    ``namespace`` is the namespace of documents that name none.
    """
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"{source}: not valid YAML ({exc})") from exc
    return [load(doc, source=f"{source} document {index + 1}", namespace=namespace)
            for index, doc in enumerate(documents)]


def load(document: object, *, source: str, namespace: str = "default",
         parsed: bool = False) -> base.Object:
    """The object a manifest describes; raise ``errors.ConfigError`` naming the field.

    ``parsed``: ``document`` was just made by ``json.loads`` with finite numbers only
    (``load_json``), so its spec and status need no checking copy.
    """
    if not isinstance(document, Mapping):
        raise errors.ConfigError(f"{source}: a manifest must be a mapping, "
                                 f"got {type(document).__name__}")
    metadata = _mapping(document, "metadata", source, required=True)
    assert metadata is not None
    common: dict[str, Any] = {
        "namespace": metadata.get("namespace", namespace),
        "name": metadata.get("name"),
        "labels": _mapping(metadata, "labels", source, prefix="metadata.") or {},
        "annotations": _mapping(metadata, "annotations", source, prefix="metadata.") or {},
        "resource_version": _integer(metadata, "resourceVersion", source),
        "created": _time(metadata, "creationTimestamp", source),
        "updated": _time(metadata, "updateTimestamp", source),
    }
    kind = document.get("kind")
    try:
        if kind == base.SECRET_KIND:
            return base.Secret(type=document.get("type", "Opaque"),
                               data=_secret_data(document, source), **common)
        return base.Resource(
            api_version=document.get("apiVersion") or "", kind=kind or "",
            spec=_mapping(document, "spec", source) or {},
            status=_mapping(document, "status", source) or {},
            generation=_integer(metadata, "generation", source), parsed=parsed, **common)
    except base.InvalidField as exc:
        path = _FIELD_PATHS.get(exc.field, exc.field)
        raise errors.ConfigError(f"{source}: {path}: {exc.reason}") from exc


def _secret_data(document: Mapping[str, Any], source: str) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    for key, value in (_mapping(document, "data", source) or {}).items():
        if not isinstance(value, str):
            raise errors.ConfigError(f"{source}: data.{key}: must be a base64 string")
        try:
            data[str(key)] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.ConfigError(f"{source}: data.{key}: not valid base64 ({exc})") from exc
    for key, value in (_mapping(document, "stringData", source) or {}).items():
        if not isinstance(value, str):
            raise errors.ConfigError(f"{source}: stringData.{key}: must be a string")
        data[str(key)] = value.encode("utf-8")
    return data


def _mapping(document: Mapping[str, Any], field: str, source: str, *,
             prefix: str = "", required: bool = False) -> dict[str, Any] | None:
    value = document.get(field)
    if value is None:
        if required:
            raise errors.ConfigError(f"{source}: {prefix}{field}: is required")
        return None
    if not isinstance(value, Mapping):
        raise errors.ConfigError(f"{source}: {prefix}{field}: must be a mapping, "
                                 f"got {type(value).__name__}")
    return dict(value)


def _integer(metadata: Mapping[str, Any], field: str, source: str) -> int:
    value = metadata.get(field, 0)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise errors.ConfigError(f"{source}: metadata.{field}: must be a non-negative integer, "
                             f"got {value!r}")


def _time(metadata: Mapping[str, Any], field: str, source: str) -> dt.datetime | None:
    value = metadata.get(field)
    if value is None:
        return None
    try:
        return load_time(value)
    except ValueError as exc:
        raise errors.ConfigError(f"{source}: metadata.{field}: {exc}") from exc


def load_time(value: object) -> dt.datetime:
    """An RFC 3339 time (or a datetime, as YAML parses them) in UTC; ``ValueError`` if not."""
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an RFC 3339 time") from exc
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return parsed.astimezone(dt.UTC)


def read_time(value: object) -> dt.datetime | None:
    """``load_time`` for fields that may be absent or wrong: None instead of an error."""
    if value is None:
        return None
    try:
        return load_time(value)
    except ValueError:
        return None


def dump_time(value: dt.datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, to the microsecond, as Kubernetes writes times."""
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
