"""Logging for every MLProxy process: text (the default) or JSON lines (`--log-format json`,
`MLPROXY_LOG_FORMAT=json`), and the ids a line carries.

A line logged while ext_proc handles a request carries that request's id (`request_id`: the
`x-request-id` header Envoy sets on every request); one logged while a batch runs carries the
batch's id (`batch_id`, random per batch) and the ids of the requests in it (`request_ids`).
They come from context variables, so every logger's lines get them, the backend client's too.
In text, they follow the message in brackets; in JSON, they are fields.

JSON line fields: `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`, then
`process` (a worker's name, if any), `request_id`, `batch_id`, `request_ids`, `audit` (the
control plane's audit record, as an object) and `exception` (the traceback), each only when
there is one.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "BATCH",
    "ENV_LOG_FORMAT",
    "FORMATS",
    "REQUEST_ID",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "request_id",
    "setup",
]

ENV_LOG_FORMAT = "MLPROXY_LOG_FORMAT"
FORMATS = ("text", "json")

# The request this task handles ("" if none), and the batch it runs: (batch id, request ids).
REQUEST_ID: ContextVar[str] = ContextVar("mlproxy_request_id", default="")
BATCH: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar("mlproxy_batch", default=None)

# What a request id may be: a client chooses it (Envoy keeps an incoming x-request-id unless
# told otherwise), so anything else is dropped, never logged: no line breaks, no escapes.
_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(value: str | None) -> str:
    """The request id to log for an x-request-id header value ("" if none or unusable)."""
    return value if value is not None and _ID.fullmatch(value) else ""


class ContextFilter(logging.Filter):
    """Puts the current request and batch ids on every record (as attributes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid and not hasattr(record, "request_id"):
            record.request_id = rid
        batch = BATCH.get()
        if batch is not None and not hasattr(record, "batch_id"):
            record.batch_id, record.request_ids = batch
        return True


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("request_id", "batch_id"):
        value = getattr(record, key, "")
        if value:
            out[key] = value
    ids = getattr(record, "request_ids", ())
    if ids:
        out["request_ids"] = [i for i in ids if i]
    return out


class TextFormatter(logging.Formatter):
    """`time process logger LEVEL message [request=... batch=... requests=...]`."""

    def __init__(self, process: str = "") -> None:
        super().__init__(f"%(asctime)s {process}%(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _ids(record)
        if not ids:
            return text
        parts = []
        if "request_id" in ids:
            parts.append(f"request={ids['request_id']}")
        if "batch_id" in ids:
            parts.append(f"batch={ids['batch_id']}")
        if ids.get("request_ids"):
            parts.append(f"requests={','.join(ids['request_ids'])}")
        head, sep, rest = text.partition("\n")  # after the message, before a traceback
        return f"{head} [{' '.join(parts)}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            doc["process"] = self.process
        doc.update(_ids(record))
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            doc["audit"] = audit
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup(level: int = logging.INFO, fmt: str = "text", process: str = "") -> None:
    """Configure the root logger: one stderr handler in `fmt` ("text" or "json") with the ids
    filter. `process` names a worker (`worker-1`)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    name = process.strip()
    handler.setFormatter(
        JsonFormatter(name) if fmt == "json" else TextFormatter(f"{name} " if name else "")
    )
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
