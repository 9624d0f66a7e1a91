"""Errors the server answers with, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause is an `APIError` with an HTTP status; the app turns it into that body, so the
official `openai` client raises its usual exception classes (`BadRequestError`, `AuthenticationError`,
`NotFoundError`, `RateLimitError`, ...) with our message in them.
"""

from __future__ import annotations

# OpenAI's error types, by what went wrong.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"


class APIError(Exception):
    """A request the server refuses or cannot finish; `param` names the offending field (dotted path)."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    """A parameter OpenAI has but this server does not implement: refused rather than silently ignored."""
    return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")
