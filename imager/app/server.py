"""The server: the HTTP API at ``/api/v1`` and the Gradio page at ``/``, on one FastAPI app.

Access: with ``auth`` (user, password) every path asks for HTTP Basic credentials (browsers show
their login box; scripts send ``-u user:pass``); with ``token`` a script may send
``Authorization: Bearer <token>`` instead. Bodies larger than twice the upload limit are refused
before they are read (413): base64 and JSON add about a third to an image.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import secrets
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse

from imager.app.api import install_errors, router
from imager.app.engine import Engine
from imager.errors import ConfigError

log = logging.getLogger("imager")
UI_PATH = "/ui"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` -> (user, pass); a ConfigError naming ``--auth`` for anything else."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: credentials and the body-size limit, before anything else runs."""

    def __init__(self, app: Any, *, auth: tuple[str, str] | None, token: str | None, max_body: int):
        self.app, self.auth, self.token, self.max_body = app, auth, token, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if (self.auth or self.token) and not self._allowed(headers.get("authorization", "")):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            response = JSONResponse({"error": "unauthorized: give the server's credentials (--auth user:pass, or its API token)"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="Imager"'} if self.auth else {})  # fmt: skip
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            response = JSONResponse({"error": f"body: {int(length) / 1e6:.1f} MB, more than the limit of {self.max_body / 1e6:.1f} MB"}, status_code=413)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token:
            return secrets.compare_digest(value.strip().encode(), self.token.encode())
        if scheme == "basic" and self.auth:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return False
            ok_user = secrets.compare_digest(user.encode(), self.auth[0].encode())
            ok_pass = secrets.compare_digest(password.encode(), self.auth[1].encode())
            return ok_user and ok_pass
        return False


def create_app(engine: Engine, *, auth: tuple[str, str] | None = None, token: str | None = None, ui: bool = True, defaults: dict | None = None) -> FastAPI:
    """The FastAPI app: API, page (``ui``), credentials. ``defaults`` are the form's initial values."""
    from imager.inference.metadata import imager_version

    app = FastAPI(
        title="Imager", version=imager_version(), docs_url="/api/v1/docs", openapi_url="/api/v1/openapi.json", redoc_url=None,
        description="Text to image with Imager's diffusion cascade: queue a request, follow its progress, fetch its images.",
    )  # fmt: skip
    install_errors(app)
    app.include_router(router(engine), prefix="/api/v1", tags=["v1"])
    if ui:
        import gradio as gr

        from imager.app.ui import build_ui

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse(UI_PATH + "/")

        page = build_ui(engine, defaults=defaults)
        # Uploads past the limit are refused by Gradio too; no folder of this machine is served.
        app = gr.mount_gradio_app(app, page, path=UI_PATH, allowed_paths=[], show_error=True, max_file_size=engine.limits.upload_bytes)
    app.add_middleware(Guard, auth=auth, token=token, max_body=2 * engine.limits.upload_bytes + 65536)
    app.state.engine = engine
    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
