"""``pear-mqtt embedded``: the embedded amqtt broker."""

from ..ops.embedded import register_cli

__all__ = ["register_cli"]
