"""A captioned image dataset made by the cascade from a list of prompts, resumable.

The output folder is what Imager's data stages read back::

    DIR/images/{key}.png   the image, with its parameters in the PNG's text chunks
    DIR/images/{key}.txt   its caption (the prompt)
    DIR/manifest.jsonl     one record per image (the download step's fields: key, caption, file,
                           source, licence, sha256, width, height; and prompt_index, image_index, seed)
    DIR/generate.json      the settings every image was made with (sampling, models, prompts file)

so ``download.source: folder`` with ``folder.path: DIR/images`` takes the images and captions, and
``imager shard --data DIR`` shards them directly (``DIR/shards`` with ``--format webdataset``).

The prompts are made in chunks of ``chunk`` prompts, each drawing its noise from ``seed + the
index of its first image``: a chunk's images do not depend on which chunks were made before, so a
run stopped anywhere (kill -9 included) and started again makes only the missing chunks, and the
images are the ones an uninterrupted run makes. The manifest is rewritten atomically after every
chunk; a chunk half written when the run stopped is made again. Settings that differ from those
in ``generate.json`` are refused: a folder holds one dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imager.errors import ConfigError, DataError
from imager.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl, sha256_bytes, write_jsonl

log = logging.getLogger(__name__)

SETTINGS, MANIFEST, IMAGES = "generate.json", "manifest.jsonl", "images"


def read_prompts(path: Path) -> list[str]:
    """The prompts of ``path``: a text file with one per line (blank lines and lines starting with
    ``#`` left out), or a csv/jsonl/parquet table with a ``prompt`` column. One line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts: {path}: file not found")
    if path.suffix.lower() in (".csv", ".jsonl", ".parquet"):
        from imager.data.records import clean_caption
        from imager.data.tables import read_table

        rows = read_table(path, ["prompt"], "--prompts")
        prompts = []
        for i, row in enumerate(rows):
            text = clean_caption(row["prompt"])
            if text is None:
                raise ConfigError(f"--prompts: {path}: row {i + 1}: the prompt is not UTF-8")
            prompts.append(text)
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"--prompts: {path}: not a UTF-8 text file (one prompt per line)") from None
        prompts = [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:
        raise ConfigError(f"--prompts: {path}: row {empty[0]} has an empty prompt")
    if not prompts:
        raise ConfigError(f"--prompts: {path}: no prompts (one per line; # starts a comment)")
    return prompts


def key_of(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:06d}_{image_index:03d}"


@dataclass(frozen=True)
class Chunk:
    """Prompts ``first`` .. ``first + len(prompts) - 1``, ``per_prompt`` images each."""

    first: int
    prompts: tuple[str, ...]
    per_prompt: int

    @property
    def keys(self) -> list[str]:
        return [key_of(self.first + i, j) for i in range(len(self.prompts)) for j in range(self.per_prompt)]

    @property
    def first_image(self) -> int:
        return self.first * self.per_prompt


def plan(prompts: Sequence[str], per_prompt: int, chunk: int) -> list[Chunk]:
    return [Chunk(i, tuple(prompts[i : i + chunk]), per_prompt) for i in range(0, len(prompts), chunk)]


def open_folder(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Prepare ``out`` for ``settings`` and return the manifest records whose image is there, intact,
    by key. A folder made with other settings is refused, naming the first that differs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / SETTINGS).is_file():
        raise ConfigError(f"--out: {out} is not empty and holds no {SETTINGS}; give a new or empty folder")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    if (out / SETTINGS).is_file():
        before = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
        for key in sorted(set(before) | set(settings)):
            if before.get(key) != settings.get(key):
                raise ConfigError(
                    f"--out: {out} holds images made with other settings ({key}: {json.dumps(before.get(key))} there, "
                    f"{json.dumps(settings.get(key))} now); give another folder, or the same settings to go on"
                )
    else:
        atomic_write_json(out / SETTINGS, settings)
    done: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST).is_file():
        try:
            records = read_jsonl(out / MANIFEST)
        except ValueError as exc:
            raise DataError(f"{out / MANIFEST}: corrupt manifest ({exc}); remove the folder to start again") from None
        for rec in records:
            path = out / rec["file"]
            if path.is_file() and sha256_bytes(path.read_bytes()) == rec.get("sha256"):
                done[rec["key"]] = rec
    return done


def write_chunk(out: Path, chunk: Chunk, pngs: Sequence[tuple[bytes, dict[str, Any]]], licence: str) -> list[dict[str, Any]]:
    """Write one chunk's PNG bytes (with their record fields) and captions; their manifest records."""
    from PIL import Image

    records = []
    for key, (data, extra) in zip(chunk.keys, pngs, strict=True):
        caption = chunk.prompts[extra["prompt_index"] - chunk.first]
        name = f"{IMAGES}/{key}.png"
        atomic_write_bytes(out / name, data)
        atomic_write_text(out / IMAGES / f"{key}.txt", caption + "\n")
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        records.append({"key": key, "caption": caption, "file": name, "source": "generated", "licence": licence,
                        "sha256": sha256_bytes(data), "width": width, "height": height, **extra})  # fmt: skip
    return records


def save_manifest(out: Path, records: dict[str, dict[str, Any]]) -> None:
    write_jsonl(out / MANIFEST, [records[k] for k in sorted(records)])


def make_dataset(
    out: Path,
    prompts: Sequence[str],
    settings: dict[str, Any],
    *,
    per_prompt: int,
    chunk: int,
    licence: str,
    make: Callable[[Chunk], list[tuple[bytes, dict[str, Any]]]],
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Make the images of every chunk not already in ``out`` with ``make(chunk)`` (PNG bytes and
    record fields per image, in key order) and keep the manifest current; the counts."""
    chunks = plan(prompts, per_prompt, chunk)
    kept = open_folder(Path(out), settings)
    complete = [c for c in chunks if all(k in kept for k in c.keys)]
    if on_image and complete:
        on_image(sum(len(c.keys) for c in complete))
    made = 0
    for c in chunks:
        if c in complete:
            continue
        for record in write_chunk(Path(out), c, make(c), licence):
            kept[record["key"]] = record
        save_manifest(Path(out), kept)
        made += len(c.keys)
        if on_image:
            on_image(len(c.keys))
    save_manifest(Path(out), kept)
    total = sum(len(c.keys) for c in chunks)
    return {"prompts": len(prompts), "images": total, "made": made, "already_there": total - made}


def prompts_sha256(prompts: Sequence[str]) -> str:
    """What the settings record of the prompt list: a folder holds the images of one list."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
