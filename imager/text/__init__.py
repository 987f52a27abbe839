"""Text encoders behind one small interface, and the embedding cache that training reads."""

from imager.text.base import TextEmbeddings, TextEncoder, load_text_encoder

__all__ = ["TextEmbeddings", "TextEncoder", "load_text_encoder"]
