"""Store URLs: which backend, where, and how to name one in a message safely.

A store is chosen by URL (``sqlite:///var/lib/meshtrust/cluster.db``,
``dir:///etc/cacerts``, ``postgresql://user:secret@db/meshtrust``). Every error
about a store names its URL, and ``mask`` keeps the password out of logs.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from meshtrust import errors

_PASSWORD_QUERY_RE = re.compile(r"(?i)(password=)[^&]*")
_USERINFO_RE = re.compile(r"//([^:/@]*):[^@/]*@")


def mask(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the authority or the query)."""
    masked = _PASSWORD_QUERY_RE.sub(r"\1***", url)
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError:  # malformed: mask what looks like user:password@
        return _USERINFO_RE.sub(r"//\1:***@", masked)
    userinfo, at, hostport = netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if at and colon:
        masked = masked.replace(f"//{netloc}", f"//{user}:***@{hostport}", 1)
    return masked


@dataclasses.dataclass(frozen=True, kw_only=True)
class Location:
    """A parsed store URL: its scheme, what to open, and options.

    ``target`` is the filesystem path of a file store, or the connection string
    of a server (the URL without meshtrust's own options).
    """

    url: str
    scheme: str
    target: str
    history: int | None

    @property
    def masked(self) -> str:
        return mask(self.url)


_FILE_SCHEMES = ("sqlite", "dir")
_SERVER_SCHEMES = ("postgresql", "postgres")


def parse(url: str) -> Location:
    """Split a store URL, raising ``errors.ConfigError`` that names it (masked)."""
    if not isinstance(url, str):
        raise TypeError(f"a store URL is a string, got {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise errors.ConfigError(f"store URL {mask(url)!r} is malformed ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in _FILE_SCHEMES + _SERVER_SCHEMES:
        raise errors.ConfigError(
            f"store URL {mask(url)!r} has no known scheme: use sqlite:///path/cluster.db, "
            "dir:///path or postgresql://user:password@host:port/database")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    history = _history(url, query)
    if scheme in _SERVER_SCHEMES:
        if not parts.hostname and "host" not in query:
            raise errors.ConfigError(f"store URL {mask(url)!r} names no host")
        rest = urllib.parse.urlencode(query, doseq=True)
        target = urllib.parse.urlunsplit(("postgresql", parts.netloc, parts.path, rest, ""))
        return Location(url=url, scheme="postgresql", target=target, history=history)
    if parts.netloc:
        raise errors.ConfigError(
            f"store URL {mask(url)!r} has a host {parts.netloc!r}; a {scheme} store is a local "
            f"path: {scheme}:///absolute/path or {scheme}:relative/path")
    path = urllib.parse.unquote(parts.path)
    if not path or (scheme == "sqlite" and path.endswith("/")):
        raise errors.ConfigError(f"store URL {mask(url)!r} names no file")
    return Location(url=url, scheme=scheme, target=path, history=history)


def _history(url: str, query: dict[str, list[str]]) -> int | None:
    values = query.pop("history", None)
    if values is None:
        return None
    if len(values) != 1 or not values[0].isdigit() or int(values[0]) < 1:
        raise errors.ConfigError(f"store URL {mask(url)!r}: history must be a positive "
                                 "number of revisions to keep")
    return int(values[0])
