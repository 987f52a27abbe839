"""Read a small table (csv, jsonl or parquet) into a list of rows: caption files and URL lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imager.errors import SourceError

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def read_table(path: str | Path, required: list[str]) -> list[dict[str, Any]]:
    """Rows of a csv/jsonl/parquet file as dicts; every column in ``required`` must exist."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: table file not found")
    suffix = path.suffix.lower()
    readers = {
        ".csv": lambda p: pa.csv.read_csv(p, convert_options=pa.csv.ConvertOptions(strings_can_be_null=False)),
        ".jsonl": pa.json.read_json,
        ".json": pa.json.read_json,
        ".parquet": pa.parquet.read_table,
    }
    if suffix not in readers:
        raise SourceError(f"{path}: unsupported table format '{suffix}', use one of {', '.join(TABLE_SUFFIXES)}")
    try:
        table = readers[suffix](str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path}: cannot parse {suffix[1:]} table ({first})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise SourceError(
            f"{path}: no column '{missing[0]}' (columns: {', '.join(table.column_names) or 'none'})"
        )
    return table.to_pylist()
