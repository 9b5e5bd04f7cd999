"""asyncio MQTT connections over paho-mqtt, driven by the event loop (no paho thread).

The only package that imports paho: :mod:`.connection` (one connection, its
:mod:`.inbox` of unread messages and its :mod:`.pump` that reads and writes the socket)
and :mod:`.paho_io` (faster stand-ins for three paho internals). Why not aiomqtt:
docs/DESIGN.md.
"""

from .connection import Connection, InboundMessage, Will, build_tls_context, stop_task

__all__ = ["Connection", "InboundMessage", "Will", "build_tls_context", "stop_task"]
