"""The urls source against a real HTTP server on 127.0.0.1 (tests/unit/http_server.py).

Each test compares the output with the bytes that were served, never with a stored number.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from imager import config
from imager.data.download import download
from imager.errors import SourceError
from imager.io import read_jsonl, sha256_bytes
from tests.unit.http_server import ImageServer, png, typed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server():
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.stopping.set()  # wakes slow and delayed handlers
    srv.shutdown()
    srv.server_close()
    thread.join(5)


# ------------------------------------------------------------------------------------- helpers


def write_list(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(path)
    return path


def urls_params(list_path: Path, **urls) -> config.Download:
    section = {"list": str(list_path), "workers": 4, "retries": 2, "backoff": 0.01, "timeout": 5.0, **urls}
    return config.parse({"download": {"source": "urls", "urls": section}}).download


def run(tmp_path: Path, rows: list[dict], out: str = "out", suffix: str = ".csv", **urls):
    """Download ``rows`` with the fetch cache ``tmp_path/cache``; (report, manifest by URL, out dir)."""
    listing = write_list(tmp_path / f"list{suffix}", rows)
    report = download(urls_params(listing, **urls), tmp_path / out, tmp_path / "cache")
    manifest = {r["origin"]: r for r in read_jsonl(tmp_path / out / "manifest.jsonl")}
    return report, manifest, tmp_path / out


def expected_report(rows: list[dict], skipped: dict[str, int]) -> dict:
    return {
        "source": "urls",
        "seen": len(rows),
        "kept": len(rows) - sum(skipped.values()),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
    }


def cache_entries(cache: Path) -> dict[str, bytes]:
    """URL -> bytes of every intact entry of a fetch cache ({key}.data beside {key}.json)."""
    entries = {}
    for meta in cache.glob("*.json"):
        data = meta.with_suffix(".data")
        record = json.loads(meta.read_text(encoding="utf-8"))
        if data.is_file() and sha256_bytes(data.read_bytes()) == record["sha256"]:
            entries[record["url"]] = data.read_bytes()
    return entries


def ok_rows(server: ImageServer, n: int, prefix: str = "img") -> list[dict]:
    return [
        {"url": server.url(f"/ok/{prefix}{i}-{3 + i}x{2 + 2 * i}.png"), "caption": f"{prefix} number {i}"}
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_row_is_kept_with_the_served_bytes(server, tmp_path, suffix):
    sizes = [(8, 8), (13, 5), (4, 21), (16, 9), (1, 1)]
    rows = [
        {"url": server.url(f"/ok/pic{i}-{w}x{h}.png"), "caption": f"  a  picture\tnumber {i} "}
        for i, (w, h) in enumerate(sizes)
    ]
    report, manifest, out = run(tmp_path, rows, suffix=suffix)

    assert report == expected_report(rows, {})
    assert set(manifest) == {r["url"] for r in rows}
    for row, (w, h) in zip(rows, sizes, strict=True):
        rec, served = manifest[row["url"]], server.body(row["url"])
        assert rec["sha256"] == hashlib.sha256(served).hexdigest()
        assert (out / rec["file"]).read_bytes() == served
        assert (rec["width"], rec["height"]) == (w, h) == Image.open(io.BytesIO(served)).size
        assert rec["file"].endswith(".png") and rec["source"] == "urls"
        assert rec["caption"] == " ".join(row["caption"].split())
        assert (out / rec["file"]).with_suffix(".txt").read_text(encoding="utf-8") == rec["caption"] + "\n"
    assert sorted(server.requests()) == sorted(urlparse(r["url"]).path for r in rows)  # once each
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        n for rec in manifest.values() for n in (Path(rec["file"]).name, Path(rec["file"]).stem + ".txt")
    )


# ------------------------------------------------------------------------------------ failures


def test_503_twice_then_ok_is_retried_and_kept(server, tmp_path):
    rows = [{"url": server.url("/flaky/2/busy-6x4.png"), "caption": "busy"}]
    report, manifest, _ = run(tmp_path, rows, retries=3)
    assert report == expected_report(rows, {})
    assert manifest[rows[0]["url"]]["sha256"] == sha256_bytes(server.body(rows[0]["url"]))
    assert server.count(rows[0]["url"]) == 3  # two 503 answers, then the image


def test_503_more_often_than_the_retries_allow_is_skipped(server, tmp_path):
    rows = [{"url": server.url("/flaky/5/busy-6x4.png"), "caption": "busy"}]
    report, manifest, _ = run(tmp_path, rows, retries=2)
    assert report == expected_report(rows, {"http_503": 1})
    assert manifest == {}
    assert server.count(rows[0]["url"]) == 3  # the first try and two retries


def test_404_is_skipped_without_retrying(server, tmp_path):
    rows = [{"url": server.url("/status/404/gone.png"), "caption": "gone"}, *ok_rows(server, 1)]
    report, manifest, _ = run(tmp_path, rows, retries=3)
    assert report == expected_report(rows, {"http_404": 1})
    assert set(manifest) == {rows[1]["url"]}
    assert server.count(rows[0]["url"]) == 1


def test_permanent_500_is_skipped_after_the_retries(server, tmp_path):
    retries = 2
    rows = [{"url": server.url("/status/500/broken.png"), "caption": "broken"}, *ok_rows(server, 1)]
    report, manifest, _ = run(tmp_path, rows, retries=retries)
    assert report == expected_report(rows, {"http_500": 1})
    assert set(manifest) == {rows[1]["url"]}
    assert server.count(rows[0]["url"]) == retries + 1


@pytest.mark.parametrize("kind", ["slow", "stall"])  # no answer at all / half the body, then silence
def test_slow_answer_is_skipped_as_timeout(server, tmp_path, kind):
    timeout, retries, late = 0.3, 1, 5.0
    rows = [{"url": server.url(f"/{kind}/{late}/late-40x40.png"), "caption": "late"}, *ok_rows(server, 2)]
    started = time.monotonic()
    report, manifest, _ = run(tmp_path, rows, timeout=timeout, retries=retries)
    assert time.monotonic() - started < late  # nobody waited for the late answer
    assert report == expected_report(rows, {"timeout": 1})
    assert set(manifest) == {r["url"] for r in rows[1:]}
    assert 1 <= server.count(rows[0]["url"]) <= retries + 1


def test_body_cut_off_midway_is_fetched_again(server, tmp_path):
    retries = 2
    rows = [
        {"url": server.url("/cut/1/once-12x12.png"), "caption": "cut once"},
        {"url": server.url("/cut/99/always-12x12.png"), "caption": "always cut"},
    ]
    report, manifest, out = run(tmp_path, rows, retries=retries)
    assert report == expected_report(rows, {"incomplete_body": 1})
    assert set(manifest) == {rows[0]["url"]}
    full = server.body(rows[0]["url"])
    assert manifest[rows[0]["url"]]["sha256"] == sha256_bytes(full)
    assert (out / manifest[rows[0]["url"]]["file"]).read_bytes() == full
    assert server.count(rows[0]["url"]) == 2  # the cut answer, then the whole one
    assert server.count(rows[1]["url"]) == retries + 1


def test_invalid_duplicate_and_captionless_rows_are_skipped_unrequested(server, tmp_path):
    good = ok_rows(server, 2)
    port = server.server_address[1]
    rows = [
        good[0],
        {"url": f"ftp://127.0.0.1:{port}/ok/ftp-4x4.png", "caption": "ftp"},
        {"url": "http:///ok/nohost-4x4.png", "caption": "no host"},
        {"url": "not a url", "caption": "words"},
        {"url": "", "caption": "empty"},
        {"url": good[0]["url"], "caption": "the same url again"},
        {"url": server.url("/ok/nocaption-4x4.png"), "caption": "   "},
        good[1],
    ]
    report, manifest, _ = run(tmp_path, rows)
    assert report == expected_report(rows, {"invalid_url": 4, "duplicate_url": 1, "empty_caption": 1})
    assert set(manifest) == {r["url"] for r in good}
    assert manifest[good[0]["url"]]["caption"] == good[0]["caption"]  # the first row wins
    assert sorted(server.requests()) == sorted(urlparse(r["url"]).path for r in good)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_caption_that_is_not_utf8_is_skipped_unrequested(server, tmp_path, suffix):
    good, bad = ok_rows(server, 2)
    if suffix == ".csv":
        text = f"url,caption\n{good['url']},caf\u00e9 cr\u00e8me\n".encode() + f"{bad['url']},caf".encode() + b"\xe9\n"
    else:
        text = json.dumps({"url": good["url"], "caption": "caf\u00e9 cr\u00e8me"}, ensure_ascii=False).encode() + b"\n"
        text += json.dumps({"url": bad["url"], "caption": "caf"}).encode()[:-2] + b'\xe9"}\n'
    listing = tmp_path / f"list{suffix}"
    listing.write_bytes(text)
    report = download(urls_params(listing), tmp_path / "out", tmp_path / "cache")
    assert report == expected_report([good, bad], {"caption_not_utf8": 1})
    [record] = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert (record["origin"], record["caption"]) == (good["url"], "caf\u00e9 cr\u00e8me")
    assert server.requests() == [urlparse(good["url"]).path]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_expected_checksums_are_verified(server, tmp_path, suffix):
    right = sha256_bytes(png("right", 5, 5))
    rows = [
        {"url": server.url("/ok/right-5x5.png"), "caption": "right", "sha256": right},
        {"url": server.url("/ok/upper-5x5.png"), "caption": "upper", "sha256": sha256_bytes(png("upper", 5, 5)).upper()},
        {"url": server.url("/ok/wrong-5x5.png"), "caption": "wrong", "sha256": right},
        {"url": server.url("/ok/none-5x5.png"), "caption": "no checksum", "sha256": ""},
    ]
    report, manifest, _ = run(tmp_path, rows, suffix=suffix)
    assert report == expected_report(rows, {"checksum_mismatch": 1})
    assert set(manifest) == {rows[0]["url"], rows[1]["url"], rows[3]["url"]}
    assert manifest[rows[0]["url"]]["sha256"] == right
    assert rows[2]["url"] not in cache_entries(tmp_path / "cache")  # never cached as if good

    # A rerun must not take the mismatched file from the cache: it is asked for again.
    before = server.count(rows[2]["url"])
    report2, _, _ = run(tmp_path, rows, out="out2", suffix=suffix)
    assert report2 == report
    assert server.count(rows[2]["url"]) == before + 1


def test_bodies_over_max_bytes_are_skipped(server, tmp_path):
    limit = 2000
    rows = [
        {"url": server.url(f"/big/{limit + 1}"), "caption": "declared too large"},
        {"url": server.url(f"/stream/{limit + 1}"), "caption": "too large without a length"},
        {"url": server.url(f"/big/{limit}"), "caption": "exactly the limit"},
        *ok_rows(server, 1),
    ]
    report, manifest, out = run(tmp_path, rows, max_bytes=limit)
    assert report == expected_report(rows, {"too_large": 2})
    assert set(manifest) == {rows[2]["url"], rows[3]["url"]}
    assert (out / manifest[rows[2]["url"]]["file"]).stat().st_size == limit


def test_unreadable_content_length_does_not_abort_the_run(server, tmp_path):
    rows = [{"url": server.url("/badlength/x"), "caption": "odd header"}, *ok_rows(server, 1)]
    report, manifest, _ = run(tmp_path, rows)
    assert report == expected_report(rows, {})
    # Without a usable length the body is read until the server closes: all of it.
    assert manifest[rows[0]["url"]]["sha256"] == sha256_bytes(server.body(rows[0]["url"]))


def test_answers_that_are_not_images_are_skipped_and_never_cached(server, tmp_path):
    not_images = [
        typed("text/html", "page.html"),
        typed("text/html; charset=utf-8", "page.html"),
        typed("application/json", "error.json"),
        typed("text/plain", "denied.txt"),
        typed("text/html", "real.png"),  # an image the server says is a page: not taken
        typed("image/png", "page.html"),  # the type says image, the bytes are a page
        typed("image/jpeg", "error.json"),
        typed(None, "page.html"),
        typed("application/octet-stream", "denied.txt"),
    ]
    rows = [{"url": server.url(p), "caption": f"answer {i}"} for i, p in enumerate(not_images)]
    rows += [{"url": server.url(typed("image/png", "nothing.empty")), "caption": "empty"}, *ok_rows(server, 2)]
    report, manifest, _ = run(tmp_path, rows, retries=3)
    assert report == expected_report(rows, {"not_an_image": len(not_images), "empty_file": 1})
    assert set(manifest) == {r["url"] for r in rows[-2:]}
    assert set(cache_entries(tmp_path / "cache")) == set(manifest)
    assert all(server.count(r["url"]) == 1 for r in rows)  # an answer is not retried

    before = server.requests()
    report2, _, _ = run(tmp_path, rows, out="out2")
    assert report2 == report
    assert sorted(server.requests()[len(before) :]) == sorted(urlparse(r["url"]).path for r in rows[:-2])


@pytest.mark.parametrize(
    "content_type",
    [None, "image/png", "image/jpeg", "IMAGE/WEBP; q=1", "image/x-anything", "application/octet-stream", "binary/octet-stream"],
)
def test_images_of_every_format_are_kept_under_any_image_type(server, tmp_path, content_type):
    extensions = {"png": "png", "jpg": "jpg", "gif": "gif", "webp": "webp", "bmp": "bmp", "tif": "tif", "ico": "img"}
    rows = [{"url": server.url(typed(content_type, f"pic{i}.{ext}")), "caption": ext} for i, ext in enumerate(extensions)]
    report, manifest, out = run(tmp_path, rows)
    assert report == expected_report(rows, {})
    for row in rows:
        rec, served = manifest[row["url"]], server.body(row["url"])
        assert (out / rec["file"]).read_bytes() == served and rec["sha256"] == sha256_bytes(served)
        assert rec["file"].endswith("." + extensions[row["caption"]]) and (rec["width"], rec["height"]) == (6, 4)


def test_a_cached_answer_that_is_not_an_image_is_fetched_again(server, tmp_path):
    rows = ok_rows(server, 2)
    run(tmp_path, rows)
    cache = tmp_path / "cache"
    meta = next(m for m in cache.glob("*.json") if json.loads(m.read_text())["url"] == rows[0]["url"])
    page = b"<html><body>Please complete the captcha</body></html>"
    meta.with_suffix(".data").write_bytes(page)  # intact record and checksum, but a page
    meta.write_text(json.dumps({"url": rows[0]["url"], "sha256": sha256_bytes(page), "bytes": len(page)}))
    before = server.requests()
    report, manifest, out = run(tmp_path, rows, out="out2")
    assert server.requests()[len(before) :] == [urlparse(rows[0]["url"]).path]
    assert report == expected_report(rows, {})
    assert (out / manifest[rows[0]["url"]]["file"]).read_bytes() == server.body(rows[0]["url"])


# -------------------------------------------------------------------------------------- resume


def test_rerun_with_the_same_cache_requests_only_new_rows(server, tmp_path):
    rows = ok_rows(server, 5)
    report, manifest, _ = run(tmp_path, rows)
    first = server.requests()
    assert len(first) == len(rows)

    report2, manifest2, _ = run(tmp_path, rows, out="out2")
    assert server.requests() == first  # nothing asked for again
    assert (report2, manifest2) == (report, manifest)

    more = rows + ok_rows(server, 1, prefix="new")
    report3, manifest3, _ = run(tmp_path, more, out="out3")
    assert server.requests()[len(first) :] == [urlparse(more[-1]["url"]).path]
    assert report3 == expected_report(more, {})
    assert set(manifest3) == {r["url"] for r in more}


def test_corrupt_or_half_written_cache_entries_are_fetched_again(server, tmp_path):
    rows = ok_rows(server, 4)
    _, manifest, _ = run(tmp_path, rows)
    cache = tmp_path / "cache"
    by_url = {json.loads(m.read_text())["url"]: m for m in cache.glob("*.json")}
    assert set(by_url) == {r["url"] for r in rows}

    flipped, truncated, no_record = rows[0]["url"], rows[1]["url"], rows[2]["url"]
    data = by_url[flipped].with_suffix(".data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
    data.write_bytes(bytes(raw))
    data = by_url[truncated].with_suffix(".data")
    data.write_bytes(data.read_bytes()[:-10])
    by_url[no_record].unlink()  # killed between writing the data and its record
    assert set(cache_entries(cache)) == {rows[3]["url"]}

    before = server.requests()
    report, manifest2, out = run(tmp_path, rows, out="out2")
    assert sorted(server.requests()[len(before) :]) == sorted(urlparse(u).path for u in (flipped, truncated, no_record))
    assert report == expected_report(rows, {})
    assert manifest2 == manifest
    for url, rec in manifest2.items():
        assert sha256_bytes((out / rec["file"]).read_bytes()) == rec["sha256"] == sha256_bytes(server.body(url))
    assert set(cache_entries(cache)) == {r["url"] for r in rows}


# --------------------------------------------------------------------------------- the real CLI


def cli(params: Path, out: Path, report: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "stages", "download", "--params", str(params), "--out", str(out),
            "--report", str(report), "--fetch-cache", str(cache)]  # fmt: skip


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}


def write_params(tmp_path: Path, listing: Path, **urls) -> Path:
    data = {
        "tracking": {"enabled": False},
        "download": {"source": "urls", "urls": {"list": str(listing), "backoff": 0.01, **urls}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path


def test_killed_cli_leaves_no_output_and_the_rerun_fetches_only_the_rest(server, tmp_path):
    server.delay = 0.2
    rows = ok_rows(server, 12)
    listing = write_list(tmp_path / "list.jsonl", rows)
    params = write_params(tmp_path, listing, workers=2, retries=1, timeout=10)
    out, report, cache = tmp_path / "out", tmp_path / "report.json", tmp_path / "cache"
    args, env = cli(params, out, report, cache), cli_env(tmp_path)

    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(list(cache.glob("*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL, (tmp_path / "first.log").read_text()

    assert not out.exists() and not report.exists()  # nothing half-written
    assert not list(tmp_path.glob(".out*"))
    done = cache_entries(cache)  # files fully fetched before the kill
    assert 3 <= len(done) < len(rows)
    assert all(body == server.body(url) for url, body in done.items())

    before = len(server.requests())
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    again = server.requests()[before:]
    assert Counter(again) == Counter(urlparse(r["url"]).path for r in rows if r["url"] not in done)

    manifest = {r["origin"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert set(manifest) == {r["url"] for r in rows}
    for url, rec in manifest.items():
        assert rec["sha256"] == sha256_bytes(server.body(url)) == sha256_bytes((out / rec["file"]).read_bytes())
    assert json.loads(report.read_text()) == expected_report(rows, {})


# ---------------------------------------------------------------------------- bad list files


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("list.csv", "url,text\nhttp://127.0.0.1/a.png,a\n", r"no column 'caption' \(columns: url, text\)"),
        ("list.jsonl", '{"link": "http://127.0.0.1/a.png", "caption": "a"}\n', r"no column 'url'"),
        ("list.txt", "http://127.0.0.1/a.png a\n", r"unsupported table format '\.txt'"),
        ("list.parquet", "this is not parquet", r"cannot parse parquet table"),
        ("list.jsonl", '{"url": "http://127.0.0.1/a.png", "caption": \n', r"cannot parse jsonl table"),
    ],
)
def test_bad_list_file_is_a_source_error_naming_it(server, tmp_path, name, content, expected):
    listing = tmp_path / name
    listing.write_text(content, encoding="utf-8")
    with pytest.raises(SourceError) as info:
        download(urls_params(listing), tmp_path / "out", tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{listing}: ")
    assert re.search(expected, message), message
    assert not (tmp_path / "out").exists()
    assert server.requests() == []


def test_cli_with_a_bad_list_exits_1_with_one_error_line(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("link,caption\nhttp://127.0.0.1/a.png,a\n", encoding="utf-8")
    params = write_params(tmp_path, listing)
    out, report, cache = tmp_path / "out", tmp_path / "report.json", tmp_path / "cache"
    result = subprocess.run(
        cli(params, out, report, cache), cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {listing}: no column 'url' (columns: link, caption)"]
    assert not out.exists() and not report.exists()
