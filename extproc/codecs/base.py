"""What a codec does: parse one request, merge a batch, split the batch's answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Codec", "CodecError", "Parsed"]


class CodecError(ValueError):
    """The body cannot be used; the message says what and why (it reaches the client)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One client request, decoded."""

    size: int  # instances (inputs) it carries; at least 1
    data: Any  # codec-specific
    compat: str = ""  # only requests with equal compat may share a batch


class Codec(Protocol):
    name: str
    content_type: str  # of the merged batch body

    def parse(self, body: bytes) -> Parsed:
        """Decode and validate one request; CodecError if it is malformed."""
        ...

    def merge(self, items: Sequence[Parsed]) -> bytes:
        """One backend request body for the batch, in order."""
        ...

    def split(self, body: bytes, items: Sequence[Parsed]) -> list[bytes]:
        """Each request's own response body, in the order of `items`; CodecError if the
        backend's answer cannot be split (wrong count, not JSON...)."""
        ...
