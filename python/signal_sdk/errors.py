"""Typed exceptions for every status of Signal's API (API.md).

Every error the API answers raises a subclass of :class:`SignalError` chosen
by the body's ``error.code`` (or, when the body is not the API's shape, by the
HTTP status). ``UnknownModelError`` is also an ``InvalidRequestError``: both
are 400s.
"""

import re
from typing import Dict, Optional, Type

__all__ = [
    "SignalError",
    "InvalidRequestError",
    "UnknownModelError",
    "UnauthorizedError",
    "InsufficientBalanceError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "TooLargeError",
    "RateLimitedError",
    "UnavailableError",
    "InternalError",
    "SignalConnectionError",
    "ResponseTooLargeError",
    "error_from_response",
]


class SignalError(Exception):
    """Base of every error the SDK raises.

    Attributes: ``status`` (HTTP status, 0 when no response came), ``code``
    (the API's ``error.code``), ``message``, ``request_id`` (names the call in
    the server's log), ``retry_after`` (seconds, or None), ``method``,
    ``path`` and ``attempts`` (how many times the call was sent).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        request_id: Optional[str] = None,
        retry_after: Optional[float] = None,
        method: str = "",
        path: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.method = method
        self.path = path
        self.attempts = attempts

    def __str__(self) -> str:
        s = ""
        if self.method:
            s = "%s %s: " % (self.method, self.path)
        if self.status:
            s += "%d %s: " % (self.status, self.code)
        s += self.message
        if self.request_id and self.request_id not in self.message:
            s += " (request id %s)" % self.request_id
        if self.attempts > 1:
            s += " (after %d attempts)" % self.attempts
        return s

    @property
    def temporary(self) -> bool:
        """Whether the same call may succeed later (429, 503)."""
        return isinstance(self, (RateLimitedError, UnavailableError))


class InvalidRequestError(SignalError):
    """400 invalid_request: bad JSON, unknown field, out-of-range value."""


class UnknownModelError(InvalidRequestError):
    """400 unknown_model: the base model is not served; the message lists those that are."""


class UnauthorizedError(SignalError):
    """401: missing, malformed or unknown API key."""


class InsufficientBalanceError(SignalError):
    """402: the call's estimated cost is above the balance."""


class ForbiddenError(SignalError):
    """403: another user's run, or an admin call without the admin token."""


class NotFoundError(SignalError):
    """404: unknown run or checkpoint."""


class ConflictError(SignalError):
    """409: run not ready (e.g. moving), or an idempotency key reused with another body."""


class TooLargeError(SignalError):
    """413: the request body is over the server's limit."""


class RateLimitedError(SignalError):
    """429: too many calls; ``retry_after`` says when to come back."""


class UnavailableError(SignalError):
    """503: no node can take the run, node lost, or no leader yet."""


class InternalError(SignalError):
    """500 (or another 5xx): a server bug; ``request_id`` names it in the server's log."""


class SignalConnectionError(SignalError):
    """No HTTP answer: the server could not be reached or the connection broke."""


class ResponseTooLargeError(SignalError):
    """A response body over the client's ``max_response_bytes``."""


_BY_CODE: Dict[str, Type[SignalError]] = {
    "invalid_request": InvalidRequestError,
    "unknown_model": UnknownModelError,
    "unauthorized": UnauthorizedError,
    "insufficient_balance": InsufficientBalanceError,
    "forbidden": ForbiddenError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "too_large": TooLargeError,
    "rate_limited": RateLimitedError,
    "unavailable": UnavailableError,
    "internal": InternalError,
}

_CODE_BY_STATUS: Dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    402: "insufficient_balance",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
    500: "internal",
}

_REQUEST_ID_IN_MESSAGE = re.compile(r"(?i)request[ _-]?id[:= ]+([A-Za-z0-9._-]+)")


def error_from_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: Optional[str] = None,
    retry_after: Optional[float] = None,
    method: str = "",
    path: str = "",
) -> SignalError:
    """Builds the typed error for a non-2xx answer."""
    if not code:
        code = _CODE_BY_STATUS.get(status, "")
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = _BY_CODE.get(_CODE_BY_STATUS.get(status, ""), None)
    if cls is None:
        cls = InternalError if status >= 500 else SignalError
    if not request_id:
        m = _REQUEST_ID_IN_MESSAGE.search(message or "")
        if m:
            request_id = m.group(1).rstrip(".")
    return cls(
        message,
        status=status,
        code=code or str(status),
        request_id=request_id,
        retry_after=retry_after,
        method=method,
        path=path,
    )
