"""A Hugging Face dataset as a source: a hub name, a local dataset folder, or a ``save_to_disk`` dir.

A hub name needs the network (and is never used by the default pipeline or the tests); a local
folder of data files or a dataset saved with ``Dataset.save_to_disk`` loads offline. Images are
taken as their original encoded bytes where the dataset keeps them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from imager.data.config import HfSource
from imager.data.records import Plan, Sample, Skip, clean_caption, safe_key
from imager.errors import SourceError


def _open(cfg: HfSource):
    try:
        import datasets
    except ImportError:
        raise SourceError("the hf source needs the package datasets: pip install datasets") from None
    name = cfg.name or ""
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise SourceError(f"download.hf.split: '{cfg.split}' not in {name} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
            return ds
        return datasets.load_dataset(name, cfg.config, split=cfg.split, revision=cfg.revision)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (FileNotFound, DatasetNotFound, ValueError...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"download.hf.name: cannot load dataset '{name}' ({first})") from None


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


def hf_plan(cfg: HfSource, limit: int | None) -> Plan:
    ds = _dataset(cfg, limit)
    return Plan(range(len(ds)), read_rows, (cfg, limit), finish=_unique_keys)


_OPENED: dict[str, object] = {}  # the dataset this process opened last (a Ray worker reads many units of it)


def _dataset(cfg: HfSource, limit: int | None):
    key = f"{cfg.model_dump_json()} {limit}"
    if key in _OPENED:
        return _OPENED[key]
    ds = _open(cfg)
    import datasets

    for column in (cfg.image_column, cfg.caption_column, cfg.key_column):
        if column is not None and column not in ds.column_names:
            raise SourceError(f"{cfg.name}: no column '{column}' (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    _OPENED.clear()
    _OPENED[key] = ds
    return ds


def read_rows(indices: Sequence[int], shared: tuple[HfSource, int | None]) -> Iterator[tuple[str, Sample | Skip]]:
    """(key, sample or skip) per row index; keys are made unique later, in order, by :func:`_unique_keys`."""
    cfg, limit = shared
    ds = _dataset(cfg, limit)
    rows = ds if len(indices) == len(ds) else ds.select(indices)
    for i, row in zip(indices, rows, strict=True):
        key = safe_key(str(row[cfg.key_column])) if cfg.key_column else f"{i:08d}"
        origin = f"{cfg.name}[{cfg.split}][{i}]"
        data = _image_bytes(row[cfg.image_column])
        caption = clean_caption(row[cfg.caption_column])
        if data is None:
            yield key, Skip("no_image", origin)
        elif caption is None:
            yield key, Skip("caption_not_utf8", origin)
        elif not caption:
            yield key, Skip("empty_caption", origin)
        else:
            yield key, Sample(key, caption, data, cfg.licence, origin)


def _unique_keys(entries: Sequence[int], results: Iterable[tuple[str, Sample | Skip]]) -> Iterator[Sample | Skip]:
    """The rows in order; a row whose key an earlier kept row has is a ``duplicate_key``."""
    used: set[str] = set()
    for key, item in results:
        if key in used:
            yield Skip("duplicate_key", item.origin)
        else:
            if isinstance(item, Sample):
                used.add(key)
            yield item
