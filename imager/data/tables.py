"""Read a small table (csv, jsonl or parquet) into a list of rows: caption files and URL lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imager.errors import SourceError

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def read_table(path: str | Path, required: list[str], key: str) -> list[dict[str, Any]]:
    """Rows of a csv/jsonl/parquet file as dicts; every column in ``required`` must exist.

    ``key`` is the params key that names the file (``download.urls.list``): a missing file is an
    error in that value. Problems inside the file name the file alone. The values of a text column
    that is not all UTF-8 come back as bytes (``records.clean_caption`` decodes them, or says which
    are not UTF-8).
    """
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    path = Path(path)
    if not path.is_file():
        problem = "not a file" if path.exists() else "file not found"
        raise SourceError(f"params.yaml: {key}: {path}: {problem}")
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
    for i, field in enumerate(table.schema):  # text that is not all UTF-8: bytes, as the csv reader gives
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            try:
                table.column(i).validate(full=True)
            except pa.ArrowInvalid:
                table = table.set_column(i, field.name, table.column(i).cast(pa.binary()))
    return table.to_pylist()
