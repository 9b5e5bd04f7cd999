"""Structural: paho is imported in one place, the transport package (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pear_mqtt

ROOT = Path(pear_mqtt.__file__).parent


def _imports_paho(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "paho" or n.startswith("paho.") for n in names):
            return True
    return False


def test_only_the_transport_package_imports_paho() -> None:
    importers = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if _imports_paho(p))
    assert importers == ["transport/connection.py", "transport/paho_io.py",
                         "transport/pump.py"], importers
