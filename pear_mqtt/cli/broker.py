"""``pear-mqtt broker``: broker configs: render mosquitto.conf and the ACL."""

from ..ops.brokerconf import register_cli

__all__ = ["register_cli"]
