"""What the router passes on to the backend about the request: its id and the W3C trace context.

* `x-request-id`: the router's request id (the client's own `x-request-id` when it sent one, cut to
  128 characters; else a fresh one), the id in the router's log line and decision record, so one
  request can be followed from the client through the router into vLLM's logs.
* `traceparent` (W3C Trace Context, level 1) and `tracestate`: passed on unchanged when the client's
  `traceparent` is well formed (version 00-fe; neither the trace id nor the parent id all zeros);
  a malformed one is dropped, with its `tracestate`, as the spec asks of a participant that cannot
  parse it. With tracing on (router/tracing.py), the upstream span's own context replaces them, so
  vLLM's spans hang under the router's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$")
MAX_TRACESTATE = 512


def valid_traceparent(value: str | None) -> bool:
    if not value or len(value) > 256:
        return False
    m = _TRACEPARENT.match(value)
    if m is None:
        return False
    version, trace_id, parent_id, rest = m.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return False
    return version != "00" or rest is None   # version 00 has exactly four fields


def propagation(request_id: str, headers: Mapping[str, str]) -> dict[str, str]:
    """The headers the router adds to every upstream attempt of this request."""
    out = {"x-request-id": request_id}
    tp = headers.get("traceparent")
    if tp is not None and valid_traceparent(tp):
        out["traceparent"] = tp
        ts = headers.get("tracestate")
        if ts and len(ts) <= MAX_TRACESTATE:
            out["tracestate"] = ts
    return out
