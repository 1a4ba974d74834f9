"""The audit log: who did what to the fleet's trust, one record per action.

Every bootstrap, issuance, renewal, deregistration, registration, token
minting, policy change and root-rotation step writes one ``Record``. The
records live in the management store itself, one ``AuditEvent`` resource
each (``meshtrust.io/v1``, named by a time-sortable unique id), so the server
and the command line share one log that survives restarts and goes wherever
the store goes (backends, replicas). The server can also append every record
it writes to a JSON-lines file, fsynced.

A record cannot carry a secret: its fields are explicit (names, a profile, a
serial, a SHA-256 fingerprint, a policy, a step) and each is checked against
what it may hold; there is no free-form mapping. The one free text, the
message, is built from safe values, and is refused if it holds anything that
looks like key material or a token (``safe_message``). So a private key, a
CSR body, a token or a passphrase has nowhere to go.

What happens when the store cannot take a record: an action that succeeded is
not reported as done until its record is written (``record`` raises
``errors.StoreUnavailable`` and the caller fails the request: the certificate
or token is not handed out). A refusal is recorded on a best-effort basis
(``refused`` logs a failure and never raises), so a broken store does not
change the answer a refused caller gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import getpass
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.pki import bundle, profiles
from meshtrust.store import base, manifest

log = logging.getLogger(__name__)

KIND = "AuditEvent"
API = "meshtrust.io/v1"
SERVER = "server"        # the server's own loops (reconcile, start-up)
OPERATOR = "operator"    # a person at the command line
ANONYMOUS = "anonymous"  # a bootstrap caller whose token was not accepted
DEFAULT_RETENTION = dt.timedelta(days=90)
DEFAULT_MAX_EVENTS = 100_000
MESSAGE_LIMIT = 300
_PRUNE_BATCH = 256
_NAME_ATTEMPTS = 3

_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_USER_RE = re.compile(r"[A-Za-z0-9_][-A-Za-z0-9._]{0,63}")
_PEER_RE = re.compile(r"[-0-9A-Za-z.:%\[\]]{1,80}")
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
_FINGERPRINT_RE = re.compile(r"([0-9A-F]{2}:){31}[0-9A-F]{2}")
_STEP_RE = re.compile(r"[A-Z][A-Z_]{0,31}")
_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{6}-[0-9a-f]{8}")
# What a message may not hold: PEM blocks (keys, CSRs), bootstrap tokens, and long
# mixed-case base64-like runs (the shared token, key bodies, passphrases).
_PEM_RE = re.compile(r"-----BEGIN.*?(-----END[^-]*-----|$)", re.S)
_TOKEN_RE = re.compile(r"mt1\.[0-9A-Za-z]+\.[-0-9A-Za-z_]+")
_RUN_RE = re.compile(r"[-A-Za-z0-9+/=_]{24,}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
REDACTED = "[redacted]"


class Kind(enum.Enum):
    """What happened."""

    BOOTSTRAP = "bootstrap"    # a token exchanged for a relay client certificate
    ISSUE = "issue"            # a certificate made: relay server or CA, Istio root or intermediate
    RENEW = "renew"            # a relay client certificate renewed over mTLS
    DEREGISTER = "deregister"  # a cluster removed: its certificates are refused from then on
    REGISTER = "register"      # a cluster added to the registry
    TOKEN = "token"            # a bootstrap token minted (never the token itself)
    POLICY = "policy"          # a trust policy applied
    ROTATION = "rotation"      # a root-rotation step: start, advance, rollback


class Outcome(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # the caller was not allowed, or asked for something invalid
    ERROR = "error"      # meshtrust or a backend failed


def safe_message(text: str) -> str:
    """``text`` with key material, tokens and control characters cut out, bounded in length."""
    text = _PEM_RE.sub(REDACTED, text)
    text = _TOKEN_RE.sub(REDACTED, text)
    text = _RUN_RE.sub(_redact_opaque, text)
    text = _CONTROL_RE.sub(" ", text)
    if len(text) > MESSAGE_LIMIT:
        text = text[:MESSAGE_LIMIT - 1] + "…"
    return text


def _redact_opaque(match: re.Match[str]) -> str:
    """A long run with upper- and lower-case letters is not a name we write: cut it."""
    run = match.group()
    if any(c.isupper() for c in run) and any(c.islower() for c in run):
        return REDACTED
    return run


def reason(exc: BaseException) -> str:
    """The message of a refusal: the error's own text, made safe."""
    return safe_message(str(exc) or type(exc).__name__)


def outcome_of(exc: BaseException) -> Outcome:
    """Refused when the caller or its input was wrong; error when meshtrust or a backend failed."""
    if isinstance(exc, (errors.AuthError, errors.PKIError, errors.ConfigError)):
        return Outcome.REFUSED
    return Outcome.ERROR


def os_user() -> str | None:
    """The name of the user running this process, if it is a plain name."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):
        return None
    return name if _USER_RE.fullmatch(name) else None


def _check(value: str | None, pattern: re.Pattern[str], field: str) -> None:
    if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
        raise ValueError(f"audit record {field}: {value!r} is not allowed here")


def _or_none(value: str | None, pattern: re.Pattern[str]) -> str | None:
    """``value`` if it passes ``pattern``; for fields taken from untrusted requests."""
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """One audit record. Every field is checked; none can hold a key, a CSR or a token."""

    time: dt.datetime
    event: Kind
    outcome: Outcome
    actor: str                       # a cluster's name, "operator", "server" or "anonymous"
    id: str | None = None            # the stored AuditEvent's name, once written
    user: str | None = None          # the OS user, for an operator
    peer: str | None = None          # the caller's address, for a bootstrap
    cluster: str | None = None
    profile: str | None = None       # a certificate profile, such as relay-client
    serial: str | None = None        # lower-case hex
    fingerprint: str | None = None   # SHA-256 of the certificate, as openssl prints it
    policy: str | None = None
    step: str | None = None          # a root-rotation step, such as REISSUING
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "time", clock_module.require_utc(self.time, "time"))
        if not isinstance(self.event, Kind) or not isinstance(self.outcome, Outcome):
            raise ValueError("audit record event and outcome must be a Kind and an Outcome")
        _check(self.actor, _LABEL_RE, "actor")
        _check(self.id, _ID_RE, "id")
        _check(self.user, _USER_RE, "user")
        _check(self.peer, _PEER_RE, "peer")
        _check(self.cluster, _LABEL_RE, "cluster")
        if self.profile is not None and self.profile not in profiles.PROFILES:
            raise ValueError(f"audit record profile: {self.profile!r} is not a profile")
        _check(self.serial, _SERIAL_RE, "serial")
        _check(self.fingerprint, _FINGERPRINT_RE, "fingerprint")
        if self.policy is not None:
            base.check_name(self.policy, "policy")
        _check(self.step, _STEP_RE, "step")
        if not isinstance(self.message, str) or safe_message(self.message) != self.message:
            raise ValueError("audit record message: it may not hold key material, tokens or "
                             f"control characters, nor pass {MESSAGE_LIMIT} characters; build "
                             "it from names and serials")

    def document(self) -> dict[str, Any]:
        """The record as one JSON object: every field, in a fixed order (absent ones null)."""
        return {"time": manifest.dump_time(self.time), "event": self.event.value,
                "outcome": self.outcome.value, "actor": self.actor, "user": self.user,
                "cluster": self.cluster, "profile": self.profile, "serial": self.serial,
                "fingerprint": self.fingerprint, "policy": self.policy, "step": self.step,
                "peer": self.peer, "message": self.message, "id": self.id}

    def line(self) -> str:
        """The record as one line of JSON (no newline)."""
        return json.dumps(self.document(), separators=(",", ":"))

    @classmethod
    def load(cls, resource: base.Resource) -> Record:
        """The record an ``AuditEvent`` holds; ConfigError if it is damaged."""
        spec = resource.spec
        try:
            return cls(time=manifest.load_time(spec.get("time")), event=Kind(spec.get("event")),
                       outcome=Outcome(spec.get("outcome")), actor=spec.get("actor", ""),
                       id=resource.name, **{field: spec.get(field) for field in (
                           "user", "peer", "cluster", "profile", "serial", "fingerprint",
                           "policy", "step")}, message=spec.get("message", ""))
        except (ValueError, TypeError) as exc:
            raise errors.ConfigError(f"audit record {resource.name} is damaged: {exc}") from exc


class Sink(Protocol):
    """Somewhere else records go after the store, such as a file."""

    async def write(self, record: Record) -> None:
        """Keep ``record``; raise OSError if it cannot."""
        ...


class JsonLinesFile:
    """Appends each record to a file as one line of JSON, and fsyncs it."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def write(self, record: Record) -> None:
        await asyncio.to_thread(self._append, (record.line() + "\n").encode())

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def new_id(when: dt.datetime) -> str:
    """A unique name that sorts by time: ``20250101-120000-000123-1a2b3c4d``."""
    when = when.astimezone(dt.UTC)
    return f"{when:%Y%m%d-%H%M%S}-{when.microsecond:06d}-{secrets.token_hex(4)}"


def certificate_fields(certificate: x509.Certificate) -> dict[str, str]:
    """The serial (lower-case hex) and SHA-256 fingerprint of a certificate."""
    return {"serial": f"{certificate.serial_number:x}",
            "fingerprint": bundle.fingerprint(certificate)}


class AuditLog:
    """Writes records to the store (and any ``sinks``) on behalf of one actor.

    ``actor`` is who acts when a call names no one else: ``OPERATOR`` (the
    default, with the OS user) for the command line, ``SERVER`` for the
    server's loops. Calls an agent makes pass the cluster as the actor.
    """

    def __init__(self, store: base.Store, clock: clock_module.Clock, *,
                 actor: str = OPERATOR, user: str | None = None,
                 namespace: str = settings.RELAY_NAMESPACE, sinks: Sequence[Sink] = ()) -> None:
        _check(actor, _LABEL_RE, "actor")
        self._store = store
        self._clock = clock
        self.actor = actor
        self.user = user if user is not None or actor != OPERATOR else os_user()
        self.namespace = namespace
        self._sinks = tuple(sinks)

    async def record(self, event: Kind, *, outcome: Outcome = Outcome.OK,
                     actor: str | None = None, cluster: str | None = None,
                     profile: str | None = None, certificate: x509.Certificate | None = None,
                     policy: str | None = None, step: str | None = None, message: str = "",
                     peer: str | None = None, id: str | None = None) -> Record:
        """Write one record; raise ``errors.StoreUnavailable`` if the store refuses it.

        The caller must not report its action as done (hand out the certificate
        or token) when this raises. With ``id`` (from ``new_id``) the record is
        written once: a retry with the same ``id`` finds it stored and writes
        nothing, so an action retried on another server replica is recorded once.
        """
        now = self._clock.now()
        who = actor or self.actor
        record = Record(time=now, event=event, outcome=outcome, actor=who,
                        user=self.user if who == OPERATOR else None,
                        peer=_or_none(peer, _PEER_RE), cluster=cluster, profile=profile,
                        policy=policy, step=step, message=message, id=id,
                        **(certificate_fields(certificate) if certificate else {}))
        for attempt in range(_NAME_ATTEMPTS):
            if id is None:
                record = dataclasses.replace(record, id=new_id(now))
            try:
                await self._store.create(self._resource(record))
                break
            except errors.AlreadyExists:
                if id is not None:
                    return record  # recorded by an earlier attempt
                if attempt == _NAME_ATTEMPTS - 1:
                    raise errors.StoreUnavailable(
                        f"audit log: no free name for a record at {now}") from None
            except errors.StoreError as exc:
                raise errors.StoreUnavailable(
                    f"audit log: cannot record {event.value} ({outcome.value}"
                    f"{' for cluster ' + cluster if cluster else ''}): {exc}; the action is "
                    "not reported as done until it can be recorded") from exc
        for sink in self._sinks:
            try:
                await sink.write(record)
            except OSError as exc:
                log.error("audit log: cannot append to %s: %s (the store holds the record)",
                          getattr(sink, "path", sink), exc)
        return record

    async def refused(self, event: Kind, exc: BaseException, *, actor: str | None = None,
                      cluster: str | None = None, profile: str | None = None,
                      policy: str | None = None, step: str | None = None,
                      peer: str | None = None) -> None:
        """Record that ``event`` was refused (or failed) with ``exc``; never raises.

        Fields may come from an untrusted request: one that is not valid is left out.
        """
        try:
            await self.record(
                event, outcome=outcome_of(exc), actor=_or_none(actor, _LABEL_RE),
                cluster=_or_none(cluster, _LABEL_RE),
                profile=profile if profile in profiles.PROFILES else None,
                policy=policy if policy and _valid_name(policy) else None,
                step=_or_none(step, _STEP_RE), message=reason(exc), peer=peer)
        except (errors.MeshTrustError, ValueError) as failure:
            log.error("audit log: the refusal of %s was not recorded: %s", event.value, failure)

    def _resource(self, record: Record) -> base.Resource:
        assert record.id is not None
        document = record.document()
        spec = {key: value for key, value in document.items()
                if value is not None and value != "" and key != "id"}
        labels = {"event": record.event.value, "outcome": record.outcome.value}
        if record.cluster:
            labels["cluster"] = record.cluster
        return base.Resource(api_version=API, kind=KIND, namespace=self.namespace,
                             name=record.id, labels=labels, spec=spec)

    async def prune(self, *, max_age: dt.timedelta | None = DEFAULT_RETENTION,
                    max_events: int | None = DEFAULT_MAX_EVENTS) -> int:
        """Delete records older than ``max_age`` and all but the newest ``max_events``.

        Returns how many were deleted. Names sort by time, so the oldest go first.
        """
        listed = sorted(await self._store.list_resources(KIND, namespace=self.namespace),
                        key=lambda r: r.name)
        cutoff = self._clock.now() - max_age if max_age is not None else None
        excess = max(0, len(listed) - max_events) if max_events is not None else 0
        doomed = [r.name for index, r in enumerate(listed)
                  if index < excess or (cutoff is not None and _time_of(r) < cutoff)]
        for start in range(0, len(doomed), _PRUNE_BATCH):
            results = await asyncio.gather(*(
                self._store.delete(KIND, self.namespace, name)
                for name in doomed[start:start + _PRUNE_BATCH]), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, errors.NotFound):
                    raise result
        return len(doomed)


def _valid_name(value: str) -> bool:
    try:
        base.check_name(value)
    except ValueError:
        return False
    return True


def _time_of(resource: base.Resource) -> dt.datetime:
    """When a record was made: its time, else when it was stored."""
    return (manifest.read_time(resource.spec.get("time")) or resource.created
            or dt.datetime.min.replace(tzinfo=dt.UTC))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reading:
    """Records read back, oldest first, and the names of any that were damaged."""

    records: list[Record]
    damaged: list[str]


async def read(store: base.Store, *, namespace: str = settings.RELAY_NAMESPACE,
               since: dt.datetime | None = None, cluster: str | None = None,
               event: Kind | None = None, outcome: Outcome | None = None) -> Reading:
    """The records matching every filter given, oldest first."""
    labels = {"event": event.value} if event else {}
    if cluster:
        labels["cluster"] = cluster
    if outcome:
        labels["outcome"] = outcome.value
    records, damaged = [], []
    for resource in await store.list_resources(KIND, namespace=namespace, labels=labels):
        try:
            record = Record.load(resource)
        except errors.ConfigError:
            damaged.append(resource.name)
            continue
        if since is None or record.time >= since:
            records.append((record, resource.resource_version))
    records.sort(key=lambda pair: (pair[0].time, pair[1]))
    return Reading(records=[record for record, _ in records], damaged=sorted(damaged))


async def relay_pki_made(audit: AuditLog, store: base.Store, names: settings.SecretNames,
                         made: Sequence[str], *, how: str = "generated") -> None:
    """Record the relay secrets the server ``how`` (generated, renewed): certificates and
    the shared token; ``made`` names the secrets."""
    kinds = {names.relay_root: profiles.RELAY_ROOT.name,
             names.relay_signing: profiles.RELAY_SIGNING.name,
             names.relay_server: profiles.RELAY_SERVER.name}
    for name in made:
        where = f"{names.relay_namespace}/{name}"
        if name == names.relay_token:
            await audit.record(Kind.TOKEN, message=f"shared identity token {how} in {where}")
            continue
        secret = await store.get_secret(names.relay_namespace, name)
        pem = secret.data.get("tls.crt") or secret.data.get("ca.crt")
        certificate = bundle.load_certificate(pem, where) if pem else None
        profile = kinds.get(name)
        if certificate is not None and profile == profiles.RELAY_SIGNING.name and (
                bundle.path_length(certificate)):
            profile = profiles.SHARED_SIGNING.name  # it signs Istio CAs too
        await audit.record(Kind.ISSUE, profile=profile, certificate=certificate,
                           message=f"{how} in {where}")
