"""Privacy attack suite: fixtures.

Every test here is marked ``privacy`` (``make privacy`` runs them and renders
docs/PRIVACY.md; ``make test`` runs them as ordinary tests).

- ``capture_of`` (session): ``capture_of(policy)`` is the :class:`privacykit.Capture` of that
  policy's run: a fresh `make up` topology, the market broadcast by six companies, the
  attacker's re-sends and replays, the bridge's windows closed. Each policy runs once per
  session however many attacks read it; its topology is stopped as soon as it is captured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import backend_problem
from privacykit import Capture, Policy, run_policy

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.privacy)


@pytest.fixture(scope="session")
def capture_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Policy], Capture]:
    """``capture_of(policy)``: that policy's run, made on first use."""
    captures: dict[str, Capture] = {}

    def get(policy: Policy) -> Capture:
        if policy.id not in captures:
            problem = backend_problem()
            if problem is not None:
                pytest.fail(problem)
            captures[policy.id] = run_policy(policy,
                                             tmp_path_factory.mktemp(f"privacy-{policy.id}"))
        return captures[policy.id]

    return get
