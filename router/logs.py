"""structlog setup: JSON lines, contextvars per request, one canonical line per request.

Prompts, completions and API keys are never bound to a logger: the canonical line
carries counts, ids and the routing decision only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

_json = msgspec.json.Encoder()


def _dumps(obj: Any, **_kw: Any) -> str:
    try:
        return _json.encode(obj).decode()
    except TypeError:  # something msgspec can't encode (rare: exception objects): fall back to repr
        return _json.encode({k: v if isinstance(v, (str, int, float, bool, type(None), dict, list)) else repr(v)
                             for k, v in obj.items()}).decode()


def configure_logging(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "tiergate") -> Any:
    return structlog.get_logger(name)
