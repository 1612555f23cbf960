"""structlog setup: JSON lines from every logger, contextvars per request, one canonical line per request.

Prompts, completions and API keys are never bound to a logger: the canonical line
carries counts, ids and the routing decision only.

Every stdlib logger (uvicorn, litestar, redis, aiohttp, httpx, asyncio, warnings, the root) goes through
one handler whose `ProcessorFormatter` renders its records with the same processors as structlog's own
lines: `event`, `level`, `timestamp`, `logger`, and the request's context (`request_id`, bound by
`bind_request` for the request's task and whatever it starts). Exceptions, ours and foreign, render as
their type and frames (`exception`: [{type, frames}], causes after), never their message, which may
quote a request body or a header; asyncio's messages lose the reprs they carry (a finished task's repr
names its exception's message). Uncaught exceptions in threads and the main thread log the same way.
httpx's line per request (and per probe) shows at level=debug only.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
import uuid
from collections import deque
from types import TracebackType
from typing import Any, TextIO

import msgspec
import structlog
from structlog.contextvars import bind_contextvars
from structlog.typing import EventDict, WrappedLogger

_json = msgspec.json.Encoder()
_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)
_MAX_FRAMES = 40      # the innermost frames of each exception
_MAX_CHAIN = 5        # an exception and its causes
_REPR = re.compile(r"<.*>|\(.*\)")   # a repr, or a call's arguments (asyncio's "Exception in callback f(...)")


def _dumps(obj: Any, **_kw: Any) -> str:
    try:
        return _json.encode(obj).decode()
    except TypeError:  # something msgspec can't encode: fall back to repr
        return _json.encode({k: v if isinstance(v, (str, int, float, bool, type(None), dict, list)) else repr(v)
                             for k, v in obj.items()}).decode()


def describe_exception(exc: BaseException) -> list[dict[str, Any]]:
    """An exception and its causes as types and frames (file:line in function), without messages."""
    out: list[dict[str, Any]] = []
    cur: BaseException | None = exc
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen and len(out) < _MAX_CHAIN:
        seen.add(id(cur))
        typ = type(cur)
        frames = deque((f"{f.f_code.co_filename}:{line} in {f.f_code.co_name}"
                        for f, line in traceback.walk_tb(cur.__traceback__)), maxlen=_MAX_FRAMES)
        name = typ.__qualname__ if typ.__module__ == "builtins" else f"{typ.__module__}.{typ.__qualname__}"
        out.append({"type": name, "frames": list(frames)})
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return out


def safe_exc_info(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """`exc_info` (True, an exception or a sys.exc_info() tuple) -> `exception` (`describe_exception`)."""
    exc_info = event_dict.pop("exc_info", None)
    exc: BaseException | None = None
    if isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    elif exc_info:
        exc = sys.exc_info()[1]
    if exc is not None:
        event_dict["exception"] = describe_exception(exc)
    event_dict.pop("stack_info", None)
    return event_dict


def _foreign(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A stdlib record: its logger's name; asyncio's message cut to its first line, reprs elided."""
    record: logging.LogRecord = event_dict["_record"]
    event_dict["logger"] = record.name
    if record.name == "asyncio" or record.name.startswith("asyncio."):
        event_dict["event"] = _REPR.sub("…", str(event_dict.get("event", "")).split("\n", 1)[0])
    return event_dict


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one stdlib handler; a record that cannot be rendered becomes a JSON line, not a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(_dumps({"event": "log_record_unrenderable", "logger": record.name,
                                      "level": "error", "timestamp": _TIMESTAMP(None, "", {})["timestamp"]}) + "\n")
        except Exception:
            pass


def stdlib_handler(stream: TextIO) -> logging.Handler:
    """A handler rendering stdlib records as tiergate's JSON lines."""
    handler = _Handler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                           _TIMESTAMP, _foreign],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, safe_exc_info,
                    structlog.processors.JSONRenderer(serializer=_dumps)]))
    handler._tiergate = True  # type: ignore[attr-defined]
    return handler


# loggers that may come with handlers of their own (uvicorn's dictConfig, litestar's): they propagate to root
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "redis", "asyncio", "aiohttp",
                   "httpx", "httpcore", "py.warnings")

_CHATTY = frozenset({"httpx", "httpcore"})


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """structlog's JSON lines on `stream` (stdout), and every stdlib logger's through the same processors."""
    out = stream or sys.stdout
    lvl = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _TIMESTAMP,
            safe_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.WriteLoggerFactory(file=out),   # one write per line
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_tiergate", False)]:
        root.removeHandler(h)
    root.addHandler(stdlib_handler(out))
    root.setLevel(lvl)
    for name in FOREIGN_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
        lg.disabled = False   # a dictConfig elsewhere may have disabled it
        if name in _CHATTY:   # a line per upstream request and probe at INFO: only with level=debug
            lg.setLevel(max(lvl, logging.WARNING) if lvl > logging.DEBUG else lvl)
        else:                 # the root's level (another configuration may have set its own)
            lg.setLevel(logging.NOTSET)
    logging.captureWarnings(True)   # warnings.warn -> the py.warnings logger, as JSON
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def _uncaught(typ: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    get_logger().critical("uncaught_exception", exc_info=exc)


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
        get_logger().error("thread_exception", thread=args.thread.name if args.thread else None,
                           exc_info=args.exc_value)


def bind_request(header: str | None) -> str:
    """The request's id (the client's `x-request-id`, else a new one), bound to every line logged in this
    request's task and the tasks it starts."""
    rid = (header or uuid.uuid4().hex)[:128]
    bind_contextvars(request_id=rid)
    return rid


def get_logger(name: str = "tiergate") -> Any:
    return structlog.get_logger(name)
