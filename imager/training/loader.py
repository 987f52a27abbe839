"""A streaming, seeded, resumable loader over webdataset shards.

Every epoch reads the split's shards in a seeded order through a seeded shuffle buffer
(webdataset's), giving one global sample stream per epoch. Stream position ``i`` belongs to reader
``i mod R`` where readers are all (rank, worker) pairs, R = world_size × num_workers: every sample is
seen by exactly one reader, and the streams are the same whatever the machine.

Each reader yields an endless sequence of batches (epochs follow one another), and a DataLoader
takes batches from its workers in turn, so after ``k`` batches the position of every reader is
known. ``state_dict()`` is that count; ``load_state_dict`` makes the next batch exactly the one an
uninterrupted run would have seen (the skipped samples are not decoded).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imager.data.shard import read_index
from imager.errors import DataError


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[str, ...]
    count: int  # samples in the split
    seed: int
    shuffle_buffer: int
    batch_size: int
    rank: int = 0
    world_size: int = 1


def _decode(sample: dict[str, Any]) -> tuple[str, torch.Tensor]:
    with Image.open(io.BytesIO(sample["png"])) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return sample["__key__"], torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W) uint8


def epoch_stream(spec: StreamSpec, epoch: int) -> Iterator[dict[str, Any]]:
    """The raw (undecoded) samples of one epoch in their global shuffled order."""
    import webdataset as wds

    rng = random.Random(f"{spec.seed}:{epoch}")
    shards = list(spec.shards)
    rng.shuffle(shards)
    raw = iter(wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None))
    if spec.shuffle_buffer > 1:
        raw = wds.filters.shuffle(bufsize=spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)(raw)
    return raw


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches ``{"keys": [B], "images": (B, 3, H, W) uint8}`` for this rank's readers."""

    def __init__(self, spec: StreamSpec, start_batches: int = 0, num_workers: int = 0):
        super().__init__()
        self.spec, self.start_batches, self.num_workers = spec, start_batches, num_workers

    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.num_workers)
        # A DataLoader takes batch k from worker k mod W. After a resume at batch k0 it starts again at
        # worker 0, so worker j plays the part of worker (j + k0) mod W of the uninterrupted run.
        worker = ((info.id if info is not None else 0) + self.start_batches) % workers
        return self.spec.rank * workers + worker, self.spec.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._reader()
        workers = max(1, self.num_workers)
        worker = reader % workers
        mine = len(range(reader, self.spec.count, readers))  # samples per epoch for this reader
        if mine < self.spec.batch_size:
            raise DataError(
                f"{mine} samples per epoch for one reader is fewer than batch_size {self.spec.batch_size}; "
                "lower the batch size, the workers or the processes"
            )
        done = self.start_batches // workers + (1 if worker < self.start_batches % workers else 0)
        skip = done * self.spec.batch_size
        epoch, skip = divmod(skip, mine)
        batch_keys: list[str] = []
        batch_images: list[torch.Tensor] = []
        while True:
            for i, sample in enumerate(epoch_stream(self.spec, epoch)):
                if i % readers != reader:
                    continue
                if skip:
                    skip -= 1
                    continue
                key, image = _decode(sample)
                batch_keys.append(key)
                batch_images.append(image)
                if len(batch_keys) == self.spec.batch_size:
                    yield {"keys": batch_keys, "images": torch.stack(batch_images)}
                    batch_keys, batch_images = [], []
            epoch += 1


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    [item] = batch  # the stream yields whole batches
    return item


class ShardLoader:
    """Batches of a split for one rank, with a resumable position (``state_dict``)."""

    def __init__(
        self,
        shards_dir: Path,
        split: str,
        *,
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        index = read_index(shards_dir)
        if split not in index["splits"] or not index["splits"][split]["count"]:
            raise DataError(f"{shards_dir}: the {split} split is empty; lower shard.val_fraction or add data")
        info = index["splits"][split]
        shards = tuple(str(Path(shards_dir) / name) for name in info["shards"])
        self.spec = StreamSpec(shards, info["count"], seed, shuffle_buffer, batch_size, rank, world_size)
        self.resolution = int(index["resolution"])
        self.num_workers = num_workers
        self.batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = ShardStream(self.spec, self.batches, self.num_workers)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=1, collate_fn=_collate, num_workers=self.num_workers,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.spec.seed),  # never draw from the global RNG
        )
        for batch in loader:
            self.batches += 1
            yield batch
