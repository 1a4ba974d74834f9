"""Durable, private file operations for the directory store and its change log.

A write the directory store acknowledges must survive a crash or a power
loss, and a secret must never be readable by other users. These helpers are
the one place that gets that right: files are created 0600 and directories
0700 whatever the umask allows, data is fsynced before it is renamed into
place, and a directory is fsynced after an entry in it is created, renamed
or removed.
"""

from __future__ import annotations

import os
import shutil


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, content: bytes) -> None:
    """Write ``content`` to a new or truncated 0600 file and fsync it."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, content: bytes) -> None:
    """Replace ``path`` with ``content`` atomically: readers see the old file or the new one."""
    commit_file(stage_file(path, content), path)


def stage_file(path: str, content: bytes) -> str:
    """Write ``content`` beside ``path``, for ``commit_file``; return where.

    If it cannot be written whole (a full disk), the partial file is removed.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp")
    try:
        write_file(temporary, content)
    except OSError:
        remove(temporary)
        raise
    return temporary


def commit_file(staged: str, path: str) -> None:
    """Put the file ``stage_file`` wrote in place of ``path`` with one atomic rename."""
    os.replace(staged, path)
    fsync_dir(os.path.dirname(path) or ".")


def make_dirs(path: str) -> None:
    """Create ``path`` and its missing parents (0700), fsyncing each new entry."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    make_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    fsync_dir(parent)


def remove(path: str) -> None:
    """Remove a file, a symlink or a whole directory tree; a missing one is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
