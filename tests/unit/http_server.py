"""A real HTTP server on 127.0.0.1 for the urls-source tests.

It answers by path (``/<behaviour>/<arg>/<name>-<W>x<H>.png``), logs every request and keeps the
exact bytes of every full 200 answer, so tests compare outputs with what was served.
``/typed/<quoted Content-Type, or ->/<name>.<ext>`` serves a small image in the format of ``ext``
(or an HTML page, JSON, plain text, nothing) under any Content-Type.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlparse

from PIL import Image

NAME = re.compile(r"^(?P<name>[\w.-]+)-(?P<w>\d+)x(?P<h>\d+)\.png$")
FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "ico": "ICO"}
PAGES = {
    "html": b"<!DOCTYPE html>\n<html><head><title>Not Found</title></head><body>No such image</body></html>\n",
    "json": b'{"error": "not found", "status": 404}\n',
    "txt": b"Access denied\n",
    "empty": b"",
}

def png(name: str, width: int, height: int) -> bytes:
    """A tiny PNG whose pixels depend on ``name``, so every URL serves different bytes."""
    seed = hashlib.sha256(name.encode()).digest()
    pixels = (seed * (width * height * 3 // len(seed) + 1))[: width * height * 3]
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, format="PNG")
    return buf.getvalue()


def typed_body(filename: str) -> bytes:
    """``<name>.<ext>``: a 6x4 image in the format of ``ext`` with pixels from ``name``, or a page."""
    name, ext = filename.rsplit(".", 1)
    if ext in PAGES:
        return PAGES[ext]
    buf = io.BytesIO()
    extra = {"sizes": [(6, 4)]} if ext == "ico" else {}  # Pillow < 13 writes an empty icon for an image below its 16 px default sizes
    Image.open(io.BytesIO(png(name, 6, 4))).save(buf, format=FORMATS[ext], **extra)
    return buf.getvalue()


def typed(content_type: str | None, filename: str) -> str:
    """The path that serves ``typed_body(filename)`` as ``content_type`` (None: no such header)."""
    return f"/typed/{quote(content_type, safe='') if content_type is not None else '-'}/{filename}"


# ----------------------------------------------------------------------------------- the server


class ImageServer(ThreadingHTTPServer):
    """Behaviours by path; ``delay`` (seconds) holds back every answer; logs are thread-safe."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.delay = 0.0
        self.log: list[str] = []  # every request's path, in arrival order
        self.done: list[str] = []  # paths whose full 200 answer was sent
        self.served: dict[str, bytes] = {}  # path -> bytes of its last full 200 answer

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def arrive(self, path: str) -> int:
        """Log a request; how many times this path has now been asked for."""
        with self.lock:
            self.log.append(path)
            return self.log.count(path)

    def count(self, url_or_path: str) -> int:
        path = urlparse(url_or_path).path or url_or_path
        with self.lock:
            return self.log.count(path)

    def requests(self) -> list[str]:
        with self.lock:
            return list(self.log)

    def body(self, url: str) -> bytes:
        with self.lock:
            return self.served[urlparse(url).path]


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def do_GET(self):  # noqa: N802
        srv, path = self.server, self.path
        nth = srv.arrive(path)
        try:
            if srv.delay:
                srv.stopping.wait(srv.delay)
            self._answer(srv, path, nth)
        except OSError:  # the client gave up (timeout) or the test ended: nothing to answer
            pass

    def _answer(self, srv: ImageServer, path: str, nth: int) -> None:
        kind, *args = path.strip("/").split("/")
        last = NAME.match(args[-1]) if args else None
        if kind == "status":
            return self._status(int(args[0]))
        if kind in ("big", "stream"):  # /big/<n>: n bytes with Content-Length; /stream/<n>: without
            size = int(args[0])
            body = png("big", 4, 4).ljust(size, b"\0")  # an image padded to n bytes
            return self._send(body, length=size if kind == "big" else None, path=path)
        if kind == "typed":  # /typed/<quoted Content-Type or ->/<name>.<ext>
            content_type = None if args[0] == "-" else unquote(args[0])
            body = typed_body(args[1])
            return self._send(body, length=len(body), path=path, content_type=content_type)
        if kind == "badlength":  # a Content-Length no parser can read, body until close
            body = png("badlength", 4, 4)
            return self._send(body, length="lots", path=path)
        if last is None:
            return self._status(404)
        body = png(last["name"], int(last["w"]), int(last["h"]))
        if kind == "flaky" and nth <= int(args[0]):  # /flaky/<n>/...: 503 for the first n requests
            return self._status(503)
        if kind == "slow":  # /slow/<seconds>/...: answer late
            srv.stopping.wait(float(args[0]))
        if kind == "stall":  # /stall/<seconds>/...: headers and half the body, then a pause
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            srv.stopping.wait(float(args[0]))
            self.wfile.write(body[len(body) // 2 :])
            return None
        if kind == "cut" and nth <= int(args[0]):  # /cut/<n>/...: half the body, then close, n times
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(body, length=len(body), path=path)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, length: int | str | None, path: str, content_type: str | None = "image/png") -> None:
        self.send_response(200)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        with self.server.lock:
            self.server.served[path] = body
            self.server.done.append(path)


