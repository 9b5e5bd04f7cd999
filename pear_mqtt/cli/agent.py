"""``pear-mqtt agent``: the edge store agent."""

from ..agent.runner import register_cli

__all__ = ["register_cli"]
