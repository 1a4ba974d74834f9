"""A throwaway PostgreSQL server, so store tests run against the real thing.

The server comes from Debian's ``postgresql`` package (``scripts/system-deps``
installs it). It lives in a temporary directory, listens on 127.0.0.1 and a
unix socket there, and is removed on ``stop``. PostgreSQL refuses to run as
root, so under root the directory is handed to the ``postgres`` user and the
server programs run through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile

USER = "meshtrust"
HINT = ("PostgreSQL server programs (initdb, pg_ctl) were not found under "
        "/usr/lib/postgresql/*/bin; install them with scripts/system-deps "
        "(make test does this)")


def find_bindir() -> str | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``, or None."""
    found = [path for path in glob.glob("/usr/lib/postgresql/*/bin")
             if os.path.exists(os.path.join(path, "initdb"))]
    found.sort(key=lambda path: [int(part) for part in path.split("/")[-2].split(".")
                                 if part.isdigit()])
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One PostgreSQL cluster in a temporary directory."""

    def __init__(self, *, durable: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(HINT)
        self.bindir = bindir
        self.durable = durable
        self.password = secrets.token_urlsafe(12)
        self.port = _free_port()
        self.home = tempfile.mkdtemp(prefix="meshtrust-pg-")
        self.data = os.path.join(self.home, "data")
        self.sockets = os.path.join(self.home, "sockets")
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            self._prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._prefix, *command], capture_output=True, text=True,
                                check=False, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        os.mkdir(self.sockets, 0o700)
        password_file = os.path.join(self.home, "password")
        with open(password_file, "w", encoding="ascii") as handle:
            handle.write(self.password)
        if self._prefix:
            entry = pwd.getpwnam("postgres")
            for path in (self.home, self.sockets, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", USER,
                  "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={password_file}", "--no-sync", "-E", "UTF8")
        self.resume()

    def resume(self) -> None:
        """Start the server on its data directory, port and socket (after ``halt``)."""
        options = [f"-p {self.port}", f"-k {self.sockets}", "-c listen_addresses=127.0.0.1",
                   "-c max_connections=200"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-w", "-t", "60",
                  "-l", os.path.join(self.home, "server.log"), "-o", " ".join(options), "start")

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server and keep its data, so that ``resume`` brings it back.

        ``immediate`` ends every backend at once, as a crash would; ``fast`` disconnects
        clients and shuts down cleanly.
        """
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                  "stop")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        self._run(os.path.join(self.bindir, "psql"), "-h", self.sockets, "-p", str(self.port),
                  "-U", USER, "-d", "postgres", "-q", "-v", "ON_ERROR_STOP=1",
                  "-c", f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate",
                          "-w", "stop")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
