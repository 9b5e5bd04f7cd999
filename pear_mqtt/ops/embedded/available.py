"""Whether the embedded broker can run here: amqtt is the optional ``broker`` extra, so an
edge agent installs without it (and its typer, websockets, pyyaml)."""

from __future__ import annotations

import importlib.util

__all__ = ["INSTALL", "missing"]

INSTALL = "pip install 'pear-mqtt[broker]'"


def missing() -> str | None:
    """None when amqtt is installed, else what to do about it."""
    if importlib.util.find_spec("amqtt") is not None:
        return None
    return f"the embedded broker needs amqtt, which is not installed: {INSTALL}"
