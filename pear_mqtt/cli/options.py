"""Command-line options shared by the long-running commands (agent, archive, bridge)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_service_options"]


def add_service_options(group: argparse._ActionsContainer, *, status: str,
                        interval: float, interval_help: str) -> None:
    """Add ``--metrics-port``, ``--status-file`` and ``--status-interval``: ``status`` names
    what the status file holds; ``interval_help`` what the interval paces."""
    group.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics "
                            "(0: a free port, printed at start; docs/OPERATIONS.md)")
    group.add_argument("--status-file", type=Path, metavar="PATH",
                       help=f"keep the current {status} as JSON in PATH (replaced "
                            "atomically), for health checks")
    group.add_argument("--status-interval", type=float, default=interval, metavar="S",
                       help=f"seconds between {interval_help} (default: {interval:g})")
