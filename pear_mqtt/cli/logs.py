"""How the ``pear-mqtt`` commands log: plain lines for people, or one JSON object per line
(``--log-format json``, or ``PEAR_LOG_FORMAT=json``) with the same fields in every command:
``ts``, ``level``, ``logger``, ``msg``, the record's extras, and ``exc`` for a traceback."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["FORMATS", "LOG_FORMAT_VAR", "JsonFormatter", "configure"]

FORMATS = ("text", "json")
LOG_FORMAT_VAR = "PEAR_LOG_FORMAT"
"""The variable that sets the format when no ``--log-format`` is given."""
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else on a record is an extra the caller passed.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                              "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(*, level: int, fmt: str) -> None:
    """Set up the root logger for a command (``fmt``: one of :data:`FORMATS`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
