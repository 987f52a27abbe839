"""Load the text encoder that ``embed.encoder`` names."""

from __future__ import annotations

from imager.text.base import TextEncoder
from imager.text.config import Embed


def load_text_encoder(cfg: Embed) -> TextEncoder:
    """The encoder named by ``cfg.encoder``, loaded from local files unless downloads are allowed
    (``transformers`` is a local folder: it never downloads)."""
    if cfg.encoder == "minilm":
        from imager.text.hf import load_minilm

        return load_minilm(cfg)
    if cfg.encoder == "t5":
        from imager.text.hf import load_t5

        return load_t5(cfg)
    if cfg.encoder == "transformers":
        from imager.text.hf import load_transformers

        return load_transformers(cfg)
    from imager.text.clip import load_clip

    return load_clip(cfg)
