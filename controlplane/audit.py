"""The audit log: one JSON line per write to the `mlproxy.audit` logger.

A line names who (the token's name, never the token; `fleet-tuner` for the tuner), from where
(the client's address as the server saw it), what (event, policy, status), the versions before
and after, and which top-level fields changed (names only: values may be secret).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["audit", "changed_fields", "log"]

log = logging.getLogger("mlproxy.audit")


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """The top-level fields whose values differ (all of them when one side is None)."""
    old, new = old or {}, new or {}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def audit(event: str, **fields: Any) -> None:
    record = {"event": event, **fields}
    # text logs: the JSON after the logger's name; JSON logs: also as the line's `audit` object
    log.info(json.dumps(record, sort_keys=False, default=str), extra={"audit": record})
