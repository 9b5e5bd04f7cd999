"""One broker of any supported kind (mosquitto, embedded amqtt, aedes cluster), as the
conformance suite sees it: where senders and receivers connect, and their node configs.

Built by the ``broker_kind`` fixture (``tests/integration/conftest.py``); the tests only use
the public fields below, so the same test body runs on every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pear_mqtt.config.models import NetworkConfig

__all__ = ["BrokerUnderTest"]


@dataclass(frozen=True, kw_only=True)
class BrokerUnderTest:
    """A started broker of kind ``kind``.

    ``send_port`` / ``receive_port``: the TLS ports senders and receivers use (a cluster's two
    nodes, so traffic crosses them; one port for a single broker). ``build(member,
    broker_url=..., **kwargs)`` makes a node config (arguments of the ``make_config`` fixture).
    """

    kind: str
    send_port: int
    receive_port: int
    build: Callable[..., NetworkConfig]

    def url(self, *, receiving: bool = False) -> str:
        return f"mqtts://localhost:{self.receive_port if receiving else self.send_port}"

    def config(self, member: str, *, receiving: bool = False, **kwargs: Any) -> NetworkConfig:
        """``member``'s node config, on the receivers' node when ``receiving``."""
        return self.build(member, broker_url=self.url(receiving=receiving), **kwargs)
