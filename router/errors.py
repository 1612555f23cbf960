"""OpenAI-style error bodies. Routing code raises `ApiError`; handlers render it."""

from __future__ import annotations

import msgspec

_enc = msgspec.json.Encoder()

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 502: "upstream_error", 503: "service_unavailable",
          504: "upstream_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.logged = False

    def body(self) -> bytes:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> bytes:
    return _enc.encode({"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                  "param": param, "code": code}})
