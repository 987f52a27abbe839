"""The streaming loader: seeded, complete per epoch, split across ranks and workers, resumable."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from imager import config
from imager.data.shard import shard
from imager.errors import DataError
from imager.training.loader import ShardLoader
from tests.conftest import make_download, png_bytes

N = 37  # samples: not a multiple of anything below, so epochs straddle batches


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    files = {f"s{i:03d}": png_bytes((i * 6, 255 - i * 6, (i * 40) % 256), size=(12, 12)) for i in range(N)}
    download = make_download(root / "raw", files)
    cfg = config.parse({"shard": {"resolution": 8, "samples_per_shard": 5, "val_fraction": 0.0}}).shard
    shard(download, root / "shards", cfg)
    return root / "shards"


def keys(loader: ShardLoader, batches: int) -> list[list[str]]:
    return [b["keys"] for b in itertools.islice(iter(loader), batches)]


def make(shards, **kw) -> ShardLoader:
    return ShardLoader(shards, "train", **{"batch_size": 4, "seed": 3, "shuffle_buffer": 8, **kw})


def test_batches_hold_decoded_images(shards):
    batch = next(iter(make(shards)))
    assert batch["images"].shape == (4, 3, 8, 8) and batch["images"].dtype == torch.uint8
    assert len(batch["keys"]) == 4 and all(k.startswith("s") for k in batch["keys"])


def test_each_epoch_sees_every_sample_once_and_epochs_differ(shards):
    flat = [k for b in keys(make(shards, batch_size=1), 2 * N) for k in b]
    first, second = flat[:N], flat[N:]
    assert sorted(first) == sorted(second) == [f"s{i:03d}" for i in range(N)]
    assert first != second  # a new shuffle each epoch
    assert first != sorted(first)  # shuffled at all


def test_same_seed_same_stream_other_seed_other_stream(shards):
    assert keys(make(shards), 20) == keys(make(shards), 20)
    assert keys(make(shards), 20) != keys(make(shards, seed=4), 20)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 9, 10])
def test_resume_continues_the_exact_stream(shards, workers, cut):
    whole = keys(make(shards, num_workers=workers), 25)
    first = make(shards, num_workers=workers)
    head = keys(first, cut)
    resumed = make(shards, num_workers=workers)
    resumed.load_state_dict(first.state_dict())
    assert head + keys(resumed, 25 - cut) == whole


def test_ranks_and_workers_partition_the_epoch(shards):
    per_rank = []
    for rank in range(2):
        loader = make(shards, batch_size=3, rank=rank, world_size=2, num_workers=2)
        per_rank.append([k for b in keys(loader, 4) for k in b])  # 4 batches × 3 = 12 ≤ 37 / 2 / 2 × 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == len(per_rank[0]) == 12


def test_too_small_split_for_the_batch_is_a_clear_error(shards):
    with pytest.raises(DataError, match="fewer than batch_size 64"):
        next(iter(make(shards, batch_size=64)))
    with pytest.raises(DataError, match="the val split is empty"):
        ShardLoader(shards, "val", batch_size=1, seed=0)
