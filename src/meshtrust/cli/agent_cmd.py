"""``meshtrust agent``: run the agent of one workload cluster."""

from __future__ import annotations

import argparse
import asyncio

from meshtrust.agent import app
from meshtrust.agent import config as agent_config
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.pki import keys


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "agent", help="run a workload cluster's agent",
        description="Run the agent of one workload cluster. With no client certificate and a "
                    "token in relay-identity-token-secret it bootstraps; it then holds an mTLS "
                    "connection to the server, and (on the leader replica) renews its client "
                    "certificate before expiry. A client certificate put in "
                    "relay-client-tls-secret by someone else is picked up (bring your own).")
    parser.add_argument("--cluster", required=True, help="this cluster's registered name")
    parser.add_argument("--server", required=True,
                        help="relay address host:port, or several separated by commas (server "
                             "replicas), tried in turn when one fails")
    parser.add_argument("--bootstrap-server",
                        help="bootstrap address host:port, or several separated by commas "
                             "(default: each relay address's port + 1)")
    common.add_store_option(parser, "this cluster's store")
    parser.add_argument("--server-name",
                        help="name to check in the server certificate, if not the host")
    parser.add_argument("--grace-ratio", type=float, default=0.1,
                        help="clientTlsSecretRotationGracePeriodRatio: renew when this share "
                             "of the lifetime is left (default %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.1,
                        help="renew up to this share of the grace window earlier, at random "
                             "(default %(default)s)")
    parser.add_argument("--renew-spread", type=float,
                        default=agent_config.DEFAULT_RENEW_SPREAD, metavar="SECONDS",
                        help="a renewal found overdue (after an outage, or asked by a relay "
                             "root rotation, when the whole fleet is due at once) waits a "
                             "random part of this first, and never more than a tenth of the "
                             "time the certificate has left, so that the agents do not all "
                             "call in the same second (default %(default)s)")
    parser.add_argument("--bootstrap-spread", type=float,
                        default=agent_config.DEFAULT_BOOTSTRAP_SPREAD, metavar="SECONDS",
                        help="an agent with no usable client certificate waits a random part "
                             "of this before its first bootstrap. Leave it at 0 for one "
                             "cluster; when the agent is rolled out to many clusters at once, "
                             "set about the fleet's size divided by the server's bootstrap "
                             "rate (a server on two cores takes 10,000 agents over 50 s), so "
                             "that the agents do not all call in the same second (default "
                             "%(default)s)")
    parser.add_argument("--key-type", default="ecdsa-p256",
                        help="type of the client key (default %(default)s)")
    parser.add_argument("--replica", help="this replica's name for leader election "
                                          "(default host-pid)")
    parser.add_argument("--lease-ttl", type=float, default=15.0,
                        help="leader lease duration in seconds (default %(default)s)")
    parser.add_argument("--status-interval", type=float,
                        default=agent_config.DEFAULT_STATUS_INTERVAL,
                        help="seconds between status reports when nothing changed; the agent "
                             "also reports as soon as its client certificate or its Istio CA "
                             "changes (default %(default)s)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    parser.add_argument("--simulate-pods", action="store_true",
                        help="keep simulated istiod, gateway and workload pods in the store "
                             "(for the local demo; a Kubernetes pod interface comes later)")
    parser.add_argument("--bounce-dry-run", action="store_true",
                        help="on a new Istio CA, log which pods would restart; restart none")
    parser.add_argument("--no-rotate", action="store_true",
                        help="never renew: the client certificate is managed elsewhere")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext relay, for a server started with --insecure")
    common.add_log_option(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace, out: Output) -> int:
    extra = {"replica": args.replica} if args.replica else {}
    config = agent_config.AgentConfig(
        cluster=args.cluster, server=args.server, store=common.store_url(args),
        bootstrap_server=args.bootstrap_server, server_name=args.server_name,
        insecure=args.insecure, grace_ratio=args.grace_ratio, jitter=args.jitter,
        renew_spread=args.renew_spread, bootstrap_spread=args.bootstrap_spread,
        key_type=keys.KeyType.parse(args.key_type), lease_ttl=args.lease_ttl,
        status_interval=args.status_interval, rotate=False if args.no_rotate else None,
        metrics=args.metrics, simulate_pods=args.simulate_pods,
        bounce_dry_run=args.bounce_dry_run,
        **extra)
    common.setup_logging(args.log_level)
    if args.insecure:
        out.warn("insecure mode: the relay is plaintext")
    asyncio.run(app.run(config))
    return 0
