"""open_clip text towers: a model name with a pretrained tag or a local weights file, or a
``local-dir:/path`` folder (open_clip_config.json + weights).

Per-token embeddings are the text transformer's final-layer-norm output (B, n_ctx, width), taken
with a forward hook so any open_clip text tower with an ``ln_final`` works; the pooled embedding is
``encode_text`` (projected, as CLIP scores use it). Tokens after the end-of-text token are masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from imager.errors import EncoderError
from imager.text.base import TextEmbeddings
from imager.text.config import Embed

log = logging.getLogger(__name__)


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    for owner in (model, getattr(model, "text", None)):
        if owner is not None and isinstance(getattr(owner, "ln_final", None), torch.nn.Module):
            return owner.ln_final
    raise EncoderError("embed.clip.model: this open_clip text tower has no ln_final; per-token embeddings unsupported")


class ClipTextEncoder:
    def __init__(self, model, tokenizer, *, id: str, max_length: int):
        self.model, self.tokenizer, self.id = model.eval(), tokenizer, id
        context = int(getattr(tokenizer, "context_length", 77))
        self.max_length = min(max_length, context)
        self._norm = _final_norm(model)
        self.token_dim = int(self._norm.normalized_shape[0])
        inner = getattr(tokenizer, "tokenizer", None)
        self._pad = int(getattr(inner, "pad_token_id", None) or 0)
        eot = getattr(tokenizer, "eot_token_id", None)  # CLIP's BPE: id 0 is a real token ("!")
        self._eot = None if eot is None else int(eot)
        with torch.no_grad():
            self.pooled_dim = int(model.encode_text(tokenizer([""])).shape[-1])

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        ids = self.tokenizer(list(captions))  # (B, n_ctx), padded with the pad id
        captured: list[torch.Tensor] = []
        handle = self._norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pooled = self.model.encode_text(ids)  # (B, P)
        finally:
            handle.remove()
        states = captured[0]  # (B, n_ctx, width)
        if self._eot is not None:  # real tokens: up to and including the first end-of-text
            is_eot = ids == self._eot  # (B, n_ctx)
            last = torch.where(is_eot.any(1), is_eot.int().argmax(1), ids.shape[1] - 1)  # (B,)
            real = torch.arange(ids.shape[1]).unsqueeze(0) <= last.unsqueeze(1)  # (B, n_ctx)
        else:
            real = ids != self._pad  # (B, n_ctx)
        truncated = int((real.sum(1) > self.max_length).sum())
        mask = real[:, : self.max_length]
        tokens = states[:, : self.max_length] * mask.unsqueeze(-1)
        return TextEmbeddings(tokens.float(), mask, pooled.float(), truncated)


def load_clip(cfg: Embed) -> ClipTextEncoder:
    import open_clip

    name, pretrained = cfg.clip.model, cfg.clip.pretrained
    local_dir = name.startswith("local-dir:")
    if not local_dir:
        if name.replace("/", "-") not in open_clip.list_models():
            raise EncoderError(f"embed.clip.model: unknown open_clip model '{name}' (or use local-dir:/path)")
        if pretrained is None:
            raise EncoderError("embed.clip.pretrained: required (a local weights file or a pretrained tag)")
        is_file = Path(pretrained).expanduser().is_file()
        if not is_file and not cfg.allow_download:
            tags = open_clip.list_pretrained_tags_by_model(name)
            what = "needs a download" if pretrained in tags else "is neither a local file nor a known tag"
            raise EncoderError(
                f"embed.clip.pretrained: '{pretrained}' {what}; give a local weights file or set embed.allow_download: true"
            )
        if is_file:
            pretrained = str(Path(pretrained).expanduser())
    try:
        model = open_clip.create_model(name, pretrained=None if local_dir else pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EncoderError(f"embed.clip.model: cannot load '{name}' ({first[:200]})") from None
    ident = f"clip:{name}" + (f":{pretrained}" if pretrained and not local_dir else "")
    return ClipTextEncoder(model, tokenizer, id=ident, max_length=cfg.max_length)
