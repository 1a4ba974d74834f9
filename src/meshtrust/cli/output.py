"""Where the command line writes: tables, JSON/YAML documents and errors.

Commands never call ``print``; they hand values to an ``Output``, which the
tests can point at in-memory streams.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.table import Table


class Output:
    """Writes results to ``stdout`` and problems to ``stderr``."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.console = Console(file=self.stdout, highlight=False, soft_wrap=False)

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def error(self, text: str) -> None:
        self.stderr.write(f"error: {text}\n")

    def warn(self, text: str) -> None:
        self.stderr.write(f"warning: {text}\n")

    def document(self, value: Any, fmt: str) -> None:
        """Print ``value`` as a JSON or YAML document."""
        if fmt == "json":
            self.stdout.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
        elif fmt == "yaml":
            self.stdout.write(yaml.safe_dump(value, sort_keys=False, default_flow_style=False))
        else:
            raise ValueError(f"unknown output format {fmt!r}")

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        title: str | None = None,
        styles: Mapping[int, str] | None = None,
    ) -> None:
        """Print rows under column headings; ``styles`` colours whole rows by index."""
        table = Table(title=title, show_lines=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for index, row in enumerate(rows):
            table.add_row(*row, style=(styles or {}).get(index))
        self.console.print(table)
