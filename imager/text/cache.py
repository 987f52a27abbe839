"""The text-embedding cache: every caption of the shards encoded once, so training never runs the
text encoder.

Layout of the cache directory::

    embeddings.safetensors   tokens (N, L, D) fp16 · mask (N, L) bool · pooled (N, P) fp16
                             null_tokens (L, D) · null_mask (L,) · null_pooled (P,)  (empty caption)
                             prompt_tokens (K, L, D) · prompt_mask (K, L) · prompt_pooled (K, P)
    keys.txt                 N shard keys, one per line, in row order
    meta.json                encoder id, dims, max length, dtype, count, the K prompts

Row ``i`` belongs to the shard sample whose key is line ``i`` of keys.txt. The null rows are the
embedding of the empty caption: the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imager.errors import DataError
from imager.io import atomic_dir, atomic_write_json, atomic_write_text
from imager.text.base import TextEncoder

log = logging.getLogger(__name__)

TENSORS, KEYS, META = "embeddings.safetensors", "keys.txt", "meta.json"
DTYPE = torch.float16


def read_captions(shards: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(keys, captions) of every sample in the given webdataset shards, in shard order."""
    import webdataset as wds

    keys, captions = [], []
    if not shards:
        return keys, captions
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False):
        if "txt" not in sample:
            raise DataError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} has no caption (.txt)")
        keys.append(sample["__key__"])
        captions.append(sample["txt"].decode("utf-8"))
    return keys, captions


def build_cache(
    keys: list[str],
    captions: list[str],
    encoder: TextEncoder,
    out: Path,
    batch_size: int,
    prompts: Sequence[str] = (),
) -> dict[str, Any]:
    """Encode ``captions`` (aligned with ``keys``) and the sampling ``prompts``; write the cache to
    ``out`` atomically."""
    from safetensors.torch import save_file

    if len(set(keys)) != len(keys):
        raise DataError("duplicate keys in the shards; re-run `imager shard`")
    unique = sorted(set(captions))  # each distinct caption is encoded once
    row_of = {c: i for i, c in enumerate(unique)}
    n, length = len(unique), encoder.max_length
    tokens = torch.zeros(n, length, encoder.token_dim, dtype=DTYPE)
    mask = torch.zeros(n, length, dtype=torch.bool)
    pooled = torch.zeros(n, encoder.pooled_dim, dtype=DTYPE)
    truncated = 0
    with tqdm(total=n, desc="embed", unit="caption") as bar:
        for start in range(0, n, batch_size):
            emb = encoder.encode(unique[start : start + batch_size])
            end = start + emb.tokens.shape[0]
            tokens[start:end], mask[start:end], pooled[start:end] = emb.tokens.to(DTYPE), emb.mask, emb.pooled.to(DTYPE)
            truncated += emb.truncated
            bar.update(end - start)
    rows = torch.tensor([row_of[c] for c in captions], dtype=torch.long)
    null = encoder.encode([""])
    if prompts:
        extra = encoder.encode(list(prompts))
        p_tokens, p_mask, p_pooled = extra.tokens.to(DTYPE), extra.mask, extra.pooled.to(DTYPE)
    else:
        p_tokens, p_mask, p_pooled = tokens[:0], mask[:0], pooled[:0]
    tensors = {
        "tokens": tokens[rows].contiguous(),
        "mask": mask[rows].contiguous(),
        "pooled": pooled[rows].contiguous(),
        "null_tokens": null.tokens[0].to(DTYPE).contiguous(),
        "null_mask": null.mask[0].contiguous(),
        "null_pooled": null.pooled[0].to(DTYPE).contiguous(),
        "prompt_tokens": p_tokens.contiguous(),
        "prompt_mask": p_mask.contiguous(),
        "prompt_pooled": p_pooled.contiguous(),
    }
    meta = {
        "encoder": encoder.id,
        "count": len(keys),
        "unique_captions": n,
        "max_length": length,
        "token_dim": encoder.token_dim,
        "pooled_dim": encoder.pooled_dim,
        "dtype": "float16",
        "prompts": list(prompts),
    }
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        atomic_write_text(tmp / KEYS, "".join(f"{k}\n" for k in keys))
        atomic_write_json(tmp / META, meta)
    return {**meta, "truncated": truncated}


class EmbeddingCache:
    """Read side of the cache: look up embeddings by shard key (what training does every step)."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / TENSORS).is_file():
            raise DataError(f"{path}: no embedding cache; run `imager embed` first (or `dvc repro embed`)")
        self.meta: dict[str, Any] = json.loads((path / META).read_text(encoding="utf-8"))
        self.keys = (path / KEYS).read_text(encoding="utf-8").splitlines()
        self._row = {k: i for i, k in enumerate(self.keys)}
        t = load_file(str(path / TENSORS))
        self.tokens, self.mask, self.pooled = t["tokens"], t["mask"], t["pooled"]
        self.null_tokens, self.null_mask, self.null_pooled = t["null_tokens"], t["null_mask"], t["null_pooled"]
        self.prompts: list[str] = list(self.meta.get("prompts", []))
        self.prompt_tokens, self.prompt_mask, self.prompt_pooled = t["prompt_tokens"], t["prompt_mask"], t["prompt_pooled"]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def lookup(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D), mask (B, L), pooled (B, P)) for the given shard keys."""
        try:
            rows = torch.tensor([self._row[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise DataError(f"key {exc.args[0]} is not in the embedding cache; re-run `imager embed`") from None
        return self.tokens[rows], self.mask[rows], self.pooled[rows]
