"""Request codecs, by the policy's `codec` name."""

from __future__ import annotations

from extproc.codecs.base import Codec, CodecError, Parsed
from extproc.codecs.kserve_v1 import KServeV1
from extproc.codecs.oip_v2 import OipV2
from extproc.codecs.openai_embeddings import OpenAIEmbeddings
from extproc.codecs.tfs_columnar import TfsColumnar

__all__ = ["Codec", "CodecError", "Parsed", "all_codecs", "get_codec"]

_CODECS: dict[str, Codec] = {
    "kserve-v1": KServeV1(),
    "oip-v2": OipV2(),
    "tfs-columnar": TfsColumnar(),
    "openai-embeddings": OpenAIEmbeddings(),
}


def get_codec(name: str) -> Codec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(_CODECS)}") from None


def all_codecs() -> tuple[Codec, ...]:
    return tuple(_CODECS.values())
