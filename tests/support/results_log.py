"""A JSON-lines file of counted test results and the command that renders it into a doc.

Shared by the reliability (``faults_report``) and privacy (``privacy_report``) reports: a
test appends a row, a rerun's row replaces the earlier one with the same key, and ``main``
writes the rendered report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ResultsLog"]


class ResultsLog:
    """Rows kept in ``$env`` (default ``default``), one per value of the ``key`` fields."""

    def __init__(self, *, env: str, default: Path, key: tuple[str, ...]) -> None:
        self.env, self.default, self.key = env, default, key

    def path(self) -> Path:
        return Path(os.environ.get(self.env, self.default))

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` with the time it was recorded."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "at": time.time()}, sort_keys=True, default=str) + "\n")

    def load(self, path: Path) -> list[dict[str, Any]]:
        """The last row per key: a rerun replaces the earlier figures."""
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[tuple(row[k] for k in self.key)] = row
        return list(rows.values())

    def main(self, argv: list[str], *, doc: Path, what: str, make: str,
             render: Callable[[Iterable[dict[str, Any]]], str]) -> int:
        """``prog [RESULTS [DOC]]``: render the rows into the report."""
        src = Path(argv[1]) if len(argv) > 1 else self.path()
        dst = Path(argv[2]) if len(argv) > 2 else doc
        rows = self.load(src)
        if not rows:
            print(f"no {what} results in {src}: run `{make}` first", file=sys.stderr)
            return 1
        dst.write_text(render(rows), encoding="utf-8")
        print(f"{len(rows)} rows -> {dst}")
        return 0
