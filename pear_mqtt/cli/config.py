"""``pear-mqtt config``: configuration files: show and check."""

from ..config.manager import register_cli

__all__ = ["register_cli"]
