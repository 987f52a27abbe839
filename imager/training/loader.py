"""A streaming, seeded, resumable loader over webdataset shards.

Every epoch reads the split's shards in a seeded order through a seeded shuffle buffer
(webdataset's), giving one global sample stream per epoch. Stream position ``i`` belongs to reader
``i mod R`` where readers are all (rank, worker) pairs, R = world_size × num_workers: every sample is
seen by exactly one reader, and the streams are the same whatever the machine.

Each reader yields an endless sequence of batches (epochs follow one another), and a DataLoader
takes batches from its workers in turn, so after ``k`` batches the position of every reader is
known. ``state_dict()`` is that count; ``load_state_dict`` makes the next batch exactly the one an
uninterrupted run would have seen (the skipped samples are not decoded).

Shards are read through an index: one pass of the standard library's ``tarfile`` over a shard's
headers gives each sample's key and the offset and size of its PNG (cached per process, keyed by
the file's path, size and modification time), and every later epoch reads just those bytes.
Parsing tar headers in Python costs more than decoding a small PNG, so they are parsed once per
process rather than once per epoch. A shard is indexed when the stream first reaches it;
:meth:`ShardLoader.build_index` does all of a split's shards up front. Samples are grouped by
webdataset's own name rule (``base_plus_ext``) in tar order, so the stream is the one
``webdataset.WebDataset`` gives, sample for sample.
"""

from __future__ import annotations

import functools
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imager.data.images import decode_png
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


@functools.lru_cache(maxsize=1024)
def _index(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, int, int], ...]:
    """(key, offset, size) of every sample's PNG in a shard, in tar order (size and mtime: the cache key)."""
    from webdataset.tariterators import base_plus_ext

    samples: list[tuple[str, int, int]] = []
    key, png = None, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                    continue  # webdataset skips the same: directories, links, __meta__ files
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        samples.append(_sample(path, key, png))
                    key, png = prefix, None
                if suffix.lower() == "png":
                    png = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from e
    if key is not None:
        samples.append(_sample(path, key, png))
    return tuple(samples)


def _sample(path: str, key: str, png: tuple[int, int] | None) -> tuple[str, int, int]:
    if png is None:
        raise DataError(f"{path}: sample {key!r} has no .png")
    return key, *png


def _shard_index(path: str) -> tuple[tuple[str, int, int], ...]:
    """The cached index of a shard; a rewritten file (new size or mtime) is indexed again."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard ({e.strerror}); run `imager shard` again") from e
    return _index(path, st.st_size, st.st_mtime_ns)


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """A shard's samples ``{"__key__", "png"}`` in tar order, reading only the PNG bytes."""
    index = _shard_index(path)
    with open(path, "rb") as f:
        for key, offset, size in index:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"{path}: truncated at sample {key!r}; shard again")
            yield {"__key__": key, "png": data}


def epoch_stream(spec: StreamSpec, epoch: int) -> Iterator[dict[str, Any]]:
    """The raw (undecoded) samples of one epoch in their global shuffled order."""
    import webdataset as wds

    rng = random.Random(f"{spec.seed}:{epoch}")
    shards = list(spec.shards)
    rng.shuffle(shards)
    raw: Iterator[dict[str, Any]] = (sample for path in shards for sample in read_shard(path))
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
                batch_keys.append(sample["__key__"])
                batch_images.append(decode_png(sample["png"], sample["__key__"]))
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

    def build_index(self) -> int:
        """Index every shard of the split now instead of when the stream first reaches it, and return
        the number of samples indexed. The one tar-header pass per shard (cached for this process) is
        then out of the way before a timed or long run, and a damaged shard raises its
        :class:`DataError` here rather than mid-epoch. The cache is this process's: DataLoader
        workers started by fork inherit it, spawned ones build their own."""
        return sum(len(_shard_index(path)) for path in self.spec.shards)

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
