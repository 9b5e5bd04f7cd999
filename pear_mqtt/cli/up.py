"""``pear-mqtt up``: make up / status / logs / down."""

from ..ops.up import register_cli

__all__ = ["register_cli"]
