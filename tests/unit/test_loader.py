"""The streaming loader: seeded, complete per epoch, split across ranks and workers, resumable."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imager import config
from imager.data.images import decode_png
from imager.data.shard import shard
from imager.errors import DataError
from imager.training.loader import ShardLoader, epoch_stream, read_shard
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


# ------------------------------------------------------------------ the indexed shard reader


def webdataset_stream(spec, epoch: int) -> list[tuple[str, bytes]]:
    """The stream as webdataset itself reads it: the same shard order and shuffle, tar parsed every time."""
    import random

    import webdataset as wds

    rng = random.Random(f"{spec.seed}:{epoch}")
    paths = list(spec.shards)
    rng.shuffle(paths)
    raw = iter(wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None))
    raw = wds.filters.shuffle(bufsize=spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)(raw)
    return [(s["__key__"], s["png"]) for s in raw]


@pytest.mark.parametrize("epoch", [0, 1])
def test_indexed_stream_is_webdatasets_sample_for_sample(shards, epoch):
    spec = make(shards).spec
    ours = [(s["__key__"], s["png"]) for s in epoch_stream(spec, epoch)]
    assert len(ours) == N
    assert ours == webdataset_stream(spec, epoch)


def test_batches_decode_the_shard_pngs(shards):
    spec = make(shards).spec
    pngs = dict(webdataset_stream(spec, 0))
    batch = next(iter(make(shards)))
    for key, image in zip(batch["keys"], batch["images"], strict=True):
        with Image.open(io.BytesIO(pngs[key])) as im:
            assert torch.equal(image, torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_rewritten_shard_is_indexed_again(tmp_path):
    path = tmp_path / "s.tar"
    write_tar(path, {"a.png": b"first", "a.txt": b"x", "b.png": b"2"})
    assert [(s["__key__"], s["png"]) for s in read_shard(str(path))] == [("a", b"first"), ("b", b"2")]
    write_tar(path, {"c.txt": b"y", "c.png": b"third!", "__meta__": b"skipped"})
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert [(s["__key__"], s["png"]) for s in read_shard(str(path))] == [("c", b"third!")]


def test_bad_shards_are_clear_errors(tmp_path):
    no_png = tmp_path / "no_png.tar"
    write_tar(no_png, {"a.png": b"1", "b.txt": b"caption", "b.json": b"{}"})
    with pytest.raises(DataError, match=r"no_png.tar: sample 'b' has no .png"):
        list(read_shard(str(no_png)))
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(DataError, match="not.tar: not a readable tar shard"):
        list(read_shard(str(not_tar)))
    with pytest.raises(DataError, match="key-7: not a decodable PNG"):
        decode_png(b"\x89PNG but not really", "key-7")
    with pytest.raises(DataError, match="gone.tar: cannot read the shard"):
        list(read_shard(str(tmp_path / "gone.tar")))


def test_build_index_counts_every_sample_and_names_a_damaged_shard(shards, tmp_path):
    assert make(shards).build_index() == N
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    victim = sorted(broken.glob("train-*.tar"))[1]
    victim.write_bytes(b"not a tar file at all" * 10)
    with pytest.raises(DataError, match=victim.name):
        make(broken).build_index()
