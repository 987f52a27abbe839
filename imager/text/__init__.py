"""Text encoders behind one small interface, and the embedding cache that training reads.

- :mod:`imager.text.config`: the typed ``embed`` settings (no torch; imager.config embeds them)
- :mod:`imager.text.base`: :class:`TextEncoder` and :class:`TextEmbeddings`, the interface
- :mod:`imager.text.factory`: :func:`load_text_encoder`, the encoder that ``embed.encoder`` names
- :mod:`imager.text.cache`: the embedding cache

Nothing is imported here, so ``import imager.text.config`` stays cheap; the torch-side names load on
first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imager.text.base import TextEmbeddings, TextEncoder
    from imager.text.factory import load_text_encoder

_LAZY = {
    "TextEmbeddings": "imager.text.base",
    "TextEncoder": "imager.text.base",
    "load_text_encoder": "imager.text.factory",
}

__all__ = ["TextEmbeddings", "TextEncoder", "load_text_encoder"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imager.text' has no attribute {name!r}")
