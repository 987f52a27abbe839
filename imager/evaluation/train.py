"""The train-evaluator stage's logic: train the in-domain evaluator on the training split and check
it on the held-out split before anything is scored with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imager.data.shard import read_samples, shard_paths
from imager.errors import DataError
from imager.evaluation.config import Evaluator
from imager.evaluation.evaluator import save_evaluator, train_evaluator
from imager.evaluation.metrics import r_precision
from imager.inference.images import to_unit
from imager.text.cache import EmbeddingCache

CHECK_K = 32  # candidates of the held-out R-precision in the report


def train_and_check(
    cfg: Evaluator, *, shards_dir: Path, cache_dir: Path, out: Path, log: Callable[[dict[str, float], int], None] | None = None
) -> dict[str, Any]:
    """Train on the train split, write ``out``, and return the training summary plus held-out
    retrieval: top-1 accuracy among every distinct val caption and R-precision at k=32, each with
    its chance level."""
    cache = EmbeddingCache(cache_dir)
    train = shard_paths(shards_dir, "train")
    if not train:
        raise DataError(f"{shards_dir}: no training shards; run `imager shard` first")
    keys, _, images = read_samples(train)
    text = cache.lookup(keys)[2].float()
    model, summary = train_evaluator(cfg, images, text, log=log)
    save_evaluator(model, out)
    val = shard_paths(shards_dir, "val")
    if val:
        summary |= held_out_retrieval(model, val, cache)
    return summary


@torch.inference_mode()
def held_out_retrieval(model: torch.nn.Module, shards: list[Path], cache: EmbeddingCache) -> dict[str, float]:
    keys, captions, images = read_samples(shards)
    first: dict[str, str] = {}
    for k, c in zip(keys, captions, strict=True):
        first.setdefault(c, k)
    pool = sorted(first)
    index = {c: i for i, c in enumerate(pool)}
    pool_emb = torch.nn.functional.normalize(cache.lookup([first[c] for c in pool])[2].float(), dim=-1)
    emb = torch.cat([model.embed(b) for b in to_unit(images).split(256)])
    targets = torch.tensor([index[c] for c in captions])
    top1 = (emb @ pool_emb.T).argmax(-1).eq(targets).float().mean().item()
    k = min(CHECK_K, len(pool))
    return {
        "val_images": len(keys),
        "val_top1_all": top1,
        "val_top1_all_chance": 1 / len(pool),
        f"val_r_precision_k{k}": r_precision(emb, pool_emb, targets, k, torch.Generator().manual_seed(0)),
        f"val_r_precision_k{k}_chance": 1 / k,
    }
