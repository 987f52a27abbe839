"""The shard step: the download output -> webdataset tar shards for training.

Each sample is ``{key}.png`` (lossless RGB, ``resolution``² after resize + centre crop),
``{key}.txt`` (the caption) and ``{key}.json`` (provenance: source, licence, original sha256 and
size). The train/val split is a pure function of the key (a hash), so adding samples never moves
old ones between splits. Samples are written in key order with fixed tar metadata, so identical
inputs give byte-identical shards. ``index.json`` lists the shards and counts per split.

With ``distributor: ray`` the records are cut into units; Ray tasks decode, resize and encode each
unit into a temporary tar per split, and then write the final shards from them, each final shard
holding exactly the samples the local run puts in it: the same bytes.
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


def _sample(rec: dict[str, Any], download_dir: Path, cfg: Shard) -> tuple[str, dict[str, Any], str | None]:
    """(split, the webdataset sample, the odd mode converted or None) of one manifest record; raises
    Rejected for an unusable input."""
    path = download_dir / rec["file"]
    if not path.is_file():
        raise Rejected("missing_file")
    image, odd = decode(path.read_bytes(), cfg)
    meta = {k: rec.get(k) for k in ("source", "licence", "sha256", "width", "height", "origin")}
    sample = {
        "__key__": rec["key"],
        "png": encode_png(square(image, cfg.resolution, cfg.resample)),
        "txt": rec["caption"],
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    return split_of(rec["key"], cfg.val_fraction), sample, odd


def shard(download_dir: Path, out: Path, cfg: Shard) -> dict[str, Any]:
    """Write shards for every usable sample of ``download_dir`` into ``out``; return the report."""
    download_dir = Path(download_dir)
    records = read_manifest(download_dir)
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    counts = {s: 0 for s in SPLITS}
    with atomic_dir(Path(out)) as tmp:
        if cfg.distributor == "ray":
            _shard_units(records, download_dir.resolve(), tmp.resolve(), cfg, counts, skipped, converted)
        else:
            _shard_here(records, download_dir, tmp, cfg, counts, skipped, converted)
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


def _shard_here(records, download_dir: Path, tmp: Path, cfg: Shard, counts, skipped, converted) -> None:
    import webdataset as wds

    writers: dict[str, Any] = {}
    try:
        for rec in tqdm(records, desc="shard", unit="img"):
            try:
                split, sample, odd = _sample(rec, download_dir, cfg)
            except Rejected as rej:
                skipped[rej.reason] += 1
                continue
            if odd:
                converted[odd] += 1
            if split not in writers:
                pattern = str(tmp / f"{split}-%06d.tar")
                writers[split] = wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0, mtime=0)
            writers[split].write(sample)
            counts[split] += 1
    finally:
        for writer in writers.values():
            writer.close()


# --- on Ray: units of records -> a tar per unit and split -> the final shards ------------------
UNITS = ".units"  # the temporary unit tars, inside the output's temporary directory


def _shard_units(records, download_dir: Path, tmp: Path, cfg: Shard, counts, skipped, converted) -> None:
    import shutil

    from imager.distributed import map_units, session, units_of

    units = list(enumerate(units_of(records, cfg.ray.unit)))
    (tmp / UNITS).mkdir()
    per_unit: list[dict[str, int]] = []
    with session("ray"):  # one Ray for both rounds of tasks
        for outcome in map_units(_prepare_unit, units, "ray", cfg.ray, shared=(download_dir, tmp, cfg), desc="shard", weight=lambda u: len(u[1]), unit_name="img"):
            per_unit.append({s: 0 for s in SPLITS})
            for split, note in outcome:
                if split is None:
                    skipped[note] += 1
                    continue
                per_unit[-1][split] += 1
                counts[split] += 1
                if note:
                    converted[note] += 1
        jobs = [job for split in SPLITS for job in _final_shards(split, per_unit, cfg.samples_per_shard, tmp)]
        for _ in map_units(_write_final, jobs, "ray", cfg.ray, desc="assemble shards", weight=lambda j: sum(b - a for _, a, b in j[1]), unit_name="img"):
            pass
    shutil.rmtree(tmp / UNITS)


def _unit_tar(tmp: Path, index: int, split: str) -> Path:
    return tmp / UNITS / f"{index:06d}-{split}.tar"


def _prepare_unit(unit: tuple[int, list[dict[str, Any]]], shared: tuple[Path, Path, Shard]) -> list[tuple[str | None, str | None]]:
    """Decode one unit of records into a tar per split (replaced whole, so a unit run again after
    its worker died leaves no trace); (split, odd mode) or (None, skip reason) per record."""
    import webdataset as wds

    index, records = unit
    download_dir, tmp, cfg = shared
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    outcome: list[tuple[str | None, str | None]] = []
    for rec in records:
        try:
            split, sample, odd = _sample(rec, download_dir, cfg)
        except Rejected as rej:
            outcome.append((None, rej.reason))
            continue
        by_split[split].append(sample)
        outcome.append((split, odd))
    for split, samples in by_split.items():
        if samples:
            path = _unit_tar(tmp, index, split)
            part = path.with_suffix(".part")
            with wds.TarWriter(str(part), mtime=0) as writer:
                for sample in samples:
                    writer.write(sample)
            part.replace(path)
    return outcome


def _final_shards(split: str, per_unit: list[dict[str, int]], size: int, tmp: Path) -> list[tuple[Path, list[tuple[Path, int, int]]]]:
    """The final shards of ``split``: (path, [(unit tar, first, end) ...]) with ``size`` samples each
    (the last fewer), cut from the units' samples in order, as the local writer cuts them."""
    pieces = [(_unit_tar(tmp, i, split), n[split]) for i, n in enumerate(per_unit) if n[split]]
    jobs: list[tuple[Path, list[tuple[Path, int, int]]]] = []
    current: list[tuple[Path, int, int]] = []
    room = size
    for path, n in pieces:
        first = 0
        while first < n:
            take = min(room, n - first)
            current.append((path, first, first + take))
            first, room = first + take, room - take
            if room == 0:
                jobs.append((tmp / f"{split}-{len(jobs):06d}.tar", current))
                current, room = [], size
    if current:
        jobs.append((tmp / f"{split}-{len(jobs):06d}.tar", current))
    return jobs


def _write_final(job: tuple[Path, list[tuple[Path, int, int]]], shared: None = None) -> int:
    """Write one final shard from its pieces of unit tars; the number of samples."""
    import tarfile

    import webdataset as wds

    path, pieces = job
    part = path.with_suffix(".part")
    count = 0
    with wds.TarWriter(str(part), mtime=0) as writer:
        for unit_tar, first, end in pieces:
            with tarfile.open(unit_tar) as tar:
                samples: dict[str, dict[str, Any]] = {}
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
            for sample in list(samples.values())[first:end]:
                writer.write(sample)
                count += 1
    part.replace(path)
    return count


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
