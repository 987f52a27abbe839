"""`imager embed`: encode every caption of the shards once into the text-embedding cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from stages._common import DatasetOption, ParamsOption, data_sections, finish, load_params, stage_name, tracked, user_errors


@user_errors
def embed(
    shards: Annotated[Path, typer.Option(help="Shard directory (with index.json).")],
    out: Annotated[Path, typer.Option(help="Cache directory: embeddings.safetensors, keys.txt, meta.json.")],
    report: Annotated[Path, typer.Option(help="Report JSON: counts, dims, truncated captions.")],
    params: ParamsOption = Path("params.yaml"),
    dataset: DatasetOption = None,
) -> None:
    """Encode captions with `embed.encoder` (minilm, clip, t5, or a local transformers folder) into per-token + pooled fp16
    embeddings, plus the empty caption's embedding (the classifier-free guidance null condition)."""
    from imager.text.cache import META  # torch and transformers load only when this stage runs
    from imager.text.embed import embed as embed_captions

    p = load_params(params)
    section = data_sections(p, dataset)[2]
    with tracked(stage_name("embed", dataset), p, {"embed": section.model_dump()}) as run:
        started = time.perf_counter()
        result = embed_captions(shards, out, section)
        finish(run, result, report, started)
        run.log_artifact(out / META)
