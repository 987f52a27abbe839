"""Images from a list of URLs (csv/jsonl/parquet of url + caption), as img2dataset users have.

Downloads run concurrently with urllib3's retry support (exponential backoff on connection errors
and on 429/5xx answers, honouring Retry-After) and a timeout per request. Each fetched file lands in
a fetch cache atomically, beside a small JSON record of its sha256; a rerun after an interruption
verifies what is there and fetches only what is missing or corrupt. Expected checksums, when the
list has them, are verified and a mismatch is skipped as ``checksum_mismatch``. An answer that is
not an image (an HTML error page, JSON) is skipped as ``not_an_image`` and never cached: its
Content-Type must be ``image/*`` or say nothing of the kind (absent, ``application/octet-stream``),
and its first bytes must be a header Pillow can open.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from imager import __version__
from imager.data.config import UrlsSource
from imager.data.records import Plan, Sample, Skip, clean_caption, looks_like_image, short_hash
from imager.data.tables import read_table
from imager.errors import SourceError
from imager.io import atomic_write_bytes, atomic_write_json, sha256_bytes

log = logging.getLogger(__name__)

# Content types of an answer that may be an image: image/*, or one that does not say
# (binary/octet-stream is what S3 serves for files uploaded without a type).
UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})


@dataclass(frozen=True)
class UrlRow:
    key: str
    url: str
    caption: str
    sha256: str | None
    licence: str


def read_url_list(cfg: UrlsSource, limit: int | None) -> tuple[list[UrlRow], list[Skip]]:
    """The rows to fetch (first ``limit`` of the list) and the rows skipped while reading it."""
    columns = [cfg.url_column, cfg.caption_column]
    rows = read_table(cfg.list or "", columns, "download.urls.list")[:limit]
    kept: list[UrlRow] = []
    skipped: list[Skip] = []
    seen: set[str] = set()
    for row in rows:
        url = _url(row.get(cfg.url_column))
        caption = clean_caption(row.get(cfg.caption_column))
        expected = row.get(cfg.sha256_column) if cfg.sha256_column else None
        licence = row.get(cfg.licence_column) if cfg.licence_column else None
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
            skipped.append(Skip("invalid_url", url))
        elif url in seen:
            skipped.append(Skip("duplicate_url", url))
        elif caption is None:
            skipped.append(Skip("caption_not_utf8", f"{cfg.list}: {url}"))
        elif not caption:
            skipped.append(Skip("empty_caption", url))
        else:
            seen.add(url)
            checksum = str(expected).strip().lower() if expected else None
            kept.append(UrlRow(short_hash(url), url, caption, checksum, str(licence or cfg.licence)))
    return kept, skipped


def _url(value: object) -> str:
    """A url cell as text; bytes that are not UTF-8 give "" (skipped as ``invalid_url``)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    return str(value or "").strip()


def _session(cfg: UrlsSource):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=cfg.retries,
        connect=cfg.retries,
        read=cfg.retries,
        status=cfg.retries,
        backoff_factor=cfg.backoff,
        status_forcelist=(408, 425, 429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=cfg.workers, pool_maxsize=cfg.workers)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = f"imager/{__version__}"
    return session


def _cached(row: UrlRow, cache: Path) -> bool:
    """True when the fetch cache holds this URL's file, intact, matching any expected checksum, and
    an image."""
    data, meta = cache / f"{row.key}.data", cache / f"{row.key}.json"
    if not (data.is_file() and meta.is_file()):
        return False
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    body = data.read_bytes()
    actual = sha256_bytes(body)
    intact = record.get("url") == row.url and record.get("sha256") == actual
    return intact and row.sha256 in (None, actual) and looks_like_image(body)


def _get(session, row: UrlRow, cfg: UrlsSource) -> bytes | str:
    """The body of ``row.url``, or a skip reason. Bodies cut off mid-transfer are retried too."""
    import requests

    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        try:
            with session.get(row.url, timeout=cfg.timeout, stream=True) as resp:
                if resp.status_code != 200:
                    return f"http_{resp.status_code}"
                media_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if not (media_type.startswith("image/") or media_type in UNTYPED):
                    return "not_an_image"
                declared = resp.headers.get("Content-Length", "").strip()  # may be unreadable: then ignored
                if declared.isdigit() and int(declared) > cfg.max_bytes:
                    return "too_large"
                body = bytearray()
                for chunk in resp.iter_content(1 << 16):
                    body += chunk
                    if len(body) > cfg.max_bytes:
                        return "too_large"
                return bytes(body)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            continue  # the connection broke mid-body: try again
        except requests.exceptions.Timeout:
            return "timeout"
        except requests.exceptions.RetryError:
            return "too_many_retries"
        except (requests.exceptions.ConnectionError, requests.exceptions.InvalidURL) as exc:
            return "timeout" if _read_timed_out(exc) else "connection_error"
    return "incomplete_body"


def _read_timed_out(exc: Exception) -> bool:
    """True when requests raised ConnectionError for a read timeout: it does so once urllib3 has
    retried the timeout (MaxRetryError) and for a timeout in the middle of a streamed body."""
    from urllib3.exceptions import MaxRetryError, ReadTimeoutError

    cause = exc.args[0] if exc.args else None
    return isinstance(getattr(cause, "reason", None) if isinstance(cause, MaxRetryError) else cause, ReadTimeoutError)


def _fetch(session, row: UrlRow, cache: Path, cfg: UrlsSource) -> str | None:
    """Fetch one row into the cache; None on success (or already cached), else the skip reason."""
    if _cached(row, cache):
        return None
    body = _get(session, row, cfg)
    if isinstance(body, str):
        return body
    if not body:
        return "empty_file"
    if not looks_like_image(body):
        return "not_an_image"
    digest = sha256_bytes(body)
    if row.sha256 is not None and digest != row.sha256:
        return "checksum_mismatch"
    atomic_write_bytes(cache / f"{row.key}.data", body)
    atomic_write_json(cache / f"{row.key}.json", {"url": row.url, "sha256": digest, "bytes": len(body)})
    return None


def fetch_all(rows: list[UrlRow], cache: Path, cfg: UrlsSource) -> dict[str, str | None]:
    """Fetch every row concurrently into ``cache``; key -> None (fetched) or a skip reason."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if not _cached(r, cache)]
    results: dict[str, str | None] = {r.key: None for r in rows}
    if len(todo) < len(rows):
        log.info("fetch cache holds %d of %d files; fetching %d", len(rows) - len(todo), len(rows), len(todo))
    session = _session(cfg)
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        futures = {pool.submit(_fetch, session, row, cache, cfg): row for row in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="fetch", unit="file"):
            results[futures[fut].key] = fut.result()
    return results


def urls_plan(cfg: UrlsSource, limit: int | None, cache: Path | None) -> Plan:
    if cache is None:
        raise SourceError("the urls source needs a fetch cache directory (--fetch-cache)")
    rows, skipped = read_url_list(cfg, limit)
    cache.mkdir(parents=True, exist_ok=True)
    return Plan(rows, fetch_rows, (cfg, cache), finish=_from_cache, before=tuple(skipped))


def fetch_rows(rows: Sequence[UrlRow], shared: tuple[UrlsSource, Path]) -> Iterator[tuple[str | None, Path]]:
    """Fetch the rows into the cache (``cfg.workers`` at once); (skip reason or None, cache) per row."""
    cfg, cache = shared
    results = fetch_all(list(rows), cache, cfg)
    for row in rows:
        yield results[row.key], cache


def _from_cache(rows: Sequence[UrlRow], results: Iterable[tuple[str | None, Path]]) -> Iterator[Sample | Skip]:
    for row, (reason, cache) in zip(rows, results, strict=True):
        if reason is not None:
            yield Skip(reason, row.url)
        else:
            data = (cache / f"{row.key}.data").read_bytes()
            yield Sample(row.key, row.caption, data, row.licence, row.url)
