"""Structured (JSON lines) logging for every specserve process.

Example:
    >>> import logging
    >>> configure_logging("INFO")
    >>> logging.getLogger("specserve.demo").info("trained", extra={"fields": {"loss": 3.1}})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_CONFIGURED = {"done": False}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON formatter on the root logger once (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if _CONFIGURED["done"]:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    _CONFIGURED["done"] = True
