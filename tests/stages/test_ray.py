"""The data stages on a local Ray (two workers): download (openmoji, folder, hf, urls), shard and
embed write the same bytes as in one process, with units cut across the shard and batch
boundaries; a worker killed with kill -9 in the middle of a unit loses nothing; a unit's error is
the stage's one-line error; Ray missing or unreachable is one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imager import config
from imager.data.download import download
from imager.data.shard import shard
from imager.distributed import RaySettings, map_units
from imager.errors import ConfigError, DataError
from imager.text.embed import embed
from tests.conftest import make_download, png_bytes
from tests.stages.conftest import runner

ray = pytest.importorskip("ray")


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of two CPUs for the module: the stages join it (and leave it running)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def on_ray(section, **ray_settings):
    return section.model_copy(update={"distributor": "ray", "ray": RaySettings(**ray_settings)})


def test_download_on_ray_writes_the_same_bytes(local_ray, tmp_path):
    cfg = config.parse({"download": {"source": "openmoji", "resolution": 16, "limit": 23}}).download
    here = download(cfg, tmp_path / "here")
    there = download(on_ray(cfg, unit=5), tmp_path / "there")
    assert here == there and here["kept"] > 15
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def test_folder_keys_and_skips_come_out_in_order(local_ray, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(9):
        (src / f"img{i}.png").write_bytes(png_bytes((20 * i, 0, 0)))
        (src / f"img{i}.txt").write_text(f"red {i}" if i != 4 else "")
    (src / "img3.jpg").write_bytes(png_bytes((0, 9, 0), fmt="JPEG"))  # same key as img3.png: keyed apart
    (src / "img3.txt").write_text("three")
    (src / "sub" / "img1.png").write_bytes(png_bytes((0, 0, 9)))  # no caption
    cfg = config.parse({"download": {"source": "folder", "folder": {"path": str(src)}}}).download
    here = download(cfg, tmp_path / "here")
    there = download(on_ray(cfg, unit=2), tmp_path / "there")
    assert here == there and here["skipped_by_reason"] == {"empty_caption": 1, "no_caption": 1}
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def test_hf_duplicate_keys_are_judged_in_row_order(local_ray, tmp_path):
    import datasets

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (99, 0, 99)]
    ds = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (12, 10), c) for c in colours], "caption": ["a", "", "b", "c", "d"], "id": ["x", "y", "y", "x", "z"]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"), "id": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = config.parse({"download": {"source": "hf", "hf": {"name": str(tmp_path / "saved"), "image_column": "img", "caption_column": "caption", "key_column": "id"}}}).download
    here = download(cfg, tmp_path / "here")
    there = download(on_ray(cfg, unit=2), tmp_path / "there")
    # y: empty first, then kept; x: kept first, then a duplicate
    assert here == there and here["skipped_by_reason"] == {"duplicate_key": 1, "empty_caption": 1} and here["kept"] == 3
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def test_urls_are_fetched_by_the_units_into_the_shared_cache(local_ray, tmp_path):
    from tests.unit.http_server import ImageServer
    from tests.unit.test_urls import ok_rows, urls_params, write_list

    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        rows = ok_rows(srv, 7) + [{"url": srv.url("/status/404/x.png"), "caption": "gone"}, {"url": "ftp://x/y.png", "caption": "bad"}]
        cfg = urls_params(write_list(tmp_path / "list.csv", rows))
        there = download(on_ray(cfg, unit=3), tmp_path / "there", tmp_path / "cache_ray")
        here = download(cfg, tmp_path / "here", tmp_path / "cache_here")
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)
    assert here == there and here["kept"] == 7 and here["skipped_by_reason"] == {"http_404": 1, "invalid_url": 1}
    assert tree(tmp_path / "here") == tree(tmp_path / "there")
    assert tree(tmp_path / "cache_here") == tree(tmp_path / "cache_ray")


def shard_cfg(**over):
    return config.parse({"shard": {"resolution": 16, "val_fraction": 0.3, "samples_per_shard": 4, **over}}).shard


def test_shard_on_ray_writes_the_same_shards(local_ray, data, tmp_path):
    # units of 3 records straddle the 4-sample shards of both splits
    here = shard(data["raw"], tmp_path / "here", shard_cfg())
    there = shard(data["raw"], tmp_path / "there", on_ray(shard_cfg(), unit=3))
    assert here == there and len(list((tmp_path / "here").glob("train-*.tar"))) > 3
    assert tree(tmp_path / "here") == tree(tmp_path / "there")  # no unit tar is left behind either


def test_shard_skips_move_the_shard_boundaries_the_same_way(local_ray, tmp_path):
    files = {f"k{i:02d}": png_bytes((10 * i, 0, 0), size=(20, 20)) for i in range(17)}
    files["k03"] = b"not an image"
    files["k08"] = b""
    files["k09"] = png_bytes(mode="CMYK", fmt="JPEG")
    raw = make_download(tmp_path / "raw", files)
    here = shard(raw, tmp_path / "here", shard_cfg(samples_per_shard=3, odd_modes="convert"))
    there = shard(raw, tmp_path / "there", on_ray(shard_cfg(samples_per_shard=3, odd_modes="convert"), unit=4))
    assert here == there and here["skipped"] == 2 and here["converted_by_mode"]
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def test_embed_on_ray_writes_the_same_cache(local_ray, data, tmp_path):
    cfg = config.parse(yaml.safe_load(Path(data["root"] / "params.yaml").read_text())).embed
    cfg = cfg.model_copy(update={"batch_size": 4})
    here = embed(data["shards"], tmp_path / "here", cfg)
    there = embed(data["shards"], tmp_path / "there", on_ray(cfg, unit=6))  # units of 2 batches
    assert here == there
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def big_pictures(root: Path, n: int) -> Path:
    """Download output of large gradient PNGs: each takes a worker a noticeable time to decode."""
    files = {}
    for i in range(n):
        image = Image.linear_gradient("L").resize((2400, 2400)).convert("RGB")
        image.putpixel((i, i), (255, 0, 0))
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        files[f"big{i:02d}"] = buf.getvalue()
    return make_download(root, files)


def ray_task_pids(name: str) -> list[int]:
    """Processes of Ray workers running a task of the function ``name`` (Ray titles them ray::name)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{name}".encode()):
                pids.append(int(proc.name))
    return pids


def test_a_worker_killed_mid_unit_loses_nothing(local_ray, tmp_path):
    raw = big_pictures(tmp_path / "raw", 8)
    cfg = shard_cfg(samples_per_shard=3, val_fraction=0.0)
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in ray_task_pids("_prepare_unit"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        there = shard(raw, tmp_path / "there", on_ray(cfg, unit=2, retries=2))
    finally:
        stop.set()
        thread.join(5)
    assert killed, "no worker was caught running a unit"
    here = shard(raw, tmp_path / "here", cfg)
    assert here == there and here["kept"] == 8
    assert tree(tmp_path / "here") == tree(tmp_path / "there")


def failing(unit, shared):
    if unit[0] == 3:
        time.sleep(1.0)  # the later unit fails first
    if unit[0] >= 3:
        raise DataError(f"unit of {unit[0]}: broken")
    return unit


def test_a_units_error_is_the_stages_one_line_error_the_first_in_order(local_ray):
    # the error a local run stops at: unit 3's, though unit 4 fails first on Ray
    for distributor in ("ray", "local"):
        with pytest.raises(DataError, match=r"^unit of 3: broken$"):
            list(map_units(failing, [[1], [3], [4]], distributor, RaySettings(workers=2)))


def test_the_stage_cli_on_ray_and_ray_missing(local_ray, data, tmp_path, monkeypatch):
    from stages.app import app

    params = yaml.safe_load(Path(data["root"] / "params.yaml").read_text())
    params["shard"] |= {"distributor": "ray", "ray": {"unit": 5}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    args = ["shard", "--params", str(path), "--data", str(data["raw"]), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert tree(tmp_path / "out") == tree(data["shards"])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads((data["root"] / "shard.json").read_text())
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "out2"), "--report", str(tmp_path / "r2.json")])
    assert result.exit_code != 0 and not (tmp_path / "out2").exists()
    assert result.output.strip().splitlines()[-1].endswith("distributor: ray needs the package ray; install it with pip install -e '.[ray]'")


def test_an_unreachable_cluster_is_one_line(monkeypatch):
    from imager.distributed import connect

    class Offline:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise ConnectionError("Could not find any running Ray instance.\nmore")

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS=10.1.2.3:6379: cannot join the Ray cluster \(Could not find any running Ray instance.\)$"):
        connect(Offline)
