"""The shard step: the download output -> webdataset tar shards for training.

Each sample is ``{key}.png`` (lossless RGB, ``resolution``² after resize + centre crop),
``{key}.txt`` (the caption) and ``{key}.json`` (provenance: source, licence, original sha256 and
size). The train/val split is a pure function of the key (a hash), so adding samples never moves
old ones between splits. Samples are written in key order with fixed tar metadata, so identical
inputs give byte-identical shards. ``index.json`` lists the shards and counts per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from imager.data.config import Shard
from imager.data.images import Rejected, decode, decode_png, encode_png, square
from imager.data.records import MANIFEST
from imager.errors import DataError
from imager.io import atomic_dir, atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

INDEX = "index.json"
SPLITS = ("train", "val")


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for a fixed ``val_fraction`` of keys, chosen by a hash of the key; else ``train``."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64  # U[0, 1)
    return "val" if u < val_fraction else "train"


def read_manifest(download_dir: Path) -> list[dict[str, Any]]:
    path = Path(download_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `imager download` first (or `dvc repro download`)")
    try:
        records = read_jsonl(path)
    except ValueError as exc:
        raise DataError(f"{path}: corrupt manifest ({exc})") from None
    for i, rec in enumerate(records):
        if not {"key", "caption", "file"} <= rec.keys():
            raise DataError(f"{path}: line {i + 1} lacks one of key, caption, file")
    return sorted(records, key=lambda r: r["key"])


def shard(download_dir: Path, out: Path, cfg: Shard) -> dict[str, Any]:
    """Write shards for every usable sample of ``download_dir`` into ``out``; return the report."""
    import webdataset as wds

    download_dir = Path(download_dir)
    records = read_manifest(download_dir)
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    counts = {s: 0 for s in SPLITS}
    with atomic_dir(Path(out)) as tmp:
        writers: dict[str, Any] = {}
        try:
            for rec in tqdm(records, desc="shard", unit="img"):
                path = download_dir / rec["file"]
                try:
                    if not path.is_file():
                        raise Rejected("missing_file")
                    image, odd = decode(path.read_bytes(), cfg)
                except Rejected as rej:
                    skipped[rej.reason] += 1
                    continue
                if odd:
                    converted[odd] += 1
                split = split_of(rec["key"], cfg.val_fraction)
                if split not in writers:
                    pattern = str(tmp / f"{split}-%06d.tar")
                    writers[split] = wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0, mtime=0)
                meta = {k: rec.get(k) for k in ("source", "licence", "sha256", "width", "height", "origin")}
                writers[split].write(
                    {
                        "__key__": rec["key"],
                        "png": encode_png(square(image, cfg.resolution, cfg.resample)),
                        "txt": rec["caption"],
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
                counts[split] += 1
        finally:
            for writer in writers.values():
                writer.close()
        if not any(counts.values()):
            raise DataError(f"{download_dir}: no usable images (skipped: {dict(skipped) or 'none'})")
        index = {
            "resolution": cfg.resolution,
            "splits": {s: {"count": counts[s], "shards": sorted(p.name for p in tmp.glob(f"{s}-*.tar"))} for s in SPLITS},
        }
        atomic_write_json(tmp / INDEX, index)
    report = {
        "seen": len(records),
        "kept": sum(counts.values()),
        "train": counts["train"],
        "val": counts["val"],
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "converted_by_mode": dict(sorted(converted.items())),
    }
    if skipped:
        log.warning("shard: skipped %d inputs: %s", report["skipped"], report["skipped_by_reason"])
    return report


def read_index(shards_dir: Path) -> dict[str, Any]:
    path = Path(shards_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: no shard index; run `imager shard` first (or `dvc repro shard`)")
    return json.loads(path.read_text(encoding="utf-8"))


def shard_paths(shards_dir: Path, split: str) -> list[Path]:
    return [Path(shards_dir) / name for name in read_index(shards_dir)["splits"][split]["shards"]]


def read_samples(shards: Sequence[Path | str], limit: int | None = None) -> tuple[list[str], list[str], Any]:
    """(keys, captions, uint8 images (N, 3, S, S)) of the first ``limit`` samples (all when None)
    of the given shards, in shard order."""
    import torch
    import webdataset as wds

    keys, captions, images = [], [], []
    if shards and limit != 0:
        for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False):
            images.append(decode_png(s["png"], s["__key__"]))
            keys.append(s["__key__"])
            captions.append(s["txt"].decode("utf-8"))
            if len(keys) == limit:
                break
    if not images:
        raise DataError(f"no samples in {len(shards)} shard(s); re-run `imager shard`")
    return keys, captions, torch.stack(images)
