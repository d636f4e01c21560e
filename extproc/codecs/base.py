"""What a codec does: parse one request, merge a batch, split the batch's answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["NO_FRAMING", "Codec", "CodecError", "Framed", "Parsed"]

# A codec's `framing` headers of a request, or of a backend's answer, by lower-case name.
NO_FRAMING: Mapping[str, str] = {}


class CodecError(ValueError):
    """The body cannot be used; the message says what and why (it reaches the client)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One client request, decoded."""

    size: int  # instances (inputs) it carries; at least 1
    data: Any  # codec-specific
    compat: str = ""  # only requests with equal compat may share a batch


@dataclass(frozen=True, slots=True)
class Framed:
    """A body with the content type and headers that say how to read it: a merged batch
    whose framing is not the codec's default, or one client's answer (`content_type` "" for
    none, as a server may send)."""

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class Codec(Protocol):
    name: str
    content_type: str  # of a merged batch body that is plain bytes
    # Lower-case names of the headers that frame a body (of a client's request for `parse`,
    # of the backend's answer for `split`, besides its content-type): only these are passed.
    framing: tuple[str, ...]

    def parse(self, body: bytes, framing: Mapping[str, str] = NO_FRAMING) -> Parsed:
        """Decode and validate one request; CodecError if it is malformed."""
        ...

    def merge(self, items: Sequence[Parsed]) -> bytes | Framed:
        """One backend request body for the batch, in order. Never raises for requests that
        `parse` accepted: parse refuses what cannot be forwarded faithfully."""
        ...

    def split(
        self, body: bytes, items: Sequence[Parsed], framing: Mapping[str, str] = NO_FRAMING
    ) -> list[bytes | Framed | CodecError]:
        """Each request's own response body (bytes: of the codec's content type), in the
        order of `items`, built only from its own part of the answer (and metadata that is no
        client's); a CodecError in place of a part that cannot be forwarded (that request
        alone fails). Raises CodecError if the answer cannot be split at all (wrong count,
        not JSON...). `framing`: the answer's content-type and `framing` headers, and
        ":path", the path of the URL the batch was sent to (MLProxy's own, not the
        backend's: what a codec may tell a client about the model it reached)."""
        ...
