"""The directory store: istiod's plug-in layout, private modes, bring-your-own secrets, redo."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import stat
from collections.abc import Awaitable, Callable

import pytest

from meshtrust import errors, store
from meshtrust.store import base, files, journal

CERTS = {"ca-cert.pem": b"ca", "ca-key.pem": b"key", "root-cert.pem": b"root",
         "cert-chain.pem": b"chain"}


def run(root: pathlib.Path, scenario: Callable[[base.Store], Awaitable[None]]) -> None:
    async def main() -> None:
        opened = await store.open_store(f"dir://{root}")
        try:
            await scenario(opened)
        finally:
            await opened.close()

    asyncio.run(main())


def cacerts(**fields: object) -> base.Secret:
    return base.Secret(namespace="istio-system", name="cacerts", data=CERTS,
                       **fields)  # type: ignore[arg-type]


class TestLayout:
    def test_istiod_reads_plain_paths(self, tmp_path: pathlib.Path) -> None:
        """Each key is readable at <root>/<ns>/<name>/<key>, through the ..data symlink."""
        async def scenario(s: base.Store) -> None:
            await s.create(cacerts())
        run(tmp_path, scenario)
        folder = tmp_path / "istio-system" / "cacerts"
        assert (folder / "cert-chain.pem").read_bytes() == b"chain"
        assert os.readlink(folder / "..data").startswith("..r")
        assert os.readlink(folder / "ca-key.pem") == "..data/ca-key.pem"
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
            CERTS)

    def test_private_modes(self, tmp_path: pathlib.Path) -> None:
        """Secret files are 0600 and their directories 0700, whatever the umask."""
        old = os.umask(0)
        try:
            async def scenario(s: base.Store) -> None:
                await s.create(cacerts())
            run(tmp_path / "root", scenario)
        finally:
            os.umask(old)
        for path in (tmp_path / "root").rglob("*"):
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"

    def test_update_swaps_whole_versions(self, tmp_path: pathlib.Path) -> None:
        """An update leaves one version directory, and a removed key disappears."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(cacerts())
            await s.update(dataclasses.replace(made, data={"ca-cert.pem": b"new"}))
        run(tmp_path, scenario)
        folder = tmp_path / "istio-system" / "cacerts"
        assert sorted(p.name for p in folder.iterdir()) == ["..data", "..r2", "ca-cert.pem"]
        assert (folder / "ca-cert.pem").read_bytes() == b"new"

    def test_resources_are_manifests(self, tmp_path: pathlib.Path) -> None:
        """A resource is a Kubernetes YAML file under <ns>/_resources/<Kind>/."""
        async def scenario(s: base.Store) -> None:
            await s.create(base.Resource(api_version="coordination.k8s.io/v1", kind="Lease",
                                         namespace="gloo-mesh", name="rotator",
                                         spec={"holderIdentity": "pod-a"}))
        run(tmp_path, scenario)
        text = (tmp_path / "gloo-mesh" / "_resources" / "Lease" / "rotator.yaml").read_text()
        assert "kind: Lease" in text and "holderIdentity: pod-a" in text


class TestBringYourOwn:
    def test_plain_directory_is_a_secret(self, tmp_path: pathlib.Path) -> None:
        """Files made by hand read as an Opaque secret versioned by their modification time."""
        folder = tmp_path / "gloo-mesh" / "relay-server-tls-secret"
        folder.mkdir(parents=True)
        (folder / "tls.crt").write_bytes(b"cert")
        (folder / "tls.key").write_bytes(b"key")
        (folder / ".editor-backup").write_bytes(b"ignored")

        async def scenario(s: base.Store) -> None:
            [found] = await s.list_secrets(namespace="gloo-mesh")
            assert (found.name, found.type) == ("relay-server-tls-secret", "Opaque")
            assert dict(found.data) == {"tls.crt": b"cert", "tls.key": b"key"}
            assert found.resource_version == os.stat(folder / "tls.key").st_mtime_ns // 1000
        run(tmp_path, scenario)

    def test_hand_edit_is_a_conflict(self, tmp_path: pathlib.Path) -> None:
        """A change by hand between read and update makes the update a Conflict."""
        folder = tmp_path / "gloo-mesh" / "byo"
        folder.mkdir(parents=True)
        (folder / "tls.crt").write_bytes(b"v1")
        os.utime(folder / "tls.crt", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        os.utime(folder, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))

        async def scenario(s: base.Store) -> None:
            read = await s.get_secret("gloo-mesh", "byo")
            (folder / "tls.crt").write_bytes(b"v2 by hand")
            with pytest.raises(errors.Conflict):
                await s.update(dataclasses.replace(read, data={"tls.crt": b"v2 by us"}))
            fresh = await s.get_secret("gloo-mesh", "byo")
            adopted = await s.update(dataclasses.replace(fresh, data={"tls.crt": b"v3"}))
            assert adopted.resource_version > fresh.resource_version
            assert await s.revision() == adopted.resource_version
        run(tmp_path, scenario)
        assert os.path.islink(folder / "..data")
        assert (folder / "tls.crt").read_bytes() == b"v3"

    def test_kubernetes_volume(self, tmp_path: pathlib.Path) -> None:
        """A mounted Kubernetes Secret volume (..data, no sidecar) reads as a secret."""
        folder = tmp_path / "istio-system" / "cacerts"
        (folder / "..2025_01_01_00_00_00.1").mkdir(parents=True)
        (folder / "..2025_01_01_00_00_00.1" / "root-cert.pem").write_bytes(b"root")
        os.symlink("..2025_01_01_00_00_00.1", folder / "..data")
        os.symlink("..data/root-cert.pem", folder / "root-cert.pem")

        async def scenario(s: base.Store) -> None:
            found = await s.get_secret("istio-system", "cacerts")
            assert dict(found.data) == {"root-cert.pem": b"root"}
        run(tmp_path, scenario)

    def test_stray_file_names_the_path(self, tmp_path: pathlib.Path) -> None:
        """A file whose name cannot be a key raises ConfigError naming the file."""
        folder = tmp_path / "gloo-mesh" / "byo"
        folder.mkdir(parents=True)
        (folder / "tls crt").write_bytes(b"x")

        async def scenario(s: base.Store) -> None:
            with pytest.raises(errors.ConfigError, match=r"byo/tls crt: file name is not a"):
                await s.get_secret("gloo-mesh", "byo")
        run(tmp_path, scenario)


class TestRecovery:
    def test_redo_of_a_logged_write(self, tmp_path: pathlib.Path) -> None:
        """A write logged but not applied (the writer died) is applied by the next open."""
        async def first(s: base.Store) -> None:
            await s.create(cacerts())
        run(tmp_path, first)
        log = journal.Journal(str(tmp_path / files.STATE), "test")
        [event] = log.read(0, "Secret", None, 10)[0]
        lost = dataclasses.replace(event.object, resource_version=2, data={"ca-cert.pem": b"2"})
        log.append(base.WatchEvent(type=base.EventType.MODIFIED, object=lost,
                                   resource_version=2))

        async def second(s: base.Store) -> None:
            found = await s.get_secret("istio-system", "cacerts")
            assert (found.resource_version, dict(found.data)) == (2, {"ca-cert.pem": b"2"})
        run(tmp_path, second)

    def test_torn_log_line(self, tmp_path: pathlib.Path) -> None:
        """Half a log line left by a crash is cut off, and writing goes on after it."""
        async def first(s: base.Store) -> None:
            await s.create(cacerts())
        run(tmp_path, first)
        with open(tmp_path / files.STATE / "changes.log", "ab") as handle:
            handle.write(b"2 MODIFIED Secret istio-system {\"apiVers")

        async def second(s: base.Store) -> None:
            assert await s.revision() == 1
            made = await s.create(dataclasses.replace(cacerts(), namespace="other"))
            assert made.resource_version == 2
        run(tmp_path, second)

    def test_newer_format(self, tmp_path: pathlib.Path) -> None:
        """A store laid out by a newer meshtrust is refused with SchemaError."""
        (tmp_path / files.STATE).mkdir()
        (tmp_path / files.STATE / "format").write_text("7\n")
        with pytest.raises(errors.SchemaError, match=r"newer meshtrust \(schema 7 > 1\)"):
            asyncio.run(store.open_store(f"dir://{tmp_path}"))
