"""Fuzzing bootstrap tokens: the registry's token parsing and the bootstrap token check.

Random and damaged tokens, for registered, deregistered, unknown and invalid
cluster names, in every token mode. Each goes to ``Registry.consume_token``
and to ``RelayAuthority.bootstrap``, each on a fresh copy of the server's
state. A token is refused with a domain error that has a message; it is
accepted only for the cluster it was minted for (or, at bootstrap, as the
shared token), and bootstrap then issues exactly a relay client certificate.
"""

from __future__ import annotations

import hashlib

from hypothesis import given

import fuzzkit
import fuzzworld
from meshtrust import errors
from meshtrust.authority import registry, relay, signers
from meshtrust.pki import csr, keys

CLUSTERS = ("c1", "c2", fuzzworld.GONE, "c3", "C1", "c1.", "", "c1.x", "*", "a" * 64, "c1\x00")
MODES = tuple(relay.TokenMode)


def token_choices(made: fuzzworld.Template) -> tuple[str, ...]:
    """The real tokens, and near misses of them."""
    prefix, token_id, secret = made.token.split(".")
    return (made.token, made.shared_token, f" {made.shared_token}\n", made.token.upper(),
            f"{prefix}.{token_id}.", f"{prefix}..{secret}", f"{prefix}.{token_id}.{secret}.",
            f"{prefix}.x.{secret}", f"{prefix}.{token_id}.{secret[:-1]}",
            f"mt2.{token_id}.{secret}", f"{prefix}.{token_id}.{secret}\x00", ".", "", "mt1..")


def pick_token(pick: fuzzkit.Picker, choices: tuple[str, ...]) -> str:
    kind = pick.integer(0, 3)
    if kind == 0:
        return str(pick.choice(choices))
    if kind == 1:
        return pick.text(80)
    if kind == 2:
        return pick.bytes(80).decode("utf-8", "replace")
    return pick.mutated([t.encode() for t in choices[:2]], 3,
                        structured=False).decode("utf-8", "replace")


class TestTokens:
    def test_tokens(self, runner: fuzzkit.Loop, made: fuzzworld.Template) -> None:
        """A token is accepted only for its own cluster, and bootstrap then issues only the
        cluster's client certificate; every other token is refused with a reason."""
        cache = signers.Signers()
        # The cheapest accepted key to verify (RSA, e=3): the token check is what is fuzzed.
        pem = fuzzworld.client_csr("c1", "rsa-2048-e3")
        key = csr.load_csr(pem).public_key
        key_print = hashlib.sha256(keys.public_key_der(key)).hexdigest()
        choices = token_choices(made)
        tally = fuzzkit.Tally()

        async def consume(cluster: str, token: str) -> str:
            world = await fuzzworld.World.fresh(made, cache)
            is_cluster_token = registry.Registry.is_cluster_token(token)
            try:
                await world.registry.consume_token(cluster, token, key_print)
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                return f"consume refused: {type(exc).__name__}"
            assert is_cluster_token
            assert (cluster, token) == ("c1", made.token), "a token was accepted for another"
            return "consumed"

        async def bootstrap(cluster: str, token: str, mode: relay.TokenMode) -> str:
            world = await fuzzworld.World.fresh(made, cache, token_mode=mode)
            try:
                issued = await world.relay.bootstrap(cluster, token, pem, peer="10.0.0.7")
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                return f"bootstrap refused: {type(exc).__name__}"
            by_cluster_token = mode is not relay.TokenMode.SHARED and token == made.token
            by_shared = (mode is not relay.TokenMode.CLUSTER
                         and token.strip() == made.shared_token.strip())
            assert cluster == "c1" and (by_cluster_token or by_shared), \
                f"bootstrap accepted token {token!r} for cluster {cluster!r} in mode {mode}"
            fuzzkit.check_relay_client(issued.certificate, cluster=cluster, ca=made.signing,
                                       public_key=key, now=fuzzworld.START,
                                       lifetime=fuzzworld.CLIENT_LIFETIME)
            return "bootstrapped"

        async def both(cluster: str, token: str, mode: relay.TokenMode) -> tuple[str, str]:
            return await consume(cluster, token), await bootstrap(cluster, token, mode)

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            kind = pick.integer(0, 7)  # mostly c1: its CSR is for c1, and its token is real
            cluster = "c1" if kind < 4 else pick.text(70) if kind == 7 else pick.choice(CLUSTERS)
            token = pick_token(pick, choices)
            mode = pick.choice(MODES)
            with fuzzkit.watchdog():
                for outcome in runner.run(both(cluster, token, mode)):
                    tally.add(outcome)

        example()
        print(f"tokens: {tally}")
        assert tally["consumed"] > 0 and tally["bootstrapped"] > 0
        assert tally["consume refused: AuthError"] > tally.total // 4
        assert tally["bootstrap refused: AuthError"] > tally.total // 10
