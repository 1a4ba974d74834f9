"""The checked-in gRPC code is what the .proto generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src/meshtrust/rpc/_proto"


class TestGeneratedCode:
    def test_regeneration_matches(self, tmp_path: Path) -> None:
        """scripts/gen-proto reproduces rpc/_proto byte for byte; rerun it after editing."""
        subprocess.run([str(ROOT / "scripts/gen-proto"), str(tmp_path)], check=True,
                       env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
        for name in ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"):
            assert (tmp_path / name).read_bytes() == (GENERATED / name).read_bytes(), (
                f"{name} is stale: run scripts/gen-proto")
