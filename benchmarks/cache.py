"""Comparison 3: training on the text-embedding cache vs encoding the captions every step.

Both sides run the same Imager training step (:class:`benchmarks.models.TrainStep`) on the same
model and image batch; one gets its text condition from :meth:`EmbeddingCache.lookup` of the
batch's shard keys (as the training loop does), the other from ``encoder.encode(captions)`` with
the default encoder (``load_text_encoder(params.embed)``). The text part alone (lookup vs encode)
is timed in the same rounds and reported in the details, since the step bounds the achievable
ratio: with a step of s seconds and an encode of e, steps/s can improve at most (s + e) / s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import Sample
from benchmarks.measure import interleaved, median
from benchmarks.models import TrainStep, imager_unet, random_batch, resolve_config
from benchmarks.report import Comparison
from imager.models.config import UNetConfig
from imager.text.cache import META, EmbeddingCache, build_cache

log = logging.getLogger(__name__)


def open_cache(cache_dir: Path, samples: list[Sample], encoder: Any, tmp: Path, batch_size: int) -> tuple[EmbeddingCache, str]:
    """The cache at ``cache_dir`` when it holds these samples from this encoder, else one built in ``tmp``."""
    if (Path(cache_dir) / META).is_file():
        cache = EmbeddingCache(cache_dir)
        same = cache.meta.get("encoder") == encoder.id and cache.meta.get("max_length") == encoder.max_length
        if same and all(s.key in cache for s in samples):
            return cache, str(cache_dir)
        log.info("bench: %s was made by another encoder or for other shards; building a cache of the benchmark's captions", cache_dir)
    unique = {s.key: s.caption for s in samples}  # each key once, in first-seen order
    out = Path(tmp) / "embeddings"
    build_cache(list(unique), list(unique.values()), encoder, out, batch_size)
    return EmbeddingCache(out), f"built for the benchmark from {len(unique)} captions"


def bench_cache(config: UNetConfig, encoder: Any, samples: list[Sample], *, cache_dir: Path, tmp: Path, batch_size: int,
                resolution: int, repeats: int, warmup: int, seed: int, device: torch.device) -> Comparison:
    config = resolve_config(config, text_dim=encoder.token_dim, pooled_dim=encoder.pooled_dim, context_length=encoder.max_length)
    rounds = warmup + repeats
    chosen = [samples[i % len(samples)] for i in range(rounds * batch_size)]
    cache, source = open_cache(cache_dir, chosen, encoder, tmp, batch_size)
    batches = [chosen[i * batch_size : (i + 1) * batch_size] for i in range(rounds)]
    step = TrainStep(imager_unet(config, seed).to(device))
    batch = random_batch(config, batch_size, resolution, device, seed)
    position = {"cached": 0, "encoded": 0, "lookup": 0, "encode": 0}

    def next_batch(name: str) -> list[Sample]:
        i = position[name]
        position[name] += 1
        return batches[i % rounds]

    def cached() -> None:
        step(batch.with_text(*cache.lookup([s.key for s in next_batch("cached")])))

    def encoded() -> None:
        emb = encoder.encode([s.caption for s in next_batch("encoded")])
        step(batch.with_text(emb.tokens, emb.mask, emb.pooled))

    def lookup() -> None:
        tokens, mask, pooled = cache.lookup([s.key for s in next_batch("lookup")])
        batch.with_text(tokens, mask, pooled)

    def encode() -> None:
        emb = encoder.encode([s.caption for s in next_batch("encode")])
        batch.with_text(emb.tokens, emb.mask, emb.pooled)

    contenders = {"cached": cached, "encoded": encoded, "lookup": lookup, "encode": encode}
    times = interleaved(contenders, repeats=repeats, warmup=warmup, device=device, desc="bench: embedding cache")
    seconds = {n: median(t) for n, t in times.items()}
    details = {
        "batch_size": batch_size,
        "encoder": encoder.id,
        "encoder_device": "cpu",
        "cache": source,
        "seconds_median": seconds,
        "text_only_ratio": seconds["encode"] / seconds["lookup"],
        "step": "cache.lookup(keys) or encoder.encode(captions), then the Imager training step (forward + MSE + backward + AdamW)",
    }
    return Comparison("embedding_cache", "Training with the embedding cache", "steps/s", "cache lookup + step", 1 / seconds["cached"],
                      "encode captions + step", 1 / seconds["encoded"], details=details)
