"""Your own data: a directory of images with same-name ``.txt`` captions, or a captions table.

    photos/cat.jpg   photos/cat.txt ("a grey cat on a sofa")
    photos/sub/dog.png   photos/sub/dog.txt

or ``captions: captions.jsonl`` with rows ``{"file": "sub/dog.png", "caption": "a dog"}`` (csv and
parquet work too; the column names are params). Files are kept byte for byte; decoding and checks
happen in the shard step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from imager.config import FolderSource
from imager.data.records import IMAGE_EXTS, Sample, Skip, clean_caption, safe_key, short_hash
from imager.data.tables import read_table
from imager.errors import SourceError


def _key(rel: Path, used: set[str]) -> str:
    key = safe_key(rel.with_suffix("").as_posix().replace("/", "__"))
    if key in used:  # e.g. cat.png and cat.jpg: keep both, deterministically
        key = f"{key}-{short_hash(rel.as_posix(), 8)}"
    used.add(key)
    return key


def _entries(cfg: FolderSource, root: Path) -> list[tuple[Path, str | None, str]]:
    """(relative path, caption or None, licence) in a deterministic order."""
    if cfg.captions is not None:
        table = Path(cfg.captions)
        if not table.is_absolute() and not table.exists():
            table = root / table
        rows = read_table(table, [cfg.file_column, cfg.caption_column])
        out = [(Path(str(r[cfg.file_column])), clean_caption(r[cfg.caption_column]), cfg.licence) for r in rows]
        return sorted(out, key=lambda e: e[0].as_posix())
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.suffix.lower() == ".txt" or any(part.startswith(".") for part in rel.parts):
            continue
        cap_file = path.with_suffix(".txt")
        text = clean_caption(cap_file.read_text(encoding="utf-8", errors="replace")) if cap_file.is_file() else None
        entries.append((rel, text, cfg.licence))
    return entries


def iter_folder(cfg: FolderSource, limit: int | None) -> tuple[Iterator[Sample | Skip], int]:
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise SourceError(f"download.folder.path: {root} is not a directory")
    entries = _entries(cfg, root)[:limit]

    def items() -> Iterator[Sample | Skip]:
        used: set[str] = set()
        for rel, text, licence in entries:
            path = root / rel
            if path.suffix.lower() not in IMAGE_EXTS:
                yield Skip("unsupported_file", str(path))
            elif not path.is_file():
                yield Skip("missing_file", str(path))
            elif text is None:
                yield Skip("no_caption", str(path))
            elif not text:
                yield Skip("empty_caption", str(path))
            else:
                ext = path.suffix.lower().lstrip(".")
                yield Sample(_key(rel, used), text, path.read_bytes(), licence, str(path), ext)

    return items(), len(entries)
