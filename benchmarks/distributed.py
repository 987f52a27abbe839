"""Comparison: the data stages on Ray (1 and 2 workers) against one process, on this machine.

Each data stage of params.yaml (download, shard, embed) runs three times on the same input: in
this process (``distributor: local``), then on a local Ray with one task at a time and with two
(``ray.workers``), every run writing its own output folder. The Ray cluster is started once, before
timing (its start-up is in the details), and its two worker processes are started by a warm-up
task that also loads the text encoder in each, as a long-lived cluster's are. The outputs of the three runs must be the same bytes; the
benchmark stops otherwise.

Two rows per stage: 2 workers vs 1 (the speed-up; scaling efficiency = speed-up / 2) and 1 worker
vs one process (what Ray's tasks cost over a plain loop). The details hold the per-core throughputs
the cluster estimate of docs/cluster.md starts from, and two inputs closer to a web-scale list than
emoji: photo-sized JPEGs through the shard step and twelve-word captions through the encoder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import BenchError
from benchmarks.report import Comparison
from imager.distributed import RaySettings

log = logging.getLogger(__name__)
STAGES = ("download", "shard", "embed")
COUNTED = {"download": "seen", "shard": "seen", "embed": "unique_captions"}  # the entries each stage works through
WORDS = ("red", "small", "dog", "sitting", "on", "a", "wooden", "bench", "in", "the", "park", "at", "sunset", "with", "green", "trees")


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _warm_up(n: int, embed_cfg) -> None:
    """Start ``n`` Ray worker processes, import the data stages' libraries in them and load the text
    encoder there (what a worker does once in its life, not per unit)."""
    import ray

    @ray.remote(num_cpus=1)
    def load(cfg) -> int:
        import imager.data.shard  # noqa: F401
        from imager.text.embed import _encode_unit

        _encode_unit([("warm up",)], cfg)
        time.sleep(1.0)  # hold the worker, so that the next task starts another
        return 0

    ray.get([load.remote(embed_cfg) for _ in range(n)])


def _photos(root: Path, count: int, seed: int) -> Path:
    """A download output of ``count`` photo-sized JPEGs (512×384, smooth colour plus noise)."""
    from imager.io import write_jsonl

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    ys, xs = np.mgrid[0:384, 0:512]
    for i in range(count):
        base = np.stack([(xs * (i % 7 + 1)) % 256, (ys * (i % 5 + 1)) % 256, (xs + ys + 31 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        name = f"images/photo{i:05d}.jpg"
        (root / name).write_bytes(buf.getvalue())
        records.append({"key": f"photo{i:05d}", "caption": f"photo {i}", "file": name})
    write_jsonl(root / "manifest.jsonl", records)
    return root


def bench_distributed(params, tmp: Path, *, quick: bool, seed: int = 0) -> tuple[list[Comparison], dict[str, Any]]:
    """The two rows per data stage and the shared details (cluster start-up, the web-scale inputs)."""
    try:
        import ray
    except ImportError:
        raise BenchError("the distributed comparison needs the package ray: pip install -e '.[ray]'") from None
    from imager.data.download import download
    from imager.data.shard import shard
    from imager.text.embed import embed

    dl = params.download
    if quick:
        dl = dl.model_copy(update={"limit": 40, "resolution": 16})
    sh, em = params.shard, params.embed
    if quick:
        sh = sh.model_copy(update={"resolution": 16, "samples_per_shard": 16})
        em = em.model_copy(update={"batch_size": 8})
    unit = {"download": 50 if quick else 250, "shard": 10 if quick else 250, "embed": 16 if quick else 256}
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        start_s = time.perf_counter() - started
        _warm_up(2, em)
        runs: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        outs: dict[str, Path] = {}

        def stage(name: str, section, fn) -> None:
            times, trees = {}, []
            for label, workers in (("local", None), ("ray1", 1), ("ray2", 2)):
                cfg = section if workers is None else section.model_copy(
                    update={"distributor": "ray", "ray": RaySettings(workers=workers, unit=unit[name])}
                )
                out = tmp / f"{name}-{label}"
                t0 = time.perf_counter()
                report = fn(cfg, out)
                times[label] = time.perf_counter() - t0
                trees.append(_tree(out))
                counts[name] = report[COUNTED[name]]
                outs.setdefault(name, out)
            if not trees[0] == trees[1] == trees[2]:
                raise BenchError(f"{name}: the outputs on Ray differ from the local run's")
            runs[name] = times

        stage("download", dl, lambda cfg, out: download(cfg, out))
        stage("shard", sh, lambda cfg, out: shard(outs["download"], out, cfg))
        stage("embed", em, lambda cfg, out: embed(outs["shard"], out, cfg))

        # inputs closer to a web-scale list: photo-sized JPEGs (shard) and longer captions (embed), one worker
        photos = _photos(tmp / "photos", 16 if quick else 200, seed)
        t0 = time.perf_counter()
        shard(photos, tmp / "photos-shards", sh.model_copy(update={"distributor": "ray", "ray": RaySettings(workers=1, unit=unit["shard"])}))
        photo_rate = len(list((photos / "images").iterdir())) / (time.perf_counter() - t0)
        rng = np.random.default_rng(seed)
        captions = [" ".join(rng.choice(WORDS, 12)) + f" {i}" for i in range(64 if quick else 1024)]
        from imager.text.embed import encode_on_ray

        t0 = time.perf_counter()
        encode_on_ray(sorted(set(captions)), em.model_copy(update={"ray": RaySettings(workers=1, unit=unit["embed"])}))
        caption_rate = len(captions) / (time.perf_counter() - t0)
    finally:
        ray.shutdown()

    rows, per_core = [], {}
    for name in STAGES:
        t, n = runs[name], counts[name]
        rate = {k: n / v for k, v in t.items()}
        per_core[name] = rate["ray1"]
        details = {"entries": n, "seconds": t, "unit": unit[name], "scaling_efficiency": rate["ray2"] / (2 * rate["ray1"]), "identical_outputs": True}
        rows.append(Comparison(f"ray_scaling_{name}", f"{name} on Ray: 2 workers vs 1", "entries/s", "2 workers", rate["ray2"], "1 worker", rate["ray1"], details=details))
        rows.append(Comparison(f"ray_overhead_{name}", f"{name}: Ray, 1 worker vs one process", "entries/s", "Ray, 1 worker", rate["ray1"], "local", rate["local"], details=details))
    shared = {
        "ray_start_seconds": start_s,
        "per_core_entries_per_s": per_core,
        "photo_jpegs_512x384_shard_per_core": photo_rate,
        "twelve_word_captions_embed_per_core": caption_rate,
    }
    return rows, shared
