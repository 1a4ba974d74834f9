"""Runs the real openssl command line against what meshtrust issued."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

from cryptography import x509

from meshtrust.pki import bundle


def run(*args: str | Path, check: bool = True, input: bytes | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``openssl ARGS`` and return the completed process (text output)."""
    proc = subprocess.run(["openssl", *map(str, args)], input=input.decode() if input else None,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))} failed:\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(bundle.dump_certificates(certs))
    return path


def verify(tmp: Path, cert: x509.Certificate, root: x509.Certificate,
           intermediates: tuple[x509.Certificate, ...] = (), *, purpose: str | None = None,
           check: bool = True, at: dt.datetime | None = None) -> subprocess.CompletedProcess[str]:
    """``openssl verify -CAfile root -untrusted intermediates cert``; validity is checked
    at ``at`` (``-attime``) when given, else at the real time."""
    args: list[str | Path] = ["verify", "-CAfile", write_pem(tmp / "root.pem", root)]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    if intermediates:
        args += ["-untrusted", write_pem(tmp / "untrusted.pem", *intermediates)]
    if purpose:
        args += ["-purpose", purpose]
    args.append(write_pem(tmp / "cert.pem", cert))
    return run(*args, check=check)


def text(tmp: Path, cert: x509.Certificate) -> str:
    """``openssl x509 -noout -text`` of ``cert``."""
    return run("x509", "-noout", "-text", "-in", write_pem(tmp / "text.pem", cert)).stdout


def extensions(text_output: str) -> dict[str, tuple[bool, str]]:
    """The X509v3 extensions openssl printed: name → (critical, value)."""
    found: dict[str, tuple[bool, str]] = {}
    lines = text_output.splitlines()
    inside = False
    current: str | None = None
    for line in lines:
        if line.strip() == "X509v3 extensions:":
            inside = True
            continue
        if not inside:
            continue
        if line.strip().startswith("Signature Algorithm"):
            break
        match = re.match(r"^\s{12}(X509v3 [^:]+|[A-Za-z][^:]+):\s*(critical)?\s*$", line)
        if match:
            current = match.group(1).strip()
            found[current] = (match.group(2) == "critical", "")
        elif current is not None:
            critical, value = found[current]
            found[current] = (critical, (value + " " + line.strip()).strip())
    return found
