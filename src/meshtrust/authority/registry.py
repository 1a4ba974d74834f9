"""The cluster registry and its bootstrap tokens, kept as resources in the management store.

A registered cluster is a ``KubernetesCluster`` resource (the reference's
``admin.gloo.solo.io/v2`` kind) whose status records when its agent was last
seen and which client certificate it holds. Deregistering deletes it, and the
relay refuses the cluster's certificate from the next call on.

Per-cluster tokens are better than the reference's single shared token: each
is single-use, expires (one hour by default), and is stored only as a SHA-256
hash in a ``BootstrapToken`` resource. Consumption is a compare-and-swap, so
of many concurrent bootstraps with one token exactly one wins. A consumed
token stays usable by the same key only, until it expires, so an agent that
lost the response can try again, even after a busy server had it wait.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Collection
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import audit as audit_module
from meshtrust.pki import identity
from meshtrust.store import base, follow, manifest

log = logging.getLogger(__name__)

CLUSTER_KIND = "KubernetesCluster"
CLUSTER_API = "admin.gloo.solo.io/v2"
TOKEN_KIND = "BootstrapToken"
TOKEN_API = "meshtrust.io/v1"
TOKEN_PREFIX = "mt1"
DEFAULT_TOKEN_TTL = dt.timedelta(hours=1)
# How long the key a token was used with may use it again; None: until the token expires.
# A busy server may keep an agent whose reply was lost waiting for many minutes (it is told
# when to come back), so a fixed short window would lock it out; the key must match.
DEFAULT_RETRY_WINDOW: dt.timedelta | None = None
REPORT_FRESH = dt.timedelta(minutes=1)  # an unchanged report refreshes lastSeen this often
_CAS_ATTEMPTS = 5


def _digest(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(raw).hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
    """A registered cluster as the registry reports it."""

    name: str
    registered: dt.datetime | None
    last_seen: dt.datetime | None
    client_serial: str | None
    client_not_after: dt.datetime | None
    connected: bool
    record: base.Resource | None = dataclasses.field(default=None, repr=False, compare=False)
    """The stored record this was read from: the first guess of an edit of its status
    (``Registry.seen``), which saves reading it again."""

    @classmethod
    def of(cls, resource: base.Resource) -> Cluster:
        status = resource.status
        client = status.get("clientCertificate")
        if not isinstance(client, dict):  # a damaged or hand-edited record reads as none
            client = {}
        return cls(name=resource.name,
                   registered=manifest.read_time(resource.spec.get("registeredAt")),
                   last_seen=manifest.read_time(status.get("lastSeen")),
                   client_serial=client.get("serial"),
                   client_not_after=manifest.read_time(client.get("notAfter")),
                   connected=bool(status.get("connected")), record=resource)


_Holding = tuple[frozenset[str], bool]


class Members(follow.Index[_Holding]):
    """The registered clusters and who holds their streams, kept in memory from the
    store's watch (``follow.Index``).

    A round over the fleet that needs only the names (which clusters a policy
    selects) would otherwise parse ten thousand cluster records for them each time,
    and the leader's sweep of stopped replicas (``stale``) would read them all once a
    minute to find the few that name one. Until filled, ``names``, ``connected`` and
    ``stale`` are None: ask the store.
    """

    @property
    def connected(self) -> list[str] | None:
        """The clusters with a stream to any replica, by name."""
        known = self._known
        return None if known is None else sorted(
            name for name, (_, (_, flag)) in known.items() if flag)

    def stale(self, live: Collection[str]) -> list[str] | None:
        """The clusters whose record ``Registry.forget_replicas(live)`` would change."""
        known, live = self._known, frozenset(live)
        return None if known is None else sorted(
            name for name, (_, (held, flag)) in known.items() if _stale(held, flag, live))

    def summarize(self, resource: base.Resource) -> _Holding:
        """The replicas holding the cluster's streams, and its flag (one copy of each)."""
        status = resource.status
        return self.share((frozenset(_held_by(status)), bool(status.get("connected"))))



def _keeps(replica: str, live: Collection[str] | None, gone: Collection[str]) -> bool:
    """Whether the sweep keeps a connection that ``replica`` holds."""
    return (live is None or replica in live) and replica not in gone


def _stale(held: Collection[str], connected: bool, live: Collection[str] | None,
           gone: Collection[str] = ()) -> bool:
    """Whether a status held by ``held`` (and saying ``connected``) names a replica that
    is not ``live`` or is ``gone``; with ``live``, a flag that disagrees with ``held``
    (an older single-replica server's, or a hand edit) is stale too."""
    kept = sum(1 for replica in held if _keeps(replica, live, gone))
    return kept != len(held) or (live is not None and bool(kept) != connected)


def _held_by(status: dict[str, Any]) -> dict[str, str]:
    """The server replicas holding one of the cluster's work streams, with since when."""
    found = status.get("connections")
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _connections(status: dict[str, Any], held: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {**status, "connections": held, "connected": bool(held), **extra}


def _unknown(name: str) -> errors.UnknownCluster:
    return errors.UnknownCluster(f"cluster {name!r} is not registered; register it with "
                                 f"`meshtrust cluster register {name}`")


def check_cluster_name(name: str) -> str:
    """Return ``name`` if it can name a cluster; raise ConfigError otherwise."""
    if (not identity.is_dns_name(name) or "." in name or "*" in name or len(name) > 63
            or name != name.lower()):
        raise errors.ConfigError(
            f"cluster name {name!r} is invalid; use lower-case letters, digits and dashes, "
            "such as cluster-1")
    return name


class Registry:
    """Registers clusters, mints and consumes their tokens, records what agents report."""

    def __init__(self, store: base.Store, clock: clock_module.Clock, *,
                 namespace: str = settings.RELAY_NAMESPACE,
                 retry_window: dt.timedelta | None = DEFAULT_RETRY_WINDOW,
                 audit: audit_module.AuditLog | None = None) -> None:
        self._store = store
        self._clock = clock
        self._ns = namespace
        self._retry_window = retry_window
        # On by default: without one given, actions are recorded as the operator's.
        self.audit = audit or audit_module.AuditLog(store, clock, namespace=namespace)

    # -- clusters ---------------------------------------------------------------------------

    async def register(self, name: str) -> Cluster:
        """Register ``name``; registering a registered cluster changes nothing."""
        check_cluster_name(name)
        try:
            resource = await self._store.create(base.Resource(
                api_version=CLUSTER_API, kind=CLUSTER_KIND, namespace=self._ns, name=name,
                spec={"registeredAt": manifest.dump_time(self._clock.now())}))
        except errors.AlreadyExists:
            resource = await self._store.get_resource(CLUSTER_KIND, self._ns, name)
        else:
            await self.audit.record(audit_module.Kind.REGISTER, cluster=name,
                                    message="registered")
        return Cluster.of(resource)

    @property
    def namespace(self) -> str:
        """Where the cluster records are kept."""
        return self._ns

    async def get(self, name: str) -> Cluster:
        """The registered cluster ``name``; raise UnknownCluster if it is not registered."""
        try:
            return Cluster.of(await self._store.get_resource(CLUSTER_KIND, self._ns, name))
        except (errors.NotFound, ValueError):  # ValueError: not even a valid object name
            raise _unknown(name) from None

    async def records(self) -> list[base.Resource]:
        """The stored cluster records, as they are (``Members.fill`` takes them)."""
        return await self._store.list_resources(CLUSTER_KIND, namespace=self._ns)

    async def list(self) -> list[Cluster]:
        return sorted((Cluster.of(r) for r in await self.records()), key=lambda c: c.name)

    async def deregister(self, name: str) -> None:
        """Remove ``name`` and its unused tokens; its certificates are refused from now on."""
        try:
            await self._store.delete(CLUSTER_KIND, self._ns, name)
        except (errors.NotFound, ValueError):  # ValueError: not even a valid object name
            refusal = errors.UnknownCluster(f"cluster {name!r} is not registered")
            await self.audit.refused(audit_module.Kind.DEREGISTER, refusal, cluster=name)
            raise refusal from None
        removed = 0
        for token in await self._store.list_resources(TOKEN_KIND, namespace=self._ns,
                                                      labels={"cluster": name}):
            try:
                await self._store.delete(TOKEN_KIND, self._ns, token.name)
                removed += 1
            except errors.NotFound:
                pass
        await self.audit.record(audit_module.Kind.DEREGISTER, cluster=name,
                                message=f"deregistered, its certificates refused from now on; "
                                        f"{removed} unused token(s) removed")

    async def update_status(self, name: str, **changes: Any) -> None:
        """Merge ``changes`` into the cluster's status (retrying lost compare-and-swaps)."""
        await self._edit_status(name, lambda status: {**status, **changes})

    # -- connections ------------------------------------------------------------------------
    #
    # Several server replicas may each hold work streams: status.connections maps each
    # replica holding one of the cluster's streams to when it opened, and
    # status.connected says whether any does. A replica edits only its own entry; the
    # leader removes the entries of replicas that died without closing them.

    async def connect(self, name: str, replica: str, *,
                      report: dict[str, Any] | None = None) -> None:
        """Record that server replica ``replica`` holds a work stream of ``name``, and what
        its agent reported with it (merged into the status as ``reported`` does), in one
        write; raise UnknownCluster if it is not registered."""
        now = manifest.dump_time(self._clock.now())
        if not await self._edit_status(name, lambda status: _connections(
                {**status, **(report or {})}, {**_held_by(status), replica: now},
                lastSeen=now)):
            raise _unknown(name)

    async def disconnect(self, name: str, replica: str) -> None:
        """Record that server replica ``replica`` holds no work stream of ``name`` any more."""
        await self._edit_status(name, lambda status: _connections(status, {
            held: since for held, since in _held_by(status).items() if held != replica}))

    async def forget_replicas(self, live: Collection[str] | None = None, *,
                              gone: Collection[str] = (),
                              among: Collection[str] | None = None) -> tuple[str, ...]:
        """Drop the connections of replicas not in ``live`` or in ``gone``.

        Returns the clusters changed. With ``live``, a status that says connected
        with no replica named (as a single-replica server wrote it) is stale too.
        ``among``: only these clusters can be stale (``Members.stale``); without it,
        every cluster record is read.
        """
        def kept(status: dict[str, Any]) -> dict[str, str]:
            return {held: since for held, since in _held_by(status).items()
                    if _keeps(held, live, gone)}

        def stale(status: dict[str, Any]) -> bool:
            return _stale(_held_by(status), bool(status.get("connected")), live, gone)

        if among is None:
            listed = await self._store.list_resources(CLUSTER_KIND, namespace=self._ns)
            among = [resource.name for resource in listed if stale(resource.status)]
        changed = []
        for name in among:
            edited = False

            def forget(current: dict[str, Any]) -> dict[str, Any]:
                nonlocal edited
                edited = stale(current)
                return _connections(current, kept(current)) if edited else current

            try:
                if await self._edit_status(name, forget) and edited:
                    changed.append(name)
            except errors.Conflict as exc:  # the others are still swept; a sweep comes again
                log.warning("cannot drop stopped replicas' streams from cluster %s: %s",
                            name, exc)
        return tuple(changed)

    async def _edit_status(self, name: str,
                           edit: Callable[[dict[str, Any]], dict[str, Any]],
                           read: Cluster | None = None) -> bool:
        """Replace the cluster's status by ``edit(status)``, retrying lost compare-and-swaps.

        ``read``: the cluster as the caller read it, tried first instead of reading it
        again (if it changed since, the compare-and-swap fails and it is read anew).
        Returns False if the cluster is not registered (or ``name`` cannot name one);
        raises Conflict if every attempt lost its compare-and-swap (nothing was written).
        """
        guess = read.record if read is not None and read.name == name else None
        for _ in range(_CAS_ATTEMPTS):
            try:
                resource = guess or await self._store.get_resource(CLUSTER_KIND, self._ns, name)
            except (errors.NotFound, ValueError):  # ValueError: not even a valid object name
                return False
            guess = None
            status = edit(dict(resource.status))
            if status == resource.status:
                return True
            try:
                await self._store.update_status(dataclasses.replace(resource, status=status))
                return True
            except errors.Conflict:
                continue
            except errors.NotFound:
                return False
        raise errors.Conflict(f"the status of cluster {name!r} changed {_CAS_ATTEMPTS} times "
                              "while it was being edited, so the edit was not made; try "
                              "again")

    async def seen(self, name: str, *, min_interval: dt.timedelta = dt.timedelta(seconds=5),
                   read: Cluster | None = None, **changes: Any) -> None:
        """Record that the cluster's agent called: ``changes`` at once, lastSeen alone at
        most once per ``min_interval``. Raise UnknownCluster if it is not registered.

        ``read``: the cluster as the caller read it during the call (``get``).
        """
        await self.reported(name, fresh_for=dt.timedelta(0) if changes else min_interval,
                            read=read, **changes)

    async def reported(self, name: str, *, fresh_for: dt.timedelta = REPORT_FRESH,
                       read: Cluster | None = None, **report: Any) -> None:
        """Record what the cluster's agent reports (``report`` merged into the status).

        A report that says what the status already says is written only when
        lastSeen is older than ``fresh_for``: ten thousand agents reporting every
        30 s would otherwise write hundreds of unchanged statuses a second.
        Raise UnknownCluster if the cluster is not registered.
        """
        now = self._clock.now()
        stamp = manifest.dump_time(now)

        def edit(status: dict[str, Any]) -> dict[str, Any]:
            merged = {**status, **report}
            last = manifest.read_time(status.get("lastSeen"))
            if merged == status and last is not None and now - last < fresh_for:
                return status
            return {**merged, "lastSeen": stamp}

        if not await self._edit_status(name, edit, read):
            raise _unknown(name)

    # -- tokens -----------------------------------------------------------------------------

    async def create_token(self, cluster: str, ttl: dt.timedelta = DEFAULT_TOKEN_TTL) -> str:
        """Mint a single-use token for ``cluster``; only its hash is stored."""
        await self.get(cluster)
        if ttl <= dt.timedelta(0):
            raise errors.ConfigError("token lifetime must be positive")
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        expires = self._clock.now() + ttl
        await self._store.create(base.Resource(
            api_version=TOKEN_API, kind=TOKEN_KIND, namespace=self._ns,
            name=f"{cluster}.{token_id}", labels={"cluster": cluster},
            spec={"cluster": cluster, "sha256": _digest(secret),
                  "expiresAt": manifest.dump_time(expires)}))
        # The token's public id only; recorded before the token is handed out.
        await self.audit.record(audit_module.Kind.TOKEN, cluster=cluster,
                                message=f"token {token_id} minted, single-use, expires "
                                        f"{manifest.dump_time(expires)}")
        return f"{TOKEN_PREFIX}.{token_id}.{secret}"

    @staticmethod
    def is_cluster_token(token: str) -> bool:
        parts = token.split(".")
        return len(parts) == 3 and parts[0] == TOKEN_PREFIX

    async def consume_token(self, cluster: str, token: str, key_fingerprint: str) -> None:
        """Accept ``token`` for ``cluster`` and a key, once; raise AuthError otherwise."""
        rejected = errors.AuthError(f"identity token rejected for cluster {cluster!r}")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise rejected
        _, token_id, secret = parts
        name = f"{cluster}.{token_id}"
        for _ in range(_CAS_ATTEMPTS):
            try:
                resource = await self._store.get_resource(TOKEN_KIND, self._ns, name)
            except (errors.NotFound, ValueError):
                raise rejected from None
            spec, status = resource.spec, resource.status
            if not hmac.compare_digest(str(spec.get("sha256", "")), _digest(secret)):
                raise rejected
            now = self._clock.now()
            expires = manifest.read_time(spec.get("expiresAt"))
            if expires is None or now >= expires:
                raise errors.AuthError(
                    f"identity token for cluster {cluster!r} expired; mint a new one with "
                    f"`meshtrust cluster token {cluster}`")
            consumed = manifest.read_time(status.get("consumedAt"))
            if consumed is not None:
                same_key = hmac.compare_digest(str(status.get("keySha256", "")),
                                               key_fingerprint)
                if same_key and (self._retry_window is None
                                 or now < consumed + self._retry_window):
                    return
                raise errors.AuthError(
                    f"identity token for cluster {cluster!r} was already used; mint a new one "
                    f"with `meshtrust cluster token {cluster}`")
            try:
                await self._store.update_status(dataclasses.replace(
                    resource, status={"consumedAt": manifest.dump_time(now),
                                      "keySha256": key_fingerprint}))
                return
            except errors.Conflict:
                continue
            except errors.NotFound:
                raise rejected from None
        raise rejected
