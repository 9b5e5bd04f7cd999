"""``pear-mqtt bridge``: the public bridge."""

from ..bridge.service import register_cli

__all__ = ["register_cli"]
