"""Issuance throughput of meshtrust.pki, compared with ``openssl speed``.

What it measures, for each CA key type (ECDSA P-256 and RSA 2048):

* A relay root and a relay signing intermediate are made with
  ``issuer.new_root`` / ``issuer.new_intermediate`` (profiles RELAY_ROOT and
  RELAY_SIGNING); the intermediate is the issuing CA.
* ``--count`` CSRs are made beforehand, each with its own key and named for
  its cluster (CN and DNS SAN ``cluster-00042``), as PEM bytes. The CSR keys
  are of the CA's key type, as in the reference openssl scripts (an RSA 2048
  hierarchy signs RSA 2048 requests); ``--csr-key`` sets one type for both
  runs instead. Making the leaf keys and CSRs is not measured.
* The relay-client path is run end to end in one thread, cycling over the
  CSRs: ``csr.load_csr(pem)`` (parse, CSR signature check, key policy), then
  ``issuer.issue_pem(request, ca, profiles.RELAY_CLIENT, now,
  subject=issuer.Subject(cluster=...))``, which gives the certificate and its
  PEM, as the server's local CA (``providers.local``) signs.
  After a ``--warmup`` it runs for ``--seconds``, split into ``--rounds``
  equal rounds; the reported rate is the median round (the split into
  load_csr / issue time per certificate is from that round too), so
  a short disturbance from another process does not decide the result. The
  round's CPU time over its wall time is printed as a check: near 1.00 means
  nothing else took the CPU.
* For reference: the raw sign rate of the CA key and the raw verify rate of
  a CSR key through the same library (``cryptography``), and
  ``openssl speed -seconds S rsa2048`` / ``ecdsap256`` (one process), run
  after each round for that round's length (at least 1 s), whose median
  sign/s is the yardstick: interleaved, both see the machine at the same
  speed when it drifts. The targets are about 75% of openssl's RSA 2048 sign
  rate and about 10% of its P-256 sign rate.

Run it from the repository root:

    .venv/bin/python bench/issue.py              # table, about 40 s
    .venv/bin/python bench/issue.py --json       # machine-readable results
    .venv/bin/python bench/issue.py --profile    # also print a cProfile summary
    .venv/bin/python bench/issue.py --csr-key ecdsa-p256   # P-256 requests for both CAs

The openssl command line and the OpenSSL inside ``cryptography`` may be
different builds; both versions are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from cryptography import __version__ as cryptography_version
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshtrust.pki import bundle, csr, issuer, keys, profiles

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)

# CA key type -> (openssl speed algorithm, label its result line starts with, target ratio)
CASES: dict[keys.KeyType, tuple[str, str, float]] = {
    keys.KeyType.EC_P256: ("ecdsap256", "256 bits ecdsa (nistp256)", 0.10),
    keys.KeyType.RSA_2048: ("rsa2048", "rsa 2048 bits", 0.75),
}

CSRList = list[tuple[bytes, str]]


@dataclass
class Round:
    issued: int
    seconds: float
    cpu_seconds: float
    load_csr: float
    issue: float

    @property
    def rate(self) -> float:
        return self.issued / self.seconds


@dataclass
class Result:
    ca_key: str
    csr_key: str
    issued_per_s: float
    load_csr_us: float
    issue_us: float
    total_us: float
    cpu_share: float
    round_rates: list[float]
    lib_sign_per_s: float
    lib_verify_per_s: float
    openssl_sign_per_s: float | None
    openssl_rounds: list[float]
    ratio: float | None
    target: float
    meets_target: bool | None = field(default=None)


def cluster_name(i: int) -> str:
    return f"cluster-{i:05d}"


def make_csrs(count: int, key_type: keys.KeyType) -> CSRList:
    """``count`` PEM CSRs, each with its own key of ``key_type``, named for its cluster."""
    out = []
    for i in range(count):
        name = cluster_name(i)
        key = keys.generate_key(key_type)
        request = csr.build_csr(key, common_name=name, names=[name])
        out.append((csr.dump_csr(request), name))
    return out


def make_ca(key_type: keys.KeyType) -> issuer.CA:
    root = issuer.new_root(key_type, profiles.RELAY_ROOT, NOW)
    return issuer.new_intermediate(key_type, root, profiles.RELAY_SIGNING, NOW)


def issue_one(ca: issuer.CA, pem: bytes, name: str) -> bytes:
    """The measured path in one piece (for the check and the profile)."""
    request = csr.load_csr(pem)
    return issuer.issue_pem(request, ca, profiles.RELAY_CLIENT, NOW,
                            subject=issuer.Subject(cluster=name))[1]


def check_output(ca: issuer.CA, csrs: CSRList) -> None:
    """Issue one certificate outside the clock: it must chain to the CA and name the cluster."""
    pem, name = csrs[0]
    cert = bundle.load_certificate(issue_one(ca, pem, name))
    cert.verify_directly_issued_by(ca.certificate)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if sans.get_values_for_type(x509.DNSName) != [name]:
        raise SystemExit(f"unexpected subjectAltName in the issued certificate: {sans}")


def issuance_round(ca: issuer.CA, csrs: CSRList, seconds: float, start_at: int = 0) -> Round:
    """Issue for ``seconds`` in one thread, timing each phase with perf_counter.

    The three timer reads per certificate cost well under 1% of it.
    """
    load_csr, issue = csr.load_csr, issuer.issue_pem
    subject_cls, profile, now = issuer.Subject, profiles.RELAY_CLIENT, NOW
    clock = time.perf_counter
    n = len(csrs)
    t_load = t_issue = 0.0
    i = start_at
    cpu_start = time.process_time()
    start = t2 = clock()
    deadline = start + seconds
    while t2 < deadline:
        pem, name = csrs[i % n]
        t0 = clock()
        request = load_csr(pem)
        t1 = clock()
        issue(request, ca, profile, now, subject=subject_cls(cluster=name))
        t2 = clock()
        t_load += t1 - t0
        t_issue += t2 - t1
        i += 1
    return Round(i - start_at, t2 - start, time.process_time() - cpu_start, t_load, t_issue)


def measure_issuance(ca: issuer.CA, csrs: CSRList, seconds: float, warmup: float,
                     rounds: int, reference: Callable[[], float | None] | None = None,
                     ) -> tuple[Round, list[float], list[float]]:
    """Warm up, then run ``rounds`` rounds; return the median round, every round's rate and
    the rates ``reference`` measured after each round.

    Running the reference (``openssl speed``) between the rounds, rather than once
    before or after them all, lets both see the same machine when its speed drifts.
    """
    if warmup > 0:
        issuance_round(ca, csrs, warmup)
    done: list[Round] = []
    measured: list[float] = []
    offset = 0
    for _ in range(rounds):
        r = issuance_round(ca, csrs, seconds / rounds, offset)
        offset += r.issued
        done.append(r)
        value = reference() if reference else None
        if value is not None:
            measured.append(value)
    ordered = sorted(done, key=lambda r: r.rate)
    return ordered[len(ordered) // 2], [r.rate for r in done], measured


def _rate(operation: Callable[[], object], seconds: float) -> float:
    clock = time.perf_counter
    for _ in range(50):
        operation()
    count, start = 0, clock()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(20):
            operation()
        count += 20
        now = clock()
    return count / (now - start)


def lib_sign_rate(key: keys.PrivateKey, seconds: float) -> float:
    """Signatures per second of ``key`` through cryptography (SHA-256 of 32 bytes)."""
    data = b"\x00" * 32
    if isinstance(key, rsa.RSAPrivateKey):
        rsa_key, pkcs1 = key, padding.PKCS1v15()
        return _rate(lambda: rsa_key.sign(data, pkcs1, hashes.SHA256()), seconds)
    ec_key, ecdsa = key, ec.ECDSA(hashes.SHA256())
    return _rate(lambda: ec_key.sign(data, ecdsa), seconds)


def lib_verify_rate(key_type: keys.KeyType, seconds: float) -> float:
    """Signature checks per second of a ``key_type`` key through cryptography (what load_csr
    does once per CSR)."""
    key, data = keys.generate_key(key_type), b"\x00" * 32
    if isinstance(key, rsa.RSAPrivateKey):
        rsa_public, pkcs1 = key.public_key(), padding.PKCS1v15()
        rsa_signature = key.sign(data, pkcs1, hashes.SHA256())
        return _rate(lambda: rsa_public.verify(rsa_signature, data, pkcs1, hashes.SHA256()),
                     seconds)
    ec_public, ecdsa = key.public_key(), ec.ECDSA(hashes.SHA256())
    ec_signature = key.sign(data, ecdsa)
    return _rate(lambda: ec_public.verify(ec_signature, data, ecdsa), seconds)


def openssl_speed(openssl: str, algorithm: str, label: str, seconds: int) -> float | None:
    """The sign/s column of ``openssl speed -seconds S ALGORITHM``, or None if unreadable."""
    proc = subprocess.run([openssl, "speed", "-seconds", str(seconds), algorithm],
                          capture_output=True, text=True, check=False)
    return parse_speed(proc.stdout, label)


def parse_speed(output: str, label: str) -> float | None:
    """Find the result line starting with ``label`` and read its sign/s column.

    The header line above it names the columns (``sign verify sign/s verify/s``;
    newer openssl adds encrypt/decrypt columns for RSA), so the column is found
    by name, counting from the right of the result line.
    """
    header: list[str] | None = None
    for line in output.splitlines():
        words = line.split()
        if "sign/s" in words:
            header = words
            continue
        if header and line.strip().startswith(label):
            values = line.strip()[len(label):].split()
            if len(values) < len(header):
                return None
            try:
                return float(values[len(values) - len(header) + header.index("sign/s")])
            except ValueError:
                return None
    return None


def openssl_cli_version(openssl: str) -> str:
    proc = subprocess.run([openssl, "version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def profile_issuance(ca: issuer.CA, csrs: CSRList, seconds: float, top: int) -> str:
    """A cProfile summary of the measured path, functions sorted by own time."""
    profiler = cProfile.Profile()
    clock = time.perf_counter
    deadline = clock() + seconds
    n, i = len(csrs), 0
    profiler.enable()
    while clock() < deadline:
        pem, name = csrs[i % n]
        issue_one(ca, pem, name)
        i += 1
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    return f"{i} certificates under the profiler\n" + out.getvalue()


def print_table(environment: dict[str, object], results: list[Result]) -> None:
    for key, value in environment.items():
        print(f"{key + ':':22}{value}")
    print()
    head = ("CA key", "CSR key", "meshtrust issued/s", "openssl sign/s", "ratio", "target",
            "load_csr µs", "issue+PEM µs", "lib sign/s")
    rows = [head]
    for r in results:
        rows.append((
            r.ca_key, r.csr_key, f"{r.issued_per_s:,.0f}",
            f"{r.openssl_sign_per_s:,.0f}" if r.openssl_sign_per_s else "-",
            f"{r.ratio:.1%}" if r.ratio is not None else "-",
            f"{r.target:.0%}", f"{r.load_csr_us:.1f}", f"{r.issue_us:.1f}",
            f"{r.lib_sign_per_s:,.0f}",
        ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                        for c, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for r in results:
        spread = ", ".join(f"{rate:,.0f}" for rate in r.round_rates)
        speeds = ", ".join(f"{rate:,.0f}" for rate in r.openssl_rounds) or "-"
        print(f"{r.ca_key}: rounds {spread} issued/s (openssl between them: {speeds} "
              f"sign/s); {r.total_us:.1f} µs per certificate; CPU time / wall time "
              f"{r.cpu_share:.2f}; {r.csr_key} CSR signature check through cryptography "
              f"{1e6 / r.lib_verify_per_s:.1f} µs")
    if any(r.cpu_share < 0.95 for r in results):
        print("note: CPU time / wall time below 0.95 means another process took CPU from "
              "this one during the median round; rerun on a quiet machine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure meshtrust.pki relay-client issuance per second in one thread "
                    "against openssl speed, for ECDSA P-256 and RSA 2048 CA keys.")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per CA key type (default 3); openssl speed runs "
                             "for as long again, a round's share after each round, at "
                             "least 1 s each")
    parser.add_argument("--rounds", type=int, default=3,
                        help="split --seconds into this many rounds and report the median "
                             "(default 3)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="warm-up before each measurement, in seconds (default 0.5)")
    parser.add_argument("--count", type=int, default=500,
                        help="number of distinct CSRs made beforehand, per CSR key type "
                             "(default 500; RSA keys take a while to make)")
    parser.add_argument("--key-type", action="append", choices=[k.value for k in CASES],
                        help="CA key type to run (repeatable; default both)")
    parser.add_argument("--csr-key", choices=[k.value for k in keys.KeyType],
                        help="key type of the CSRs for every CA (default: the CA's own)")
    parser.add_argument("--no-openssl", action="store_true",
                        help="skip openssl speed (no ratio is reported)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the path under cProfile for --seconds and print the "
                             "functions with the most own time")
    parser.add_argument("--top", type=int, default=25,
                        help="rows of the profile to print (default 25)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.count < 1 or args.seconds <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--count, --seconds and --rounds must be positive, --warmup not negative")

    key_types = [keys.KeyType(v) for v in args.key_type] if args.key_type else list(CASES)
    openssl = None if args.no_openssl else shutil.which("openssl")
    speed_seconds = max(1, round(args.seconds / args.rounds))
    log = sys.stderr if args.json else sys.stdout
    lib_seconds = min(args.seconds, 1.0)

    csrs_by_type: dict[keys.KeyType, CSRList] = {}
    results: list[Result] = []
    profiles_text: dict[str, str] = {}
    for key_type in key_types:
        algorithm, label, target = CASES[key_type]
        csr_type = keys.KeyType(args.csr_key) if args.csr_key else key_type
        if csr_type not in csrs_by_type:
            print(f"making {args.count} {csr_type.value} CSRs ...", file=log, flush=True)
            csrs_by_type[csr_type] = make_csrs(args.count, csr_type)
        csrs = csrs_by_type[csr_type]
        ca = make_ca(key_type)
        check_output(ca, csrs)
        print(f"{key_type.value}: issuing for {args.seconds:g} s"
              + (f", openssl speed -seconds {speed_seconds} {algorithm} after each round"
                 if openssl else "") + " ...", file=log, flush=True)

        def reference(algorithm: str = algorithm, label: str = label) -> float | None:
            return openssl_speed(openssl, algorithm, label, speed_seconds) if openssl else None

        median, round_rates, speeds = measure_issuance(ca, csrs, args.seconds, args.warmup,
                                                       args.rounds, reference)
        lib_sign = lib_sign_rate(ca.key, lib_seconds)
        lib_verify = lib_verify_rate(csr_type, lib_seconds)
        speed = sorted(speeds)[len(speeds) // 2] if speeds else None
        rate = median.rate
        ratio = rate / speed if speed else None
        per = 1e6 / median.issued
        results.append(Result(
            ca_key=key_type.value,
            csr_key=csr_type.value,
            issued_per_s=round(rate, 1),
            load_csr_us=round(median.load_csr * per, 1),
            issue_us=round(median.issue * per, 1),
            total_us=round(median.seconds * per, 1),
            cpu_share=round(median.cpu_seconds / median.seconds, 3),
            round_rates=[round(r, 1) for r in round_rates],
            lib_sign_per_s=round(lib_sign, 1),
            lib_verify_per_s=round(lib_verify, 1),
            openssl_sign_per_s=speed,
            openssl_rounds=speeds,
            ratio=round(ratio, 4) if ratio is not None else None,
            target=target,
            meets_target=ratio >= target if ratio is not None else None,
        ))
        if args.profile:
            profiles_text[key_type.value] = profile_issuance(ca, csrs, args.seconds, args.top)

    environment: dict[str, object] = {
        "python": platform.python_version(),
        "cryptography": cryptography_version,
        "cryptography_openssl": openssl_backend.openssl_version_text(),
        "openssl_cli": openssl_cli_version(openssl) if openssl else None,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "csrs": args.count,
    }
    if args.json:
        payload: dict[str, object] = {
            "environment": environment,
            "results": [asdict(r) for r in results],
        }
        if args.profile:
            payload["profiles"] = profiles_text
        print(json.dumps(payload, indent=2))
        return 0

    print()
    print_table(environment, results)
    for name, text in profiles_text.items():
        print(f"\nprofile, CA key {name}:\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
