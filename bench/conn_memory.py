"""What one idle gRPC connection costs the server in memory, by transport.

The fleet benchmark finds about 124 KB of server RSS per connected cluster, of
which Python's heap holds only about 17 KB. This measures the rest on its own:
a bare ``grpc.aio`` server (the server options meshtrust uses, no meshtrust
code) and ``--connections`` client channels from two client processes, each
either holding one open server stream (as an agent holds its work stream) or
idle after one unary call. The server's RSS is read before the clients connect
and once all are connected; the difference divided by the connections the server
holds (counted in /proc/net) is the
figure, for each transport:

* insecure: plaintext HTTP/2;
* tls: the server authenticated (as the agents' bootstrap listener);
* mtls: both sides present P-256 certificates (as the relay listener).

``--messages N`` has each stream carry N more messages of 300 bytes, one a second,
from the server to the client, before the RSS is read (as an agent's stream carries
heartbeats and work; nothing more goes the other way): a
connection's buffers take memory only where they have been written, so one that
carried a single message shows less than it will hold.

``--option NAME=VALUE`` (repeatable) adds a gRPC channel argument to the server,
e.g. ``--option grpc.tsi.max_frame_size=4096``, to see what a setting buys. The
server maps allocations of 8 KiB or more on pages of their own, as ``meshtrust
server`` does (``--mmap-threshold``; 0 for glibc's own behaviour).
Certificates are made with the ``openssl`` command line. Run it from the
repository root:

    .venv/bin/python bench/conn_memory.py                    # about 1 minute
    .venv/bin/python bench/conn_memory.py --connections 4000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshtrust.server import config

HOST = "127.0.0.1"
TRANSPORTS = ("insecure", "tls", "mtls")
KINDS = ("stream", "unary")


def make_certificates(directory: Path) -> None:
    """A P-256 CA, and a server and a client certificate it signed."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-ca", "-days", "1",
            "-out", "ca.crt")
    for name in ("server", "client"):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
                "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text(f"subjectAltName=DNS:localhost,DNS:{name}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                "-out", f"{name}.crt")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def serve(directory: Path, transport: str, options: list[tuple[str, Any]],
                messages: int = 0, mmap_threshold: int = 0) -> None:
    """The server: print the port, then the RSS (KiB) for each line read on stdin."""
    import grpc

    from meshtrust.rpc import transport as rpc_transport
    from meshtrust.server import app

    app.map_large_allocations(mmap_threshold)

    async def stream(_request: bytes, _context: Any) -> Any:
        yield b"x"
        for _ in range(messages):
            await asyncio.sleep(1.0)
            yield b"y" * 300
        await asyncio.Event().wait()

    async def unary(_request: bytes, _context: Any) -> bytes:
        return b"y"

    server = rpc_transport.new_server(options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Memory", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(unary)}),))
    credentials = None if transport == "insecure" else grpc.ssl_server_credentials(
        [((directory / "server.key").read_bytes(), (directory / "server.crt").read_bytes())],
        root_certificates=(directory / "ca.crt").read_bytes() if transport == "mtls" else None,
        require_client_auth=transport == "mtls")
    port = rpc_transport.add_listener(server, f"{HOST}:0", credentials)
    await server.start()
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(_rss_kib(), flush=True)
    await server.stop(0)


async def connect(directory: Path, port: int, transport: str, kind: str, count: int) -> None:
    """A client process: ``count`` channels, each with an open stream or after one call."""
    import grpc

    calls = []
    # Each channel its own connection, as each agent's: without a local subchannel
    # pool, channels of one process with the same target and settings share one.
    own = [("grpc.use_local_subchannel_pool", 1)]
    for _ in range(count):
        target = f"{HOST}:{port}"
        if transport == "insecure":
            channel = grpc.aio.insecure_channel(target, options=own)
        else:
            mutual = transport == "mtls"
            credentials = grpc.ssl_channel_credentials(
                (directory / "ca.crt").read_bytes(),
                (directory / "client.key").read_bytes() if mutual else None,
                (directory / "client.crt").read_bytes() if mutual else None)
            channel = grpc.aio.secure_channel(
                target, credentials,
                options=[*own, ("grpc.ssl_target_name_override", "localhost")])
        if kind == "stream":
            call = channel.unary_stream("/bench.Memory/Stream")(b"")
            await call.read()
            # Read what else the stream carries (--messages), as an agent reads its work
            # stream: unread, the messages would stop at HTTP/2's flow control.
            calls.append((channel, asyncio.create_task(_drain(call))))
        else:
            await channel.unary_unary("/bench.Memory/Unary")(b"")
            calls.append((channel, None))
    print("connected", flush=True)
    await asyncio.Event().wait()


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def measure(directory: Path, transport: str, kind: str, connections: int,
            options: list[tuple[str, Any]], messages: int = 0,
            mmap_threshold: int = 0) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(
        [*me, "--role", "server", "--dir", str(directory), "--transport", transport,
         "--options-json", json.dumps(options), "--messages", str(messages),
         "--mmap-threshold", str(mmap_threshold)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None

    def rss() -> int:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write("\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    clients: list[subprocess.Popen[str]] = []
    try:
        port = int(server.stdout.readline())
        time.sleep(1.0)
        before = rss()
        shares = [connections // 2, connections - connections // 2]
        clients = [subprocess.Popen(
            [*me, "--role", "client", "--dir", str(directory), "--transport", transport,
             "--kind", kind, "--port", str(port), "--connections", str(share)],
            stdout=subprocess.PIPE, text=True) for share in shares]
        for client in clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "connected":
                raise SystemExit(f"a client of the {transport} {kind} run failed")
        # Let handshakes and the first frames settle, and the streams carry their messages
        # (the last connected stream starts them last).
        time.sleep(3.0 + (messages + 1 if kind == "stream" and messages else 0))
        after = rss()
        held = established(port)
    finally:
        for client in clients:
            client.kill()
            client.wait()
        server.kill()
        server.wait()
    return {"transport": transport, "kind": kind, "connections": connections,
            "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
            "established": held,
            "kib_per_connection": round((after - before) / held, 1) if held else None}


def established(port: int) -> int:
    """TCP connections established to ``port`` (from /proc/net/tcp and tcp6: gRPC's
    sockets are IPv6 ones holding IPv4-mapped addresses)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, int(value) if value.lstrip("-").isdigit() else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000,
                        help="client channels, from two processes (default %(default)s)")
    parser.add_argument("--transport", choices=TRANSPORTS, action="append",
                        help="measure only this transport (repeatable; default: all)")
    parser.add_argument("--kind", choices=KINDS, action="append",
                        help="stream: each channel holds an open server stream; unary: idle "
                             "after one call (repeatable; default: both)")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        metavar="NAME=VALUE", help="a gRPC channel argument for the server")
    parser.add_argument("--messages", type=int, default=0, metavar="N",
                        help="each stream carries N more messages of 300 bytes, one a second, "
                             "before the RSS is read (default %(default)s)")
    parser.add_argument("--mmap-threshold", type=int, default=config.DEFAULT_MMAP_THRESHOLD,
                        metavar="BYTES",
                        help="the server's --mmap-threshold: glibc maps allocations of at "
                             "least BYTES on pages of their own; 0 leaves glibc's own "
                             "(default %(default)s, as meshtrust server)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--options-json", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.dir, args.transport[0],
                          [tuple(o) for o in json.loads(args.options_json)], args.messages,
                          args.mmap_threshold))
        return
    if args.role == "client":
        asyncio.run(connect(args.dir, args.port, args.transport[0], args.kind[0],
                            args.connections))
        return
    if args.connections < 2:
        parser.error("--connections must be at least 2")
    if args.messages < 0:
        parser.error("--messages must be 0 or more")
    import grpc

    results = []
    with tempfile.TemporaryDirectory(prefix="meshtrust-conn-") as tmp:
        directory = Path(tmp)
        make_certificates(directory)
        for transport in args.transport or TRANSPORTS:
            for kind in args.kind or KINDS:
                results.append(measure(directory, transport, kind, args.connections,
                                       args.option, args.messages, args.mmap_threshold))
    if args.json:
        print(json.dumps({"grpcio": grpc.__version__, "options": args.option,
                          "messages": args.messages, "mmap_threshold": args.mmap_threshold,
                          "results": results}, indent=2))
        return
    print(f"grpcio {grpc.__version__}; server options added: {args.option or 'none'}; "
          f"messages per stream after the first: {args.messages}; mmap threshold: "
          f"{args.mmap_threshold or 'glibc'}")
    print(f"{'transport':<10} {'connection':<11} {'connections':>11} "
          f"{'established':>11} {'server RSS before → after':>27} "
          f"{'KiB per connection':>19}")
    for r in results:
        print(f"{r['transport']:<10} {r['kind']:<11} {r['connections']:>11,} "
              f"{r['established']:>11,} "
              f"{r['rss_before_mib']:>12.1f} → {r['rss_after_mib']:>7.1f} MiB "
              f"{r['kib_per_connection']:>19.1f}")


if __name__ == "__main__":
    main()
