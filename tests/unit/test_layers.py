"""The layer rules of the design hold: import-linter keeps every contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestLayers:
    def test_import_contracts_are_kept(self) -> None:
        """lint-imports reports every contract in pyproject.toml kept."""
        lint = Path(sys.executable).with_name("lint-imports")
        proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 broken" in proc.stdout
