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
        """One backend request body for the batch, in order. Never raises for requests that
        `parse` accepted: parse refuses what cannot be forwarded faithfully."""
        ...

    def split(self, body: bytes, items: Sequence[Parsed]) -> list[bytes | CodecError]:
        """Each request's own response body, in the order of `items`, built only from its own
        part of the answer (and metadata that is no client's); a CodecError in place of a
        part that cannot be forwarded (that request alone fails). Raises CodecError if the
        answer cannot be split at all (wrong count, not JSON...)."""
        ...
