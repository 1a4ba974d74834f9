"""Secrets as plain files, where istiod and VMs look for plug-in certificates.

A secret is the directory ``<root>/<ns>/<name>/`` with one file per key. Its
files are swapped all at once the way the kubelet updates a mounted Secret
(its ``AtomicWriter``), so istiod reads this layout unchanged::

    <ns>/<name>/..r<rev>/<key>, ..meta.json   one immutable directory per version
    <ns>/<name>/..data -> ..r<rev>            the current version (a symlink)
    <ns>/<name>/<key>  -> ..data/<key>        what other programs open

A write builds the new version directory, fsyncs it, points a temporary
symlink at it and renames that over ``..data``: one atomic rename. Swapping
the symlink rather than renaming directories keeps ``<ns>/<name>`` itself
stable (a bind mount of it keeps working) and needs no Linux-only
``renameat2``. ``..meta.json`` (type, labels, annotations, resource version,
times) lives inside the version, so it flips with the data. A reader resolves
``..data`` once and reads everything from that immutable version, so it never
sees half of an update. Keys cannot start with ``..`` (the Kubernetes rule),
so these names never collide with data.

A directory of plain files with no ``..data`` (made by hand, cert-manager or
another tool) reads as an ``Opaque`` secret whose resource version is its
newest modification time in microseconds: bring-your-own certificates.
Resources are YAML manifests at ``<ns>/_resources/<Kind>/<name>.yaml``.
Revisions and the change log live in ``.meshtrust/`` (``store.journal``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import backend, base, change, disk, feed, journal, manifest

META = "..meta.json"
DATA = "..data"
RESOURCES = "_resources"
STATE = ".meshtrust"
DEFAULT_HISTORY = 1_000
_T = TypeVar("_T")
# libyaml's safe loader and dumper when PyYAML was built with it: ten times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _is_name(value: str, check: Callable[[str], object]) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


class DirectoryStore(backend.Backend):
    """A ``Store`` in a directory tree; open it with ``await DirectoryStore.open(...)``."""

    def __init__(self, *, root: str, name: str, clock: clock_module.Clock, history: int,
                 interval: float) -> None:
        self._root = root
        self._name = name
        self._clock = clock
        self._history = history
        self._journal = journal.Journal(os.path.join(root, STATE), name)
        self._applied: tuple[int, int] | None = None
        self._reads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._writes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._feed = feed.Feed(read=self._read_changes, head=self.revision, interval=interval)
        self._closed = False

    @classmethod
    async def open(cls, root: str, *, name: str | None = None,
                   clock: clock_module.Clock | None = None, history: int | None = None,
                   interval: float = 0.05) -> DirectoryStore:
        """Open (creating if needed) the store rooted at ``root``."""
        store = cls(root=root, name=name or f"dir:{root}",
                    clock=clock or clock_module.SystemClock(),
                    history=history or DEFAULT_HISTORY, interval=interval)
        try:
            await store._run(store._writes, store._prepare)
        except BaseException:
            await store.close()
            raise
        return store

    async def revision(self) -> int:
        return await self._run(self._reads, self._journal.head)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._feed.close()
        await asyncio.to_thread(self._writes.shutdown, wait=True)
        await asyncio.to_thread(self._reads.shutdown, wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoreUnavailable(f"dir store {self._name} is closed")

    async def _run(self, pool: concurrent.futures.Executor, call: Callable[..., _T],
                   *args: Any) -> _T:
        self._check_open()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call, *args)
        except OSError as exc:
            raise errors.StoreUnavailable(f"dir store {self._name}: {exc}") from exc

    async def _get(self, key: change.Key) -> base.Object:
        obj = await self._run(self._reads, self._read, key)
        if obj is None:
            raise errors.NotFound(f"{change.describe(key)} not found")
        return obj

    async def _list(self, kind: str, namespace: str | None,
                    labels: Mapping[str, str] | None) -> list[base.Object]:
        return await self._run(self._reads, self._list_now, kind, namespace, labels)

    async def _submit(self, write: change.Write) -> base.WatchEvent:
        event = await self._run(self._writes, self._write, write)
        self._feed.notify()  # watchers in this process need not wait for their next poll
        return event

    async def _read_changes(self, after: int, kind: str, namespace: str | None,
                            limit: int) -> tuple[list[base.WatchEvent], int]:
        return await self._run(self._reads, self._journal.read, after, kind, namespace, limit)

    # Reading the tree.

    def _read(self, key: change.Key) -> base.Object | None:
        kind, namespace, name = key
        if kind != base.SECRET_KIND:
            return self._read_resource(os.path.join(
                self._root, namespace, RESOURCES, kind, f"{name}.yaml"))
        folder = os.path.join(self._root, namespace, name)
        for _ in range(50):
            try:
                version = os.readlink(os.path.join(folder, DATA))
            except FileNotFoundError:
                if not os.path.isdir(folder):
                    return None
                plain = self._read_plain(folder, namespace, name)
                # No files yet: an empty folder, or one whose first version a writer is still
                # building (its ..data link comes last). Neither is a secret yet.
                return plain if plain.data else None
            try:
                secret = self._read_version(folder, version, namespace, name)
                if os.readlink(os.path.join(folder, DATA)) == version:
                    return secret
            except FileNotFoundError:
                continue  # a writer replaced the version while we read it: read the new one
        raise errors.StoreUnavailable(f"dir store {self._name}: {namespace}/{name} keeps changing")

    def _read_version(self, folder: str, version: str, namespace: str, name: str) -> base.Secret:
        path = os.path.join(folder, version)
        try:
            with open(os.path.join(path, META), "rb") as handle:
                meta = json.loads(handle.read())
        except FileNotFoundError:  # a Kubernetes Secret volume has no sidecar
            return self._read_plain(path, namespace, name)
        except ValueError as exc:
            raise errors.ConfigError(f"dir store {self._name}: {path}/{META} is damaged") from exc
        keys = meta.pop("data", [])
        if not isinstance(keys, list) or not isinstance(meta, dict):
            raise errors.ConfigError(f"dir store {self._name}: {path}/{META} is damaged")
        secret = manifest.load(meta, source=f"{path}/{META}")
        if not isinstance(secret, base.Secret):
            raise errors.ConfigError(f"{path}/{META}: describes a {secret.kind}, not a secret")
        data = {}
        for key in keys:
            with open(os.path.join(path, base.check_data_key(key)), "rb") as handle:
                data[key] = handle.read()
        return dataclasses.replace(secret, data=data)

    def _read_plain(self, folder: str, namespace: str, name: str) -> base.Secret:
        """A directory of files with no sidecar; its newest mtime is its version."""
        data: dict[str, bytes] = {}
        times = [os.stat(folder).st_mtime_ns]
        with os.scandir(folder) as entries:
            found = [entry for entry in entries
                     if not entry.name.startswith(".") and entry.is_file()]
        for entry in found:
            try:
                base.check_data_key(entry.name)
            except base.InvalidField as exc:
                raise errors.ConfigError(
                    f"dir store {self._name}: {entry.path}: file name is not a secret key "
                    f"({exc.reason}); rename or remove it") from exc
            with open(entry.path, "rb") as handle:
                data[entry.name] = handle.read()
            times.append(entry.stat().st_mtime_ns)
        stamps = [dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
                  for ns in (min(times), max(times))]
        return base.Secret(namespace=namespace, name=name, data=data,
                           resource_version=max(times) // 1000,
                           created=stamps[0], updated=stamps[1])

    def _read_resource(self, path: str) -> base.Resource | None:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
        try:
            document = yaml.load(text, Loader=_LOADER)  # a safe loader
        except yaml.YAMLError as exc:
            raise errors.ConfigError(f"dir store {self._name}: {path}: not valid YAML") from exc
        obj = manifest.load(document, source=path)
        if not isinstance(obj, base.Resource):
            raise errors.ConfigError(f"{path}: holds a {obj.kind}, not a resource")
        if not obj.resource_version:  # written by hand: its mtime is its version
            obj = dataclasses.replace(obj, resource_version=os.stat(path).st_mtime_ns // 1000)
        return obj

    def _list_now(self, kind: str, namespace: str | None,
              labels: Mapping[str, str] | None) -> list[base.Object]:
        if namespace is not None:
            base.check_namespace(namespace)
        found: list[base.Object] = []
        for ns in sorted(self._children(self._root, base.check_namespace)):
            if namespace not in (None, ns):
                continue
            folder = os.path.join(self._root, ns)
            if kind != base.SECRET_KIND:
                folder = os.path.join(folder, RESOURCES, kind)
                names = [entry[:-5] for entry in self._children(folder, None)
                         if entry.endswith(".yaml")]
            else:
                names = [entry for entry in self._children(folder, base.check_name)
                         if os.path.isdir(os.path.join(folder, entry))]
            for name in sorted(names):
                obj = self._read((kind, ns, name))
                if obj is not None and base.matches(obj, None, labels):
                    found.append(obj)
        return found

    @staticmethod
    def _children(folder: str, check: Callable[[str], object] | None) -> list[str]:
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            return []
        return [entry for entry in entries if not entry.startswith((".", "_"))
                and (check is None or _is_name(entry, check))]

    # Writing the tree, on the writer thread under the journal's lock.

    def _prepare(self) -> None:
        disk.make_dirs(self._root)
        self._journal.prepare()
        with self._journal.locked():
            self._recover()
            for ns in self._children(self._root, base.check_namespace):
                folder = os.path.join(self._root, ns)
                for entry in os.listdir(folder):
                    if entry.startswith(".") and ".deleted-" in entry:
                        disk.remove(os.path.join(folder, entry))  # a delete cut short

    def _write(self, write: change.Write) -> base.WatchEvent:
        with self._journal.locked():
            self._recover()
            current = self._read(write.key)
            revision = self._journal.head() + 1
            if current is not None and current.resource_version >= revision:
                revision = current.resource_version + 1  # adopting a hand-made directory
            event = change.apply(write, current, revision, self._clock.now())
            # What needs room on disk is written before the entry is logged, so that a full
            # or read-only disk fails the write cleanly: nothing logged, nothing redone later.
            staged = self._stage(event)
            try:
                self._journal.append(event)
            except OSError:
                if staged is not None:
                    disk.remove(staged)
                raise
            self._apply(event, staged)
            if self._journal.entries() > self._history + self._history // 8:
                self._journal.compact(self._history)
            self._applied = self._journal_size()
        return event

    def _journal_size(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self._journal.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_size)

    def _recover(self) -> None:
        """Apply the last logged write again if its writer died before finishing it."""
        if self._applied is not None and self._applied == self._journal_size():
            return
        entry = self._journal.last(repair=True)
        if entry is not None:
            event = entry.event(self._journal.path)
            obj = event.object
            current = self._read((obj.kind, obj.namespace, obj.name))
            if event.type is base.EventType.DELETED:
                if current is not None and current.resource_version < event.resource_version:
                    self._apply(event)
            elif current is None or current.resource_version < event.resource_version:
                self._apply(event)
        self._applied = self._journal_size()

    def _stage(self, event: base.WatchEvent) -> str | None:
        """Write the files ``event`` adds, where no reader looks yet; return their path.

        A secret's new version directory, or a resource's new manifest beside the old
        one. If that fails (a full disk), whatever was written of it is removed.
        """
        obj = event.object
        if event.type is base.EventType.DELETED:
            return None
        if isinstance(obj, base.Resource):
            folder = os.path.join(self._root, obj.namespace, RESOURCES, obj.kind)
            disk.make_dirs(folder)
            text = yaml.dump(manifest.dump(obj, record=True), Dumper=_DUMPER, sort_keys=False)
            return disk.stage_file(os.path.join(folder, f"{obj.name}.yaml"), text.encode())
        folder = os.path.join(self._root, obj.namespace, obj.name)
        disk.make_dirs(folder)
        path = os.path.join(folder, f"..r{event.resource_version}")
        disk.remove(path)  # left by a writer that died before its swap
        try:
            os.mkdir(path, 0o700)
            for key, value in obj.data.items():
                disk.write_file(os.path.join(path, key), value)
            meta = manifest.dump(obj, record=True)
            meta["data"] = sorted(obj.data)
            disk.write_file(os.path.join(path, META), json.dumps(meta, sort_keys=True).encode())
            disk.fsync_dir(path)
        except OSError:
            disk.remove(path)
            raise
        return path

    def _apply(self, event: base.WatchEvent, staged: str | None = None) -> None:
        """Make ``event`` what readers see; ``staged`` is what ``_stage`` wrote for it."""
        obj = event.object
        folder = os.path.join(self._root, obj.namespace)
        if staged is None:
            staged = self._stage(event)
        if isinstance(obj, base.Resource):
            folder = os.path.join(folder, RESOURCES, obj.kind)
            path = os.path.join(folder, f"{obj.name}.yaml")
            if event.type is base.EventType.DELETED:
                disk.remove(path)
                disk.fsync_dir(folder)
                return
            assert staged is not None
            disk.commit_file(staged, path)
        elif event.type is base.EventType.DELETED:
            trash = os.path.join(folder, f".{obj.name}.deleted-{event.resource_version}")
            os.rename(os.path.join(folder, obj.name), trash)
            disk.fsync_dir(folder)
            disk.remove(trash)
        else:
            assert staged is not None
            self._swap(os.path.join(folder, obj.name), obj, os.path.basename(staged))

    def _swap(self, folder: str, secret: base.Secret, version: str) -> None:
        """Make the staged ``version`` of ``secret`` current with one atomic rename."""
        self._link(folder, DATA, version)
        for key in secret.data:
            self._link(folder, key, f"{DATA}/{key}")
        for entry in os.listdir(folder):
            stale_key = not entry.startswith(".") and entry not in secret.data
            stale_version = entry.startswith("..") and entry not in (DATA, version)
            if stale_key or stale_version:
                disk.remove(os.path.join(folder, entry))
        disk.fsync_dir(folder)

    @staticmethod
    def _link(folder: str, name: str, target: str) -> None:
        path = os.path.join(folder, name)
        if os.path.islink(path) and os.readlink(path) == target:
            return
        temporary = os.path.join(folder, f"..tmp-{name}")
        disk.remove(temporary)
        os.symlink(target, temporary)
        os.replace(temporary, path)
