"""The shard step: corrupt and odd inputs are skipped and counted, outputs are deterministic."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from imager import config
from imager.data.images import Rejected, odd_mode
from imager.data.records import Skip
from imager.data.shard import read_index, shard, shard_paths, split_of
from imager.errors import DataError
from tests.conftest import make_download, png_bytes


def shard_cfg(**shard):
    return config.parse({"shard": {"resolution": 16, "samples_per_shard": 3, "val_fraction": 0.0, **shard}}).shard


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (IHDR rewritten, CRC fixed): an absurd image."""
    data = bytearray(png_bytes(size=(8, 8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def odd_inputs() -> dict[str, bytes]:
    gif = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    i16 = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(i16, format="PNG")
    i16b = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, dtype=">u2")).save(i16b, format="TIFF")  # opens as I;16B
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_buf = io.BytesIO()
    pal.save(pal_buf, format="PNG")
    return {
        "cmyk": png_bytes((0, 255, 255, 0), mode="CMYK", fmt="JPEG"),
        "sixteen": i16.getvalue(),
        "sixteen_big_endian": i16b.getvalue(),
        "palette": pal_buf.getvalue(),
        "animated": gif.getvalue(),
    }


def read_shards(out: Path, split: str = "train") -> list[dict]:
    paths = [str(p) for p in shard_paths(out, split)]
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False)) if paths else []


def test_corrupt_inputs_are_skipped_and_counted(tmp_path):
    good = png_bytes((10, 20, 30), size=(20, 20))
    files = {
        "good": good,
        "empty": b"",
        "truncated": png_bytes(size=(64, 64))[:60],
        "text": b"this is not an image at all",
        "tiny": png_bytes(size=(2, 2)),
        "elongated": png_bytes(size=(80, 8)),
        "bomb": png_with_size(100_000, 100_000),
        "long_side": png_with_size(2_000, 1_000),  # over max_side=1000 below
        **odd_inputs(),
    }
    download = make_download(tmp_path / "raw", files)
    (download / "images" / "gone.bin").write_bytes(good)
    with open(download / "manifest.jsonl", "a") as fh:
        fh.write(json.dumps({"key": "missing", "caption": "x", "file": "images/missing.bin"}) + "\n")
    report = shard(download, tmp_path / "shards", shard_cfg(max_side=1000))
    assert report["kept"] == 1 and report["seen"] == len(files) + 1
    assert report["skipped_by_reason"] == {
        "animated": 1,
        "bad_dimensions": 3,  # tiny, elongated, long_side
        "empty_file": 1,
        "missing_file": 1,
        "not_an_image": 1,
        "odd_mode_cmyk": 1,
        "odd_mode_i16": 1,
        "odd_mode_i16b": 1,
        "odd_mode_p": 1,
        "too_many_pixels": 1,
        "truncated": 1,
    }
    assert report["skipped"] == sum(report["skipped_by_reason"].values())
    [sample] = read_shards(tmp_path / "shards")
    assert sample["__key__"] == "good"


def test_odd_modes_convert_keeps_them_with_the_right_colours(tmp_path):
    download = make_download(tmp_path / "raw", odd_inputs())
    report = shard(download, tmp_path / "shards", shard_cfg(odd_modes="convert"))
    assert report["kept"] == 5 and report["skipped"] == 0
    assert report["converted_by_mode"] == {"animated": 1, "odd_mode_cmyk": 1, "odd_mode_i16": 1, "odd_mode_i16b": 1, "odd_mode_p": 1}
    images = {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["png"]))) for s in read_shards(tmp_path / "shards")}
    assert tuple(images["palette"][8, 8]) == (10, 200, 30)
    assert abs(int(images["sixteen"][8, 8, 0]) - 40000 // 256) <= 1  # 16-bit scaled to 8-bit
    assert abs(int(images["sixteen_big_endian"][8, 8, 0]) - 40000 // 256) <= 1
    assert images["cmyk"][8, 8, 0] > 200 and (images["cmyk"][8, 8, 1:] < 40).all()  # C=0 M=Y=100%: red


@pytest.mark.parametrize(
    "mode, reason",
    [("I;16", "odd_mode_i16"), ("I;16B", "odd_mode_i16b"), ("CMYK", "odd_mode_cmyk"), ("YCbCr", "odd_mode_ycbcr"), ("1", "odd_mode_1")],
)
def test_odd_mode_reasons_are_mlflow_metric_names(mode, reason):
    assert odd_mode(mode) == reason


def test_a_reason_that_is_not_a_metric_name_is_a_bug():
    with pytest.raises(ValueError, match=r"'odd_mode:I;16' must match"):
        Rejected("odd_mode:I;16")
    with pytest.raises(ValueError, match=r"'HTTP 404' must match"):
        Skip("HTTP 404", "http://127.0.0.1/a.png")


def test_alpha_is_composited_on_white(tmp_path):
    rgba = png_bytes((255, 0, 0, 0), mode="RGBA", size=(16, 16))  # fully transparent red
    download = make_download(tmp_path / "raw", {"clear": rgba})
    shard(download, tmp_path / "shards", shard_cfg())
    [sample] = read_shards(tmp_path / "shards")
    assert (np.asarray(Image.open(io.BytesIO(sample["png"]))) == 255).all()


def test_resize_and_centre_crop(tmp_path):
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :16] = (0, 0, 255)  # left quarter blue
    arr[:, 16:48] = (0, 255, 0)  # middle half green
    arr[:, 48:] = (255, 0, 0)  # right quarter red
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    download = make_download(tmp_path / "raw", {"wide": buf.getvalue()})
    shard(download, tmp_path / "shards", shard_cfg(resolution=16))
    [sample] = read_shards(tmp_path / "shards")
    out = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert out.shape == (16, 16, 3)
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, [0, 2]] < 50).all()  # the centre is green


def test_shards_are_complete_sorted_and_deterministic(tmp_path):
    files = {f"k{i:02d}": png_bytes((i * 10, 0, 0), size=(24, 24)) for i in range(10)}
    download = make_download(tmp_path / "raw", files)
    cfg = shard_cfg(val_fraction=0.3)
    report = shard(download, tmp_path / "a", cfg)
    shard(download, tmp_path / "b", cfg)
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    index = read_index(tmp_path / "a")
    assert index["resolution"] == 16
    assert index["splits"]["train"]["count"] + index["splits"]["val"]["count"] == 10 == report["kept"]
    for split in ("train", "val"):
        samples = read_shards(tmp_path / "a", split)
        keys = [s["__key__"] for s in samples]
        assert keys == sorted(keys) and all(split_of(k, 0.3) == split for k in keys)
        assert len(index["splits"][split]["shards"]) == -(-len(keys) // 3)  # 3 samples per shard
        for s in samples:
            assert s["txt"].decode() == f"caption of {s['__key__']}"
            assert json.loads(s["json"])["licence"] == "CC0"
            assert Image.open(io.BytesIO(s["png"])).size == (16, 16)


def test_split_is_a_stable_hash_of_the_key():
    keys = [f"key-{i}" for i in range(20_000)]
    val = [k for k in keys if split_of(k, 0.2) == "val"]
    assert abs(len(val) / len(keys) - 0.2) < 0.015
    assert all(split_of(k, 0.0) == "train" for k in keys[:100])
    assert set(val) <= {k for k in keys if split_of(k, 0.5) == "val"}  # growing the fraction only adds


def test_missing_manifest_and_nothing_usable(tmp_path):
    with pytest.raises(DataError, match="no manifest; run `imager download` first"):
        shard(tmp_path / "nothing", tmp_path / "out", shard_cfg())
    download = make_download(tmp_path / "raw", {"bad": b"", "worse": b"junk"})
    with pytest.raises(DataError, match=r"no usable images \(skipped: .*empty_file"):
        shard(download, tmp_path / "out", shard_cfg())
    assert not (tmp_path / "out").exists()
