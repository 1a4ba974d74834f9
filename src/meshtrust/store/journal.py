"""The revision counter and change log of a directory store, in one append-only file.

Processes that share a directory store agree on revisions through
``<root>/.meshtrust/changes.log``: a writer takes ``flock`` on
``.meshtrust/lock``, appends one line per write and fsyncs it before it
swaps the new version into the tree. The log is therefore also a redo log: if
a writer dies between the append and the swap, the next writer (or the next
open) finds the last entry missing from the tree and applies it again. A line
that cannot be written whole (a full disk) is cut off again at once, so a write
that failed is never redone. The head revision is the last entry's; watchers
read the entries after the revision they have seen.

A line is ``<revision> <type> <kind> <namespace> <manifest JSON>``, so a reader
can skip entries of other kinds without parsing JSON. Compaction rewrites the
file with its newest entries under a ``#compacted <revision>`` header.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import io
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from meshtrust import errors
from meshtrust.store import base, disk, feed, manifest

FORMAT = 1
_HEADER = b"#compacted "
_TAIL_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """One line of the log, with its object still unparsed."""

    revision: int
    type: base.EventType
    kind: str
    namespace: str
    body: bytes

    def event(self, source: str) -> base.WatchEvent:
        obj = manifest.load_json(self.body, source=source)
        return base.WatchEvent(type=self.type, object=obj, resource_version=self.revision)


def _parse(line: bytes, source: str) -> Entry:
    try:
        revision, kind_of_event, kind, namespace, body = line.rstrip(b"\n").split(b" ", 4)
        return Entry(revision=int(revision), type=base.EventType(kind_of_event.decode()),
                     kind=kind.decode(), namespace=namespace.decode(), body=body)
    except ValueError as exc:
        raise errors.ConfigError(f"{source}: damaged change log line {line[:80]!r}") from exc


class Journal:
    """The change log under ``<state>/``; writers hold ``locked()`` around every write."""

    def __init__(self, state: str, name: str) -> None:
        self._state = state
        self._name = name
        self.path = os.path.join(state, "changes.log")
        self._lock_path = os.path.join(state, "lock")
        self._thread_lock = threading.Lock()
        self._index_lock = threading.Lock()
        # The reader's index of the current file: (revision, byte offset) per entry.
        self._inode = -1
        self._scanned = 0
        self._compacted = 0
        self._revisions: list[int] = []
        self._offsets: list[int] = []

    def prepare(self) -> None:
        """Create the state directory, or refuse one written by a newer meshtrust."""
        os.makedirs(self._state, mode=0o700, exist_ok=True)
        format_path = os.path.join(self._state, "format")
        try:
            with open(format_path, encoding="ascii") as handle:
                found = int(handle.read().strip() or 0)
        except FileNotFoundError:
            found = 0
        except ValueError as exc:
            raise errors.SchemaError(f"dir store {self._name}: {format_path} is damaged") from exc
        if found > FORMAT:
            raise errors.SchemaError(f"dir store {self._name} was written by a newer meshtrust "
                                     f"(schema {found} > {FORMAT}); upgrade meshtrust")
        if found < FORMAT:
            with self.locked():
                disk.replace_file(format_path, f"{FORMAT}\n".encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's write lock, across threads and processes."""
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def last(self, *, repair: bool = False) -> Entry | None:
        """The last complete entry; with ``repair`` (under the lock), cut off a torn line."""
        with self._open() as handle:
            size = handle.seek(0, os.SEEK_END)
            chunk = _TAIL_CHUNK
            while True:
                start = max(0, size - chunk)
                handle.seek(start)
                tail = handle.read(size - start)
                end = tail.rfind(b"\n") + 1
                begin = tail.rfind(b"\n", 0, max(end - 1, 0)) + 1
                if start > 0 and begin == 0:
                    chunk *= 2
                    continue
                if repair and start + end < size:  # a writer died mid-line
                    os.truncate(self.path, start + end)
                line = tail[begin:max(end - 1, 0)]
                if not line or line.startswith(_HEADER):
                    return None
                return _parse(line, self._name)

    def head(self) -> int:
        """The revision of the last entry (0 for an empty store)."""
        entry = self.last()
        return entry.revision if entry else self.compacted()

    def compacted(self) -> int:
        """The newest revision compaction removed; watches must start at or after it."""
        try:
            with open(self.path, "rb") as handle:
                first = handle.readline()
        except FileNotFoundError:
            return 0
        return int(first[len(_HEADER):]) if first.startswith(_HEADER) else 0

    def append(self, event: base.WatchEvent) -> int:
        """Write one entry and fsync it; call under ``locked()``.

        Returns the offset the entry starts at, for ``truncate``. If the entry
        cannot be written whole (a full disk), what was written of it is cut
        off again and the ``OSError`` raised.
        """
        obj = event.object
        line = (f"{event.resource_version} {event.type.value} {obj.kind} {obj.namespace} "
                f"{manifest.dump_json(obj)}\n").encode()
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # a full disk makes a short write before it fails
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if created:
            disk.fsync_dir(self._state)
        return start

    def truncate(self, offset: int) -> None:
        """Cut the log back to ``offset``, dropping the entries from there; under ``locked()``."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def compact(self, keep: int) -> None:
        """Keep only the newest ``keep`` entries; call under ``locked()``."""
        with open(self.path, "rb") as handle:
            lines = [line for line in handle if not line.startswith(_HEADER)]
        if len(lines) <= keep:
            return
        dropped = _parse(lines[-keep - 1], self._name).revision
        header = _HEADER + str(dropped).encode() + b"\n"
        disk.replace_file(self.path, header + b"".join(lines[-keep:]))

    def entries(self) -> int:
        """How many entries the log holds now."""
        with self._index_lock, self._open() as handle:
            self._refresh(handle)
            return len(self._revisions)

    def read(self, after: int, kind: str, namespace: str | None,
             limit: int) -> tuple[list[base.WatchEvent], int]:
        """Events of ``kind`` after revision ``after``, and the last revision examined."""
        with self._index_lock, self._open() as handle:
            self._refresh(handle)
            if after < self._compacted:
                raise feed.too_old(after, self._compacted + 1)
            index = bisect.bisect_right(self._revisions, after)
            if index == len(self._revisions):
                return [], max(after, self._revisions[-1] if self._revisions else 0)
            events: list[base.WatchEvent] = []
            examined = after
            handle.seek(self._offsets[index])
            for _ in range(min(limit, len(self._revisions) - index)):
                entry = _parse(handle.readline(), self._name)
                examined = entry.revision
                if entry.kind == kind and namespace in (None, entry.namespace):
                    events.append(entry.event(self._name))
            return events, examined

    def _open(self) -> BinaryIO:
        """The log for reading; an empty one if there is none yet."""
        try:
            return open(self.path, "rb")  # the caller closes it
        except FileNotFoundError:
            return io.BytesIO()

    def _refresh(self, handle: BinaryIO) -> None:
        """Index the entries appended since the last look (all of them after compaction)."""
        stat = os.fstat(handle.fileno()) if not isinstance(handle, io.BytesIO) else None
        inode, size = (stat.st_ino, stat.st_size) if stat else (-1, 0)
        if inode != self._inode or size < self._scanned:
            self._inode, self._scanned, self._compacted = inode, 0, 0
            self._revisions, self._offsets = [], []
        if size == self._scanned:
            return
        handle.seek(self._scanned)
        offset = self._scanned
        for line in handle:
            if not line.endswith(b"\n"):
                break  # being written
            if line.startswith(_HEADER):
                self._compacted = int(line[len(_HEADER):])
            else:
                self._revisions.append(int(line[:line.index(b" ")]))
                self._offsets.append(offset)
            offset += len(line)
        self._scanned = offset
