"""Container tests: the broker image, the container backend of the harness, and the docker
backend of ``pear-mqtt up`` (Compose).

These tests need a Docker engine and the pear images, so ``make test`` does not collect them
(``testpaths``); ``.ci/containers.sh`` starts an engine, builds the images and runs them (see
``deploy/CONTAINERS.md``). Without an engine they fail, naming what is missing.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Skip unless a Docker engine answers and the pear images and Compose are there."""
    from pear_mqtt.ops.compose import docker_problem

    problem = docker_problem()
    if problem is not None:
        pytest.fail(f"no container runtime for this test: {problem} (.ci/containers.sh "
                    "starts an engine and builds the images)")
