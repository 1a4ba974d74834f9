"""A standalone AWS Private CA for the tests: moto's server, true to the documented API.

Run as ``python tests/pca_server_main.py --port P``; it serves real HTTP on 127.0.0.1
and prints ``ready`` once it listens.

Where moto 5.2.5 differs from the documented AWS Private CA API, in what meshtrust uses,
it is patched here before the server starts:

* SubordinateCACertificate_PathLen{0..3}/V1 get the template's extensions: critical
  CA:true with that pathlen, critical keyUsage digitalSignature + keyCertSign + cRLSign,
  SKI and AKI (moto gives them none). RootCACertificate/V1 also gets its AKI.
  EndEntityCertificate/V1 stays as moto makes it. Subject and SAN come from the CSR.
* Validity (ABSOLUTE, END_DATE, DAYS, MONTHS, YEARS) and ValidityNotBefore are honoured;
  NotBefore defaults to an hour before issuance, as AWS documents (moto: a year from now).
* SigningAlgorithm picks the digest (moto always signs with SHA-512).
* IdempotencyToken with the same CSR returns the same certificate ARN (moto ignores it).
* IssueCertificate on a CA that is not ACTIVE fails with InvalidStateException; only a
  root CA pending its certificate may issue that certificate to itself.
* GetCertificate's chain is the issuing CA's certificate and the chain imported with it
  (moto returns the issuing CA's certificate only).

The fault layer is a WSGI middleware in front of moto. ``POST /__faults`` with
``{"action": "IssueCertificate", "error": "ThrottlingException", "count": 3}`` makes the
next three IssueCertificate calls fail (``count`` null: every call; ``lose_response``:
the call reaches moto, then its answer is replaced by the error). ``DELETE /__faults``
clears them, ``GET /__counters`` reads what was seen, ``POST /__reset`` clears both.
The action is read from the X-Amz-Target header of the JSON 1.1 protocol.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import datetime as dt
import hashlib
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from moto.acmpca import models, responses
from moto.core.exceptions import JsonRESTError
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

TEMPLATE = "acm-pca:::template/"
BACKDATE = dt.timedelta(minutes=60)
DIGESTS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Counters:
    """What the fake saw, shared by the fault layer and the patched backend."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests: collections.Counter[str] = collections.Counter()
            self.backend: collections.Counter[str] = collections.Counter()
            self.issue_calls: collections.Counter[str] = collections.Counter()
            self.issued: collections.Counter[str] = collections.Counter()

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {"requests": dict(self.requests), "backend": dict(self.backend),
                    "issue_calls": dict(self.issue_calls), "issued": dict(self.issued)}


COUNTERS = Counters()
# (CA ARN, IdempotencyToken, CSR digest) -> certificate ARN: AWS's idempotency.
ISSUED_BY_TOKEN: dict[tuple[str, str, str], str] = {}


# -- where moto differs from the documented API -------------------------------------------

def _template_name(template_arn: str | None) -> str:
    if not template_arn:
        return "EndEntityCertificate/V1"  # AWS's default template
    return template_arn.split(TEMPLATE, 1)[-1]


def _key_usage_ca() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False)


_moto_extensions = models.CertificateAuthority._x509_extensions


def _extensions(self: models.CertificateAuthority, csr: x509.CertificateSigningRequest,
                template_arn: str | None) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions AWS's template definitions list, for the templates meshtrust uses."""
    name = _template_name(template_arn)
    public_key = csr.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    if name == "RootCACertificate/V1":
        found: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (_key_usage_ca(), True), (ski, False),
            (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)]
    elif name.startswith("SubordinateCACertificate_PathLen") and name.endswith("/V1"):
        path_length = int(name.removeprefix("SubordinateCACertificate_PathLen")[:-3])
        found = [(x509.BasicConstraints(ca=True, path_length=path_length), True),
                 (_key_usage_ca(), True), (ski, False),
                 (x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                  False)]
    else:
        return _moto_extensions(self, csr, template_arn)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        found.append((san.value, san.critical))
    except x509.ExtensionNotFound:
        pass
    return found


def _validity_time(validity: dict[str, Any], now: dt.datetime) -> dt.datetime:
    kind, value = validity.get("Type"), validity.get("Value")
    if kind == "ABSOLUTE":
        return dt.datetime.fromtimestamp(int(value), dt.UTC)
    if kind == "END_DATE":
        return dt.datetime.strptime(str(value), "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    if kind == "DAYS":
        return now + dt.timedelta(days=int(value))
    if kind == "MONTHS":
        months = now.month - 1 + int(value)
        return now.replace(year=now.year + months // 12, month=months % 12 + 1,
                           day=min(now.day, 28))
    if kind == "YEARS":
        return now.replace(year=now.year + int(value))
    raise JsonRESTError("ValidationException", f"unknown validity type {kind!r}")


def _imported_chain(ca: models.CertificateAuthority) -> bytes:
    """The chain imported with the CA's certificate; moto keeps it base64 as it arrived."""
    chain: Any = ca.certificate_chain
    if not chain:
        return b""
    raw = chain.encode() if isinstance(chain, str) else bytes(chain)
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _check_state(ca: models.CertificateAuthority, template: str) -> None:
    if ca.status == "ACTIVE":
        return
    if (template == "RootCACertificate/V1" and ca.certificate_authority_type == "ROOT"
            and ca.status == "PENDING_CERTIFICATE"):
        return  # a new root signs its own certificate before it is installed
    raise JsonRESTError("InvalidStateException",
                        f"The certificate authority {ca.arn} is not in a valid state for "
                        "issuing certificates.")


def _issue(ca: models.CertificateAuthority, csr_pem: bytes, params: dict[str, Any]) -> str:
    template = _template_name(params.get("TemplateArn"))
    csr = x509.load_pem_x509_csr(csr_pem)
    now = dt.datetime.now(dt.UTC)
    not_after = _validity_time(params["Validity"], now)
    not_before = (_validity_time(params["ValidityNotBefore"], now)
                  if params.get("ValidityNotBefore") else now - BACKDATE)
    if not_after <= now:
        raise JsonRESTError("ValidationException", "Validity must end in the future")
    digest = str(params.get("SigningAlgorithm", "SHA256WITHRSA"))[:6]
    builder = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.issuer)
               .public_key(csr.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for extension, critical in _extensions(ca, csr, params.get("TemplateArn")):
        builder = builder.add_extension(extension, critical)
    pem = builder.sign(ca.key, DIGESTS.get(digest, hashes.SHA256)()).public_bytes(
        serialization.Encoding.PEM)
    cert_arn = f"{ca.arn}/certificate/{uuid.uuid4().hex}"
    ca.issued_certificates[cert_arn] = pem
    if template != "RootCACertificate/V1":
        chain = ca.certificate_bytes.rstrip(b"\n") + b"\n" + _imported_chain(ca)
        ca.issued_certificates_certificate_chains[cert_arn] = chain.rstrip(b"\n")
    return cert_arn


def _issue_certificate(self: responses.ACMPCAResponse) -> str:
    """IssueCertificate as documented: state check, validity, idempotency, full chain."""
    params = json.loads(self.body)
    ca = self.acmpca_backend.describe_certificate_authority(params["CertificateAuthorityArn"])
    _check_state(ca, _template_name(params.get("TemplateArn")))
    csr_pem = base64.b64decode(params["Csr"])
    token = str(params.get("IdempotencyToken") or "")
    slot = (ca.arn, token, hashlib.sha256(csr_pem).hexdigest())
    with COUNTERS.lock:
        cert_arn = ISSUED_BY_TOKEN.get(slot) if token else None
        if cert_arn is None:
            cert_arn = _issue(ca, csr_pem, params)
            COUNTERS.issued[token] += 1
            if token:
                ISSUED_BY_TOKEN[slot] = cert_arn
    return json.dumps({"CertificateArn": cert_arn})


def patch_moto() -> None:
    """Make moto's acm-pca follow the documented API where meshtrust relies on it."""
    models.CertificateAuthority._x509_extensions = _extensions
    responses.ACMPCAResponse.issue_certificate = _issue_certificate


# -- the fault layer ---------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    """What the next ``count`` calls of one action get instead of moto's answer."""

    error: str
    message: str
    status: int
    count: int | None  # None: every call
    lose_response: bool


class FaultLayer:
    """WSGI middleware: injects faults, counts calls, serves the /__ control endpoints."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.faults: dict[str, Fault] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any],
                 ) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads the body again
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__"):
            return self._control(environ["REQUEST_METHOD"], path, body, start_response)
        action = str(environ.get("HTTP_X_AMZ_TARGET", "")).rpartition(".")[2]
        fault = self._take(action)
        with COUNTERS.lock:
            COUNTERS.requests[action] += 1
        if fault is not None and not fault.lose_response:
            return _error(start_response, fault.status, fault.error, fault.message)
        with COUNTERS.lock:
            COUNTERS.backend[action] += 1
            if action == "IssueCertificate":
                COUNTERS.issue_calls[str(json.loads(body).get("IdempotencyToken") or "")] += 1
        if fault is None:
            return self.app(environ, start_response)
        answer = self.app(environ, lambda *args, **kwargs: None)
        try:
            b"".join(answer)
        finally:
            getattr(answer, "close", lambda: None)()
        return _error(start_response, fault.status, fault.error, fault.message)

    def _take(self, action: str) -> Fault | None:
        with self.lock:
            fault = self.faults.get(action)
            if fault is not None and fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    del self.faults[action]
            return fault

    def _control(self, method: str, path: str, body: bytes,
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if path == "/__faults" and method == "POST":
            spec = json.loads(body)
            with self.lock:
                self.faults[spec["action"]] = Fault(
                    error=spec.get("error", "ThrottlingException"),
                    message=spec.get("message", "Rate exceeded"),
                    status=int(spec.get("status", 400)), count=spec.get("count"),
                    lose_response=bool(spec.get("lose_response", False)))
        elif path == "/__faults" and method == "DELETE":
            with self.lock:
                self.faults.clear()
        elif path == "/__reset" and method == "POST":
            with self.lock:
                self.faults.clear()
            COUNTERS.reset()
        elif not (path == "/__counters" and method == "GET"):
            return _reply(start_response, "404 Not Found", {"error": f"no {method} {path}"})
        return _reply(start_response, "200 OK", COUNTERS.snapshot())


def _reply(start_response: Callable[..., Any], status: str, payload: object) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


def _error(start_response: Callable[..., Any], status: int, code: str,
           message: str) -> list[bytes]:
    data = json.dumps({"__type": code, "message": message}).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 429: "Too Many Requests",
              503: "Service Unavailable"}.get(status, "Error")
    start_response(f"{status} {reason}", [("Content-Type", "application/x-amz-json-1.1"),
                                          ("Content-Length", str(len(data)))])
    return [data]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    patch_moto()
    app = FaultLayer(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", args.port, app, threaded=True,
                         request_handler=MotoRequestHandler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
