"""Your own data: a directory of images with same-name ``.txt`` captions, or a captions table.

    photos/cat.jpg   photos/cat.txt ("a grey cat on a sofa")
    photos/sub/dog.png   photos/sub/dog.txt

or ``captions: captions.jsonl`` with rows ``{"file": "sub/dog.png", "caption": "a dog"}`` (csv and
parquet work too; the column names are params). Files are kept byte for byte; decoding and checks
happen in the shard step. Captions must be UTF-8 (a leading BOM is dropped): an image whose caption
is not is skipped as ``caption_not_utf8``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from imager.data.config import FolderSource
from imager.data.records import IMAGE_EXTS, Plan, Sample, Skip, clean_caption, safe_key, short_hash
from imager.data.tables import read_table
from imager.errors import SourceError


def _key(rel: Path, used: set[str]) -> str:
    key = safe_key(rel.with_suffix("").as_posix().replace("/", "__"))
    if key in used:  # e.g. cat.png and cat.jpg: keep both, deterministically
        key = f"{key}-{short_hash(rel.as_posix(), 8)}"
    used.add(key)
    return key


class _Entry(NamedTuple):
    rel: Path  # the image, relative to the folder
    caption: str | bytes | Path | None  # a table's value, the same-name .txt file, or None: neither
    where: str  # where the caption comes from (the .txt file, or the table and the image)


def _entries(cfg: FolderSource, root: Path) -> list[_Entry]:
    """Every image of the folder (or of the captions table) in a deterministic order."""
    if cfg.captions is not None:
        table = Path(cfg.captions)
        if not table.is_absolute() and not table.exists():
            table = root / table
        rows = read_table(table, [cfg.file_column, cfg.caption_column], "download.folder.captions")
        files = [Path(str(r[cfg.file_column])) for r in rows]
        captions = ["" if r[cfg.caption_column] is None else r[cfg.caption_column] for r in rows]
        out = [_Entry(rel, caption, f"{table}: {rel}") for rel, caption in zip(files, captions, strict=True)]
        return sorted(out, key=lambda e: e.rel.as_posix())
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.suffix.lower() == ".txt" or any(part.startswith(".") for part in rel.parts):
            continue
        cap_file = path.with_suffix(".txt")
        entries.append(_Entry(rel, cap_file if cap_file.is_file() else None, str(cap_file)))
    return entries


def folder_plan(cfg: FolderSource, limit: int | None) -> Plan:
    root = Path(cfg.path or "")
    if not root.is_dir():
        problem = "not a directory" if root.exists() else "directory not found"
        raise SourceError(f"params.yaml: download.folder.path: {root}: {problem}")
    return Plan(_entries(cfg, root)[:limit], read_entries, (cfg, root), finish=_keyed)


def read_entries(entries: Sequence[_Entry], shared: tuple[FolderSource, Path]) -> Iterator[Sample | Skip]:
    """A sample (keyed later, in order, by :func:`_keyed`) or a skip per entry."""
    cfg, root = shared
    for rel, caption, where in entries:
        path = root / rel
        if path.suffix.lower() not in IMAGE_EXTS:
            yield Skip("unsupported_file", str(path))
        elif not path.is_file():
            yield Skip("missing_file", str(path))
        elif caption is None:
            yield Skip("no_caption", str(path))
        elif (text := clean_caption(caption.read_bytes() if isinstance(caption, Path) else caption)) is None:
            yield Skip("caption_not_utf8", where)
        elif not text:
            yield Skip("empty_caption", str(path))
        else:
            ext = path.suffix.lower().lstrip(".")
            yield Sample("", text, path.read_bytes(), cfg.licence, str(path), ext)


def _keyed(entries: Sequence[_Entry], results: Iterable[Sample | Skip]) -> Iterator[Sample | Skip]:
    used: set[str] = set()
    for entry, item in zip(entries, results, strict=True):
        yield replace(item, key=_key(entry.rel, used)) if isinstance(item, Sample) else item
