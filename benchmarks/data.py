"""Comparison 4: the webdataset ShardLoader vs a folder of PNG files.

Both sides read the same PNG bytes into batches of the same size, in one process
(``num_workers=0``, the params default), and decode them the same way (the loader's
:func:`imager.data.images.decode_png`, Pillow), so the ratio is the container's: an indexed tar
shard vs one file per sample. The folder holds the shards' own PNGs, written to a temporary
directory first; both are read from the page cache once warm (the first rounds are warm-up). The
shard index (one ``tarfile`` pass per shard, then cached) is built before timing by
:meth:`ShardLoader.build_index`, as the folder side's file list is: both are one-time costs, and a
loader meets each shard's on first touch. Without shards (no index.json), a small synthetic shard
set is made with :func:`imager.data.shard.shard` so the benchmark still runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import interleaved, median
from benchmarks.report import Comparison
from imager.data.config import Shard
from imager.data.images import decode_png
from imager.data.shard import INDEX, shard, shard_paths
from imager.training.loader import ShardLoader

log = logging.getLogger(__name__)
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "black", "white")
SHAPES = ("circle", "square", "star", "heart", "triangle", "moon")


@dataclass(frozen=True)
class Sample:
    key: str
    caption: str
    png: bytes


def synthetic_shards(out: Path, *, count: int, resolution: int, seed: int) -> Path:
    """A shard set of ``count`` coloured-shape images with captions, made by the shard step."""
    rng = np.random.default_rng(seed)
    raw = Path(out).parent / f"{Path(out).name}-raw"
    (raw / "images").mkdir(parents=True)
    records = []
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    for i in range(count):
        a, b, c = rng.random(3)
        image = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], axis=-1)  # (R, R, 3) smooth gradient
        x0, y0 = rng.integers(0, resolution // 2, 2)
        image[y0 : y0 + resolution // 3, x0 : x0 + resolution // 3] = rng.random(3)  # a block of colour
        buf = io.BytesIO()
        Image.fromarray((image * 255).astype(np.uint8)).save(buf, format="PNG")
        key = f"synthetic-{i:06d}"
        (raw / "images" / f"{key}.png").write_bytes(buf.getvalue())
        caption = f"{COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]} number {i}"
        records.append({"key": key, "caption": caption, "file": f"images/{key}.png", "source": "synthetic", "licence": "CC0",
                        "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    shard(raw, out, Shard(resolution=resolution, val_fraction=0.1, samples_per_shard=max(8, count // 4)))
    return Path(out)


def ensure_shards(shards_dir: Path, tmp: Path, *, count: int, resolution: int, seed: int) -> tuple[Path, bool]:
    """(a shard directory, whether it is synthetic): ``shards_dir`` when it has an index."""
    if (Path(shards_dir) / INDEX).is_file():
        return Path(shards_dir), False
    log.info("bench: no shards at %s; making %d synthetic samples at %d px", shards_dir, count, resolution)
    return synthetic_shards(Path(tmp) / "shards", count=count, resolution=resolution, seed=seed), True


def first_samples(shards_dir: Path, n: int) -> list[Sample]:
    """The first ``n`` train samples in shard order (fewer when the split is smaller)."""
    import webdataset as wds

    out: list[Sample] = []
    paths = [str(p) for p in shard_paths(shards_dir, "train")]
    for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        out.append(Sample(s["__key__"], s["txt"].decode("utf-8"), s["png"]))
        if len(out) == n:
            break
    return out


def bench_data(shards_dir: Path, tmp: Path, *, batch_size: int, batches: int, shuffle_buffer: int, repeats: int, warmup: int,
               seed: int) -> Comparison:
    """Samples/s of ``batches`` batches per round from ShardLoader and from a PNG folder."""
    needed = (warmup + repeats) * batches * batch_size
    samples = first_samples(shards_dir, needed)
    folder = Path(tmp) / "png"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in samples:
        path = folder / f"{s.key}.png"
        path.write_bytes(s.png)
        files.append(path)
    loader = ShardLoader(shards_dir, "train", batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=0)
    started = time.perf_counter()
    loader.build_index()
    index_seconds = time.perf_counter() - started
    shard_batches = iter(loader)
    file_stream = cycle(files)

    def from_shards() -> None:
        for _ in range(batches):
            next(shard_batches)

    def from_folder() -> None:
        for _ in range(batches):
            chunk = [next(file_stream) for _ in range(batch_size)]
            keys = [p.stem for p in chunk]
            images = torch.stack([decode_png(p.read_bytes(), p.name) for p in chunk])  # (B, 3, H, W) uint8
            assert len(keys) == images.shape[0]

    times = interleaved({"shards": from_shards, "folder": from_folder}, repeats=repeats, warmup=warmup,
                        device=torch.device("cpu"), desc="bench: data loading")
    per_round = batches * batch_size
    details = {
        "batch_size": batch_size,
        "batches_per_round": batches,
        "shuffle_buffer": shuffle_buffer,
        "num_workers": 0,
        "resolution": loader.resolution,
        "distinct_png_files": len(files),
        "seconds_per_round": {n: {"median": median(t), "all": t} for n, t in times.items()},
        "decode": "imager.data.images.decode_png (Pillow) -> (3, H, W) uint8 RGB, stacked per batch, both sides",
        "shard_index": "one tarfile pass per shard, cached per process, built before timing",
        "shard_index_seconds": index_seconds,
        "shards": len(loader.spec.shards),
    }
    return Comparison("data_loading", "Data loading, PNG decode", "samples/s", "webdataset ShardLoader", per_round / median(times["shards"]),
                      "PNG folder + PIL", per_round / median(times["folder"]), details=details)
