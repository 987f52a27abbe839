"""`imager shard`: the download output -> webdataset tar shards (train/val)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from imager.data.shard import INDEX
from imager.data.shard import shard as shard_images
from stages._common import DatasetOption, ParamsOption, data_sections, finish, load_params, stage_name, tracked, user_errors


@user_errors
def shard(
    data: Annotated[Path, typer.Option(help="Download output directory (with manifest.jsonl).")],
    out: Annotated[Path, typer.Option(help="Output directory of .tar shards and index.json (replaced atomically).")],
    report: Annotated[Path, typer.Option(help="Report JSON: kept per split, skipped by reason.")],
    params: ParamsOption = Path("params.yaml"),
    dataset: DatasetOption = None,
) -> None:
    """Decode, check, resize + centre-crop to `shard.resolution` and write webdataset shards.

    Unusable inputs (zero-byte, truncated, not an image, absurd dimensions, odd modes, animated)
    are skipped and counted by reason in the report; the split is a hash of each key.
    """
    p = load_params(params)
    section = data_sections(p, dataset)[1]
    with tracked(stage_name("shard", dataset), p, {"shard": section.model_dump()}) as run:
        started = time.perf_counter()
        result = shard_images(data, out, section)
        finish(run, result, report, started)
        run.log_artifact(out / INDEX)
