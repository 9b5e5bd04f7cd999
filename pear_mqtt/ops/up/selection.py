"""Which backend runs the topology: the one asked for, else the first this machine can run."""

from __future__ import annotations

import os
from typing import Final

from ...errors import BrokerError, ConfigError
from .backend import Backend
from .cluster import ClusterBackend
from .docker import DockerBackend
from .local import EmbeddedBackend, LocalBackend
from .state import UpState

__all__ = ["AUTO_ORDER", "BACKENDS", "backend_for", "choose_backend"]

AUTO_ORDER: Final[tuple[type[Backend], ...]] = (DockerBackend, LocalBackend, EmbeddedBackend)
"""What ``auto`` tries, best first."""

BACKENDS: Final[dict[str, type[Backend]]] = {
    cls.name: cls for cls in (LocalBackend, EmbeddedBackend, DockerBackend, ClusterBackend)}
"""Every backend by name (``--backend``, ``PEAR_BACKEND``, ``up.json``)."""


def backend_for(state: UpState) -> Backend:
    """The backend that started the recorded ``state``."""
    cls = BACKENDS.get(state.backend)
    if cls is None:
        raise ConfigError(f"up.json names an unknown backend {state.backend!r}")
    return cls()


def choose_backend(requested: str | None = None) -> tuple[type[Backend], list[str]]:
    """The backend to use and the lines explaining the choice.

    ``requested`` (``--backend``) wins over ``PEAR_BACKEND``; ``auto`` or neither picks the
    first of :data:`AUTO_ORDER` this machine can run (docker if an engine answers and the
    images and Compose are there, else local mosquitto, else the embedded amqtt broker).
    """
    choice = (requested or os.environ.get("PEAR_BACKEND") or "auto").strip().lower()
    if choice != "auto":
        cls = BACKENDS.get(choice)
        if cls is None:
            raise ConfigError(f"backend {choice!r} is unknown; use {', '.join(BACKENDS)} or "
                              "auto (--backend / PEAR_BACKEND)")
        problem = cls.problem()
        if problem is not None:
            raise BrokerError(cls.refusal(problem))
        return cls, [cls.chosen(auto=False)]
    notes: list[str] = []
    offered = [cls for cls in AUTO_ORDER if cls.offered()]
    for i, cls in enumerate(offered):
        problem = cls.problem()
        if problem is None:
            return cls, [*notes, cls.chosen(auto=True)]
        fallback = next((c.name for c in offered[i + 1:] if c.problem() is None), "none")
        notes.append(f"{cls.name} backend not usable ({problem}); using {fallback}")
    raise BrokerError("no backend can run here: " + "; ".join(notes))
