"""The one table of errors MLProxy answers with, and how each maps to HTTP.

Every error a client can get from MLProxy itself is a `ProxyError`; its body is JSON in the shape
KServe's model server uses, `{"error": "<what and why>"}`, so existing clients show it.
Exceptions from libraries are translated into these at the adapter boundary (`raise ... from`).
"""

from __future__ import annotations

import json
from enum import Enum

__all__ = ["ErrorKind", "ProxyError", "error_body"]


class ErrorKind(Enum):
    # name = (HTTP status, outcome label used in metrics)
    BAD_REQUEST = (400, "bad_request")
    INTERNAL = (500, "internal_error")  # a bug in MLProxy; the log has the traceback
    NOT_FOUND = (404, "not_found")
    PAYLOAD_TOO_LARGE = (413, "too_large")
    HEADERS_TOO_LARGE = (431, "headers_too_large")  # over ext_proc's header caps
    BODY_TIMEOUT = (408, "body_timeout")  # the body did not arrive within the request's SLA
    QUEUE_FULL = (429, "queue_full")
    BACKEND_ERROR = (502, "backend_error")  # unreachable, or an answer we cannot use
    UNAVAILABLE = (503, "unavailable")  # shutting down, policy gone
    DEADLINE = (503, "shed")  # its deadline cannot be met (policy on_late: shed)
    BACKEND_TIMEOUT = (504, "backend_timeout")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def outcome(self) -> str:
        return self.value[1]


class ProxyError(Exception):
    """An error answered to one client, with its status, message and extra headers."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        input_may_cause: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers
        # A backend failure that one input of a batch may have caused (the connection dropped
        # while the backend worked on it): the batch is bisected, as for a 400 or a 500.
        self.input_may_cause = input_may_cause

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self) -> bytes:
        return error_body(self.message)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
