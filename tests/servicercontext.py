"""What a servicer reads of a gRPC call, for calling servicers directly in tests."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

Metadatum = collections.namedtuple("Metadatum", ["key", "value"])


class Aborted(grpc.aio.AbortError):
    """The servicer ended the call with ``code`` and ``details`` (as gRPC's ``abort``
    does, with its ``AbortError``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Context:
    """A call's verified peer certificate, address, metadata and deadline."""

    def __init__(self, *, certificate: bytes | None = None,
                 metadata: Sequence[Metadatum] = ()) -> None:
        self._certificate = certificate
        self._metadata = tuple(metadata)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._certificate]} if self._certificate else {}

    def peer(self) -> str:
        return "ipv4:10.0.0.7:40000"

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return 15.0  # the agent's call deadline

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details)
