"""The README's main job: the fleet demo runs headless and says whether everything worked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class TestDemo:
    def test_headless_demo_with_a_root_rotation_succeeds(self, tmp_path: Path) -> None:
        """Two clusters bootstrap, rotate, get Istio CAs and federate through a root rotation."""
        workdir = tmp_path / "demo"
        proc = subprocess.run(
            [sys.executable, "-m", "meshtrust", "demo", "--clusters", "2", "--duration", "30",
             "--rotate-root", "--workdir", str(workdir)],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "through a root rotation" in proc.stdout
        for name in ("mgmt.db", "cluster-1.db", "cluster-2.db", "server.log", "cluster-1.log"):
            assert (workdir / name).exists(), name
        assert "Traceback" not in (workdir / "server.log").read_text()
