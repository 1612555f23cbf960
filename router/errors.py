"""OpenAI-style error bodies. Routing code raises `ApiError`; handlers render it.

`type` follows OpenAI's API: `invalid_request_error` for every 4xx the client can fix (401, 403 and 404
included), `insufficient_quota` for a spent budget, `requests`/`tokens` for a rate limit (its `code` is
`rate_limit_exceeded`), and `server_error` for 5xx. Errors a retry cannot fix (a spent budget, a
permission) carry `x-should-retry: false`, which the OpenAI SDKs obey instead of retrying.
"""

from __future__ import annotations

import msgspec

_enc = msgspec.json.Encoder()

_NO_RETRY = {"x-should-retry": "false"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = {**(_NO_RETRY if status in (401, 403) else {}), **(headers or {})}
        self.logged = False
        self.tenant: str | None = None   # set once the key was checked, for the request's log line

    def body(self) -> bytes:
        return error_body(self.status, self.message, code=self.code, param=self.param, type=self.type)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type: str | None = None) -> bytes:
    return _enc.encode({"error": {"message": message, "type": type or error_type(status),
                                  "param": param, "code": code}})
