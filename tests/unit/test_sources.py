"""The openmoji, folder and hf sources through the download step."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imager import config
from imager.data import openmoji
from imager.data.download import download
from imager.errors import SourceError
from tests.conftest import png_bytes


def dl_cfg(**download):
    return config.parse({"download": download}).download


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ openmoji


def test_openmoji_ships_about_four_thousand_named_emoji():
    codes = openmoji.hexcodes()
    named = [c for c in codes if openmoji.caption(c) is not None]
    assert len(codes) > 4000
    assert 3800 <= len(named) <= 4100  # the issue expects about 3,950


@pytest.mark.parametrize(
    "code, name",
    [
        ("1F600", "grinning face"),
        ("2764-FE0F", "red heart"),
        ("1F1EF-1F1F5", "flag: Japan"),
        ("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "flag: England"),
        ("1F3F3-FE0F-200D-1F308", "rainbow flag"),  # a flag emoji, not a country flag
    ],
)
def test_openmoji_captions_are_cldr_names(code, name):
    assert openmoji.caption(code) == name


def test_openmoji_extras_have_no_name():
    extras = [c for c in openmoji.hexcodes() if c.startswith("E")]  # private-use OpenMoji extras
    assert extras and all(openmoji.caption(c) is None for c in extras)


def _ink(image: Image.Image) -> np.ndarray:
    return (np.asarray(image).astype(int).sum(-1) < 3 * 250)  # (H, W) non-white pixels


def _mean_ink_colour(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image).astype(float)
    ink = _ink(image)
    return arr[ink].mean(0)


def test_openmoji_render_is_rgb_on_white_and_centred():
    image = openmoji.render("1F600", 64)
    assert image.mode == "RGB" and image.size == (64, 64)
    arr = np.asarray(image)
    assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()
    ys, xs = np.nonzero(_ink(image))
    assert abs(xs.mean() - 31.5) < 4 and abs(ys.mean() - 31.5) < 4


def test_openmoji_colours_are_real():
    r, g, b = _mean_ink_colour(openmoji.render("2764-FE0F", 64))  # red heart
    assert r > 150 and r > 2 * g and r > 2 * b
    r, g, b = _mean_ink_colour(openmoji.render("1F600", 64))  # grinning face: yellow
    assert r > 150 and g > 150 and b < 120


def test_openmoji_sequences_are_shaped_into_one_glyph():
    # Without shaping, a ZWJ family renders as three people side by side and overflows the canvas.
    family = _ink(openmoji.render("1F468-200D-1F469-200D-1F467", 64))
    ys, xs = np.nonzero(family)
    assert xs.min() > 0 and xs.max() < 63
    flag = openmoji.render("1F1EF-1F1F5", 64)  # Japan: a red disc on white, one glyph
    r, g, b = _mean_ink_colour(flag)
    assert r > g and r > b


def test_openmoji_download_counts_skips_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(openmoji, "hexcodes", lambda: ["1F1EF-1F1F5", "1F600", "2764-FE0F", "E000"])
    report = download(dl_cfg(resolution=32), tmp_path / "a")
    assert report == {"source": "openmoji", "seen": 4, "kept": 3, "skipped": 1, "skipped_by_reason": {"no_name": 1}}
    manifest = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in manifest] == ["1F1EF-1F1F5", "1F600", "2764-FE0F"]
    for rec in manifest:
        data = (tmp_path / "a" / rec["file"]).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert (rec["width"], rec["height"]) == (32, 32) == Image.open(io.BytesIO(data)).size
        assert rec["licence"] == "CC BY-SA 4.0" and rec["source"] == "openmoji"
        assert (tmp_path / "a" / "images" / f"{rec['key']}.txt").read_text().strip() == rec["caption"]
    download(dl_cfg(resolution=32), tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_openmoji_limit_takes_the_first_entries(tmp_path):
    report = download(dl_cfg(resolution=16, limit=5), tmp_path / "out")
    assert report["seen"] == 5
    keys = [json.loads(line)["key"] for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert keys == [c for c in openmoji.hexcodes()[:5] if openmoji.caption(c)]


# -------------------------------------------------------------------------------------- folder


def make_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(png_bytes((200, 0, 0)))
    (root / "cat.txt").write_text("a red   cat\n")
    (root / "cat.jpg").write_bytes(png_bytes((0, 0, 200), fmt="JPEG"))
    (root / "cat.jpg.txt").write_text("unused")  # not the same stem: ignored as a caption
    (root / "sub" / "dog.webp").write_bytes(png_bytes((0, 200, 0), fmt="WEBP"))
    (root / "sub" / "dog.txt").write_text("a green dog")
    (root / "nocap.png").write_bytes(png_bytes())
    (root / "blank.png").write_bytes(png_bytes())
    (root / "blank.txt").write_text("   \n")
    (root / "notes.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0\0")


def test_folder_with_txt_captions(tmp_path):
    src = tmp_path / "src"
    make_folder(src)
    report = download(dl_cfg(source="folder", folder={"path": str(src), "licence": "CC0"}), tmp_path / "out")
    assert report["skipped_by_reason"] == {"empty_caption": 1, "no_caption": 1, "unsupported_file": 1}
    manifest = {r["origin"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert set(manifest) == {str(src / "cat.png"), str(src / "cat.jpg"), str(src / "sub" / "dog.webp")}
    keys = {r["key"] for r in manifest.values()}
    assert len(keys) == 3 and "sub__dog" in keys  # cat.png and cat.jpg keep distinct keys
    dog = manifest[str(src / "sub" / "dog.webp")]
    assert dog["caption"] == "a green dog" and dog["licence"] == "CC0" and dog["file"].endswith(".webp")
    assert (tmp_path / "out" / dog["file"]).read_bytes() == (src / "sub" / "dog.webp").read_bytes()
    assert manifest[str(src / "cat.png")]["caption"] == "a red cat"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_with_captions_table(tmp_path, fmt):
    src = tmp_path / "src"
    make_folder(src)
    rows = [("cat.png", "red cat"), ("sub/dog.webp", "green dog"), ("gone.png", "missing"), ("nocap.png", "")]
    if fmt == "jsonl":
        text = "".join(json.dumps({"path": f, "text": c}) + "\n" for f, c in rows)
    else:
        text = "path,text\n" + "".join(f"{f},{c}\n" for f, c in rows)
    (src / f"captions.{fmt}").write_text(text)
    cfg = dl_cfg(source="folder", folder={"path": str(src), "captions": f"captions.{fmt}", "file_column": "path", "caption_column": "text"})
    report = download(cfg, tmp_path / "out")
    assert report["kept"] == 2
    assert report["skipped_by_reason"] == {"empty_caption": 1, "missing_file": 1}


def test_folder_captions_must_be_utf8(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for name, caption in [("a", "caf\u00e9 au lait".encode()), ("b", b"caf\xe9"), ("c", b"\xff\xfe"), ("d", b"\xef\xbb\xbfbom  cat")]:
        (src / f"{name}.png").write_bytes(png_bytes())
        (src / f"{name}.txt").write_bytes(caption)
    (src / "notes.json").write_text("{}")
    (src / "notes.txt").write_bytes(b"\xe9")  # beside a file that is not an image: that reason wins
    with caplog.at_level("WARNING", logger="imager.data"):
        report = download(dl_cfg(source="folder", folder={"path": str(src)}), tmp_path / "out")
    assert report["skipped_by_reason"] == {"caption_not_utf8": 2, "unsupported_file": 1}
    manifest = {r["key"]: r["caption"] for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert manifest == {"a": "caf\u00e9 au lait", "d": "bom cat"}  # the UTF-8 BOM is not part of the text
    warnings = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{src / 'b.txt'}: caption is not valid UTF-8")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_table_captions_must_be_utf8(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("good", "bad"):
        (src / f"{name}.png").write_bytes(png_bytes())
    if fmt == "jsonl":
        text = b'{"file": "good.png", "caption": "caf\xc3\xa9"}\n{"file": "bad.png", "caption": "caf\xe9"}\n'
    else:
        text = b"file,caption\ngood.png,caf\xc3\xa9\nbad.png,caf\xe9\n"
    (src / f"captions.{fmt}").write_bytes(text)
    report = download(dl_cfg(source="folder", folder={"path": str(src), "captions": f"captions.{fmt}"}), tmp_path / "out")
    assert report["skipped_by_reason"] == {"caption_not_utf8": 1}
    [record] = map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    assert (record["key"], record["caption"]) == ("good", "caf\u00e9")


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match=r"^params.yaml: download.folder.path: .*nope: directory not found$"):
        download(dl_cfg(source="folder", folder={"path": str(tmp_path / "nope")}), tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match=r"^params.yaml: download.folder.path: .*file: not a directory$"):
        download(dl_cfg(source="folder", folder={"path": str(tmp_path / "file")}), tmp_path / "out")
    (tmp_path / "src").mkdir()
    cfg = dl_cfg(source="folder", folder={"path": str(tmp_path / "src"), "captions": "gone.csv"})
    with pytest.raises(SourceError) as info:
        download(cfg, tmp_path / "out")
    assert str(info.value) == f"params.yaml: download.folder.captions: {tmp_path / 'src' / 'gone.csv'}: file not found"
    (tmp_path / "src" / "caps.csv").write_text("file,text\na.png,x\n")
    cfg = dl_cfg(source="folder", folder={"path": str(tmp_path / "src"), "captions": "caps.csv"})
    with pytest.raises(SourceError, match=r"caps.csv: no column 'caption' \(columns: file, text\)"):
        download(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ hf


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hf")
    images = [Image.new("RGB", (12, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    ds = datasets.Dataset.from_dict(
        {"img": images, "caption": ["red", "green", ""], "id": ["r", "g", "b"]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"), "id": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "saved"))
    (root / "files").mkdir()
    ds.to_parquet(str(root / "files" / "train.parquet"))
    return root


def test_hf_save_to_disk_dataset(tmp_path, hf_dataset):
    cfg = dl_cfg(source="hf", hf={"name": str(hf_dataset / "saved"), "image_column": "img", "caption_column": "caption", "key_column": "id", "licence": "CC0"})
    report = download(cfg, tmp_path / "out")
    assert report["kept"] == 2 and report["skipped_by_reason"] == {"empty_caption": 1}
    recs = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["key"], r["caption"], r["width"], r["height"]) for r in recs] == [("g", "green", 12, 10), ("r", "red", 12, 10)]
    red = Image.open(tmp_path / "out" / recs[1]["file"]).convert("RGB")
    assert red.getpixel((0, 0)) == (255, 0, 0)


def test_hf_local_data_files_folder(tmp_path, hf_dataset):
    cfg = dl_cfg(source="hf", limit=2, hf={"name": str(hf_dataset / "files"), "image_column": "img", "caption_column": "caption"})
    report = download(cfg, tmp_path / "out")
    assert report["seen"] == 2 and report["kept"] == 2
    keys = [json.loads(line)["key"] for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert keys == ["00000000", "00000001"]


def test_hf_errors(tmp_path, hf_dataset):
    cfg = dl_cfg(source="hf", hf={"name": str(hf_dataset / "saved"), "split": "test"})
    with pytest.raises(SourceError, match=r"download.hf.split: 'test' not in .* \(splits: train\)"):
        download(cfg, tmp_path / "out")
    cfg = dl_cfg(source="hf", hf={"name": str(hf_dataset / "saved"), "image_column": "picture"})
    with pytest.raises(SourceError, match=r"no column 'picture'"):
        download(cfg, tmp_path / "out")
    cfg = dl_cfg(source="hf", hf={"name": str(tmp_path / "missing-dataset")})
    with pytest.raises(SourceError, match="download.hf.name: cannot load dataset"):
        download(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
