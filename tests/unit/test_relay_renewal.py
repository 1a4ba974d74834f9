"""Automatic renewal of the server certificate and signing CA, and warnings instead."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging

import pytest

from meshtrust import errors, settings
from meshtrust.authority import registry, relay_pki, relay_renewal, relay_rotation, signers
from meshtrust.pki import bundle
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NS = settings.RELAY_NAMESPACE
SERVER, SIGNING = settings.RELAY_SERVER_SECRET, settings.RELAY_SIGNING_SECRET
SERVER_LIFE, SIGNING_LIFE = dt.timedelta(seconds=100), dt.timedelta(seconds=1000)


async def _setup() -> tuple[MemoryStore, FakeClock, relay_renewal.RelayRenewal]:
    store, clock = MemoryStore(), FakeClock(START)
    await relay_pki.ensure(store, clock, relay_pki.Options(server_lifetime=SERVER_LIFE,
                                                           signing_lifetime=SIGNING_LIFE))
    renewal = relay_renewal.RelayRenewal(store, clock, signers.Signers(), relay_renewal.Options(
        grace_ratio=0.5, server_lifetime=SERVER_LIFE, signing_lifetime=SIGNING_LIFE))
    return store, clock, renewal


async def _serial(store: base.Store, name: str) -> int:
    secret = await store.get_secret(NS, name)
    return bundle.load_certificates(secret.data["tls.crt"])[0].serial_number


async def _signer(store: base.Store) -> signers.local.LocalProvider:
    return signers.Signers().local(await store.get_secret(NS, SIGNING))


def test_each_is_renewed_at_its_time_with_a_new_key() -> None:
    async def go() -> None:
        store, clock, renewal = await _setup()
        server, signing = await _serial(store, SERVER), await _serial(store, SIGNING)
        old_key = (await store.get_secret(NS, SIGNING)).data["tls.key"]
        assert await renewal.check(await _signer(store)) == []
        clock.advance(dt.timedelta(seconds=60))  # past half the server certificate's life
        assert await renewal.check(await _signer(store)) == [SERVER]
        renewed = await store.get_secret(NS, SERVER)
        assert await _serial(store, SERVER) != server and await _serial(store, SIGNING) == signing
        cert = bundle.load_certificates(renewed.data["tls.crt"])[0]
        assert cert.not_valid_after_utc - clock.now() == SERVER_LIFE
        clock.advance(dt.timedelta(seconds=500))  # past half the signing CA's life
        assert SIGNING in await renewal.check(await _signer(store))
        new_signing = await store.get_secret(NS, SIGNING)
        assert await _serial(store, SIGNING) != signing
        assert new_signing.data["tls.key"] != old_key
        # The new signing CA is under the same root, so nothing else needs to change.
        chain = signers.ca_from_secret(new_signing)
        root = bundle.load_certificate((await store.get_secret(
            NS, settings.RELAY_ROOT_SECRET)).data["ca.crt"])
        assert chain.root == root

    asyncio.run(go())


def test_brought_certificates_and_the_root_are_only_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        store, clock, renewal = await _setup()
        brought = await store.get_secret(NS, SERVER)
        await store.update(dataclasses.replace(brought, labels={}))
        serial = await _serial(store, SERVER)
        clock.advance(dt.timedelta(seconds=60))
        with caplog.at_level(logging.WARNING):
            assert await renewal.check(await _signer(store)) == []
            assert await renewal.check(await _signer(store)) == []
        assert await _serial(store, SERVER) == serial
        warnings = [r.getMessage() for r in caplog.records if SERVER in r.getMessage()]
        assert len(warnings) == 1 and "brought" in warnings[0]  # once per certificate
        caplog.clear()
        root = await store.get_secret(NS, settings.RELAY_ROOT_SECRET)
        await store.update(dataclasses.replace(root, data={"ca.crt": root.data["ca.crt"]}))
        clock.advance(dt.timedelta(days=365 * 9 + 200))  # the 10-year root is due
        with caplog.at_level(logging.WARNING):
            await renewal.check(None)
        assert not await renewal.root_due()  # its key is not here: not ours to rotate
        assert any(settings.RELAY_ROOT_SECRET in r.getMessage()
                   and "where its key is kept" in r.getMessage() for r in caplog.records)

    asyncio.run(go())


def test_a_due_relay_root_is_rotated_step_by_step() -> None:
    """With no agent to wait for, each step follows the last; the secrets end under the new root."""
    async def go() -> None:
        store, clock, renewal = await _setup()
        cache = signers.Signers()
        rotations = relay_rotation.RelayRootRotations(store, clock, registry.Registry(store, clock),
                                                      cache)
        old_root = (await store.get_secret(NS, settings.RELAY_ROOT_SECRET)).data["ca.crt"]
        assert not await renewal.root_due()
        clock.advance(dt.timedelta(days=365 * 9 + 200))
        assert await renewal.root_due()
        await rotations.start()
        adding = await store.get_secret(NS, settings.RELAY_ROOT_SECRET)
        assert len(bundle.load_certificates(adding.data["ca.crt"])) == 2  # old and new trusted
        with pytest.raises(errors.ConfigError, match="under way"):
            await rotations.start()
        seen = []
        for _ in range(3):
            await rotations.advance()
            seen.append(await rotations.step())
        assert seen == [relay_rotation.Step.REISSUING, relay_rotation.Step.DROPPING_OLD,
                        relay_rotation.Step.DONE]
        root_secret = await store.get_secret(NS, settings.RELAY_ROOT_SECRET)
        (new_root,) = bundle.load_certificates(root_secret.data["ca.crt"])
        assert root_secret.data["ca.crt"] != old_root and "new-tls.key" not in root_secret.data
        signing = signers.ca_from_secret(await store.get_secret(NS, SIGNING))
        assert signing.root == new_root
        server = bundle.load_certificates((await store.get_secret(NS, SERVER)).data["tls.crt"])
        assert bundle.issued_by(server[0], signing.certificate)
        assert not await renewal.root_due()

    asyncio.run(go())
