"""The embed step: captions of all shard splits -> the embedding cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imager.data.shard import SPLITS, shard_paths
from imager.errors import DataError
from imager.text.cache import build_cache, read_captions
from imager.text.config import Embed
from imager.text.factory import load_text_encoder


def embed(shards_dir: Path, out: Path, cfg: Embed) -> dict[str, Any]:
    """Encode every caption of every split in ``shards_dir``; return the report."""
    paths = [p for split in SPLITS for p in shard_paths(shards_dir, split)]
    keys, captions = read_captions(paths)
    if not keys:
        raise DataError(f"{shards_dir}: the shards hold no samples")
    encoder = load_text_encoder(cfg)
    return build_cache(keys, captions, encoder, Path(out), cfg.batch_size, cfg.prompts)
