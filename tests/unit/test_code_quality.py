"""The house rules that tools can check: strict typing and lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class TestCodeQuality:
    def test_mypy_strict(self) -> None:
        """mypy --strict finds no error in src/."""
        proc = subprocess.run([str(BIN / "mypy"), "src"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_ruff(self) -> None:
        """ruff finds nothing in src/, tests/ and bench/."""
        proc = subprocess.run([str(BIN / "ruff"), "check", "src", "tests", "bench"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
