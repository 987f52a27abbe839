"""The download step: a source's samples -> ``images/{key}.{ext}`` + ``images/{key}.txt`` +
``manifest.jsonl`` (one record per sample, sorted by key), built atomically.

The report counts entries seen, kept and skipped by reason (each reason is a valid MLflow metric
name, ``[a-z0-9_]``). It holds counts only, no timings, so that the same inputs give byte-identical
outputs.

With ``distributor: ray`` the source's entries are cut into units that Ray tasks turn into samples
(render, read or fetch them); this process writes them in entry order, so the output is the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from imager.data.config import Download
from imager.data.records import FORMAT_EXT, MANIFEST, Plan, Sample, Skip, image_info
from imager.io import atomic_dir, sha256_bytes, write_jsonl

log = logging.getLogger(__name__)



def open_source(cfg: Download, fetch_cache: Path | None) -> Plan:
    """The chosen source's plan: its entries and how they become samples."""
    if cfg.source == "openmoji":
        from imager.data.openmoji import openmoji_plan

        return openmoji_plan(cfg.openmoji, cfg.resolution, cfg.limit)
    if cfg.source == "folder":
        from imager.data.folder import folder_plan

        return folder_plan(cfg.folder, cfg.limit)
    if cfg.source == "urls":
        from imager.data.urls import urls_plan

        return urls_plan(cfg.urls, cfg.limit, fetch_cache)
    from imager.data.hf import hf_plan

    return hf_plan(cfg.hf, cfg.limit)


def source_items(cfg: Download, fetch_cache: Path | None) -> tuple[Iterator[Sample | Skip], int]:
    """The source's samples and skips in entry order, and how many there are (for the progress bar):
    made here, or by Ray tasks on units of ``cfg.ray.unit`` entries."""
    plan = open_source(cfg, fetch_cache)
    if cfg.distributor == "ray":
        from imager.distributed import map_units, units_of

        units = units_of(plan.entries, cfg.ray.unit)
        done = map_units(_run_unit, units, "ray", cfg.ray, shared=(plan.run, plan.shared), desc=f"{cfg.source} on ray", unit_name="entry")
        return plan.items(chain.from_iterable(done)), plan.total
    return plan.items(), plan.total


def _run_unit(unit: Sequence, shared: tuple) -> list:
    run, args = shared
    return list(run(unit, args))


def download(cfg: Download, out: Path, fetch_cache: Path | None = None) -> dict[str, Any]:
    """Write the source's samples under ``out`` (replaced atomically); return the report."""
    items, total = source_items(cfg, fetch_cache)
    skipped: Counter[str] = Counter()
    records: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    with atomic_dir(Path(out)) as tmp:
        images = tmp / "images"
        images.mkdir()
        for item in tqdm(items, total=total, desc=f"download {cfg.source}", unit="img"):
            if isinstance(item, Skip):
                if item.reason == "caption_not_utf8" and not skipped[item.reason]:
                    log.warning("%s: caption is not valid UTF-8; skipped (the report counts them all)", item.origin)
                skipped[item.reason] += 1
                continue
            if item.key in seen_keys:
                skipped["duplicate_key"] += 1
                continue
            seen_keys.add(item.key)
            info = image_info(item.data)
            ext = item.ext or (FORMAT_EXT.get(info[0], "img") if info else "bin")
            name = f"{item.key}.{ext}"
            (images / name).write_bytes(item.data)
            caption = cfg.caption_format.format(caption=item.caption)
            (images / f"{item.key}.txt").write_text(caption + "\n", encoding="utf-8")
            records.append(
                {
                    "key": item.key,
                    "caption": caption,
                    "file": f"images/{name}",
                    "source": cfg.source,
                    "origin": item.origin,
                    "licence": item.licence,
                    "sha256": sha256_bytes(item.data),
                    "width": info[1] if info else None,
                    "height": info[2] if info else None,
                }
            )
        records.sort(key=lambda r: r["key"])
        write_jsonl(tmp / MANIFEST, records)
    report = {
        "source": cfg.source,
        "seen": len(records) + sum(skipped.values()),
        "kept": len(records),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
    }
    log.info("download: kept %d of %d (%s)", report["kept"], report["seen"], dict(skipped) or "none skipped")
    return report
