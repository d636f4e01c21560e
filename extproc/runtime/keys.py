"""The batching key: requests with equal keys may share a batch (one batcher per key)."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

__all__ = ["BatchKey", "compat_key"]


class BatchKey(NamedTuple):
    """Requests with equal keys may share a batch: one batcher (queue) per key."""

    policy: str  # the policy's name
    backend_url: str  # its backend URL with the request's path variables filled in
    compat: str  # a digest of the codec's compatibility key (compat_key)


def compat_key(compat: str) -> str:
    """What a batching key holds of a request's compat key: a digest when it is long. Keys
    are kept after their batchers go (for what their rules learnt); a client sending distinct
    1 MB top-level fields must not make ext_proc keep a megabyte per key."""
    if len(compat) <= 64:
        return compat
    return "sha256:" + hashlib.sha256(compat.encode()).hexdigest()
