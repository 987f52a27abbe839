"""The HTTP API, version 1: JSON over HTTP beside the web page, for scripts and curl.

======  ================================  =============================================================
POST    /api/v1/generate                  queue a request (JSON :class:`GenerateRequest`); 202 + the job.
                                          ``?wait=true``: answer when it is finished, images inlined.
GET     /api/v1/jobs/{id}                 the job: state, queue position, progress, ETA, images, error
GET     /api/v1/jobs/{id}/events          the same as server-sent events until it ends (at most one per
                                          ``?interval=`` seconds, 0.1 by default; the last always)
GET     /api/v1/jobs/{id}/preview.png     the latest live preview (x̂0 of the current step)
POST    /api/v1/jobs/{id}/cancel          stop it (within one denoiser call; finished images are kept)
GET     /api/v1/history                   the newest images with their parameters (``?limit=``)
GET     /api/v1/history/{name}            one image (PNG, parameters in its text chunks)
POST    /api/v1/params                    the parameters of an uploaded Imager PNG (raw bytes body)
GET     /api/v1/models                    the models the server offers (the first is the default)
GET     /api/v1/adapters                  the LoRA adapters a request may name, and whether each fits
                                          the model (``?model=``, the default one unless given)
GET     /api/v1/controls                  the sketch controls a request may name as ``controlnet``, the
                                          default marked, and whether each fits the model (``?model=``)
GET     /api/v1/health                    version, queue length, loaded models
======  ================================  =============================================================

Errors are JSON ``{"error": "<one line naming the field>"}`` with 422 for a bad request, 404 for
an unknown job, image or model, 413 for a body over the upload limit, 503 for a full queue and 401
without the credentials the server asks for. The OpenAPI schema is at ``/api/v1/openapi.json``
and its pages at ``/api/v1/docs``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from imager.app.engine import FINISHED, Engine, QueueFullError, milestone
from imager.app.history import NotFoundError
from imager.errors import ImagerError

EXAMPLE = {"prompt": "red apple", "negative_prompt": "", "seed": 3, "steps": 20, "num_images": 1}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install_errors(app: FastAPI) -> None:
    """One-line JSON errors for the library's errors and for malformed bodies."""

    @app.exception_handler(ImagerError)
    async def _imager(request: Request, exc: ImagerError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFoundError) else 503 if isinstance(exc, QueueFullError) else 422
        return error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return error(422, f"body: not valid JSON ({err.get('ctx', {}).get('error', 'cannot parse')})")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        return error(422, f"{where}: {err.get('msg', 'invalid request')}")


def router(engine: Engine) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    def health() -> dict[str, Any]:
        from imager.inference.metadata import imager_version

        return {"status": "ok", "version": imager_version(), "api": "v1", **engine.status()}

    @api.get("/models")
    def models() -> dict[str, Any]:
        listed = engine.models.list()
        return {"default": listed[0].id if listed else None, "models": [s.describe() for s in listed], "loaded": engine.models.loaded()}

    @api.get("/adapters")
    def adapters(model: Annotated[str | None, Query(description="A model id of /models (default: the first).")] = None) -> dict[str, Any]:
        return engine.available_adapters(model)

    @api.get("/controls")
    def controls(model: Annotated[str | None, Query(description="A model id of /models (default: the first).")] = None) -> dict[str, Any]:
        return engine.available_controls(model)

    @api.post("/generate", status_code=202)
    async def generate(
        body: Annotated[dict[str, Any], Body(examples=[EXAMPLE], description="A GenerateRequest: every field but prompt is optional.")],
        wait: Annotated[bool, Query(description="Answer when the job has finished, its images inlined as base64 PNG.")] = False,
    ) -> Response:
        job = await asyncio.to_thread(engine.submit, body)  # decoding and checking uploads is CPU work
        if not wait:
            return JSONResponse(job.describe(), status_code=202)
        version = -1
        while not job.finished_state:
            version = await asyncio.to_thread(engine.wait, job, version, 10.0)
        return JSONResponse(finished(job), status_code=200)

    @api.get("/jobs/{id}")
    def job(id: str) -> dict[str, Any]:
        return engine.job(id).describe()

    @api.get("/jobs/{id}/preview.png")
    def preview(id: str) -> Response:
        job = engine.job(id)
        if job.preview is None:
            raise NotFoundError(f"job: '{id}' has no preview yet")
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.post("/jobs/{id}/cancel")
    def cancel(id: str) -> dict[str, Any]:
        return engine.cancel(id).describe()

    @api.get("/jobs/{id}/events")
    async def events(
        id: str,
        previews: Annotated[bool, Query(description="Inline each new preview as base64 PNG.")] = False,
        interval: Annotated[float, Query(ge=0, le=60, description="Seconds between progress events at least (a new stage, the first preview and the end come at once).")] = 0.25,
    ) -> StreamingResponse:
        job = engine.job(id)

        async def stream():
            version, sent, last = -1, -float("inf"), None
            while True:
                version = await asyncio.to_thread(engine.wait, job, version, 10.0)
                state = job.describe()  # one snapshot: the job may finish while it is sent
                if not milestone(state, last):  # a step of the same stage: at most one event per interval
                    pause = sent + interval - time.monotonic()
                    if pause > 0:
                        await asyncio.to_thread(engine.wait_milestone, job, last, pause)
                        state = job.describe()
                        version = state["version"]
                finished = state["state"] in FINISHED
                if previews and job.preview is not None and state["preview_count"] != (last or {}).get("preview_count", 0):
                    state["preview_png"] = base64.b64encode(job.preview).decode()
                yield f"event: {state['state'] if finished else 'progress'}\ndata: {json.dumps(state)}\n\n"
                sent, last = time.monotonic(), state
                if finished:
                    return

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @api.get("/history")
    def history(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        return {"images": [e.describe() for e in engine.history.entries(limit)]}

    @api.get("/history/{name}")
    def history_image(name: str) -> FileResponse:
        return FileResponse(engine.history.path(name), media_type="image/png")

    @api.post("/params")
    async def params(request: Request) -> dict[str, Any]:
        from imager.app.request import recalled
        from imager.inference.metadata import read_params

        data = await request.body()
        if len(data) > engine.limits.upload_bytes:
            raise ImagerError(f"body: {len(data) / 1e6:.1f} MB, more than the limit of {engine.limits.upload_bytes / 1e6:.1f} MB")
        found = read_params(data, "body")
        return {"params": found, "request": recalled(found)}

    return api


def finished(job) -> dict[str, Any]:
    """A finished job with its images inlined (``png_base64``)."""
    out = job.describe()
    for entry, shown in zip(job.results, out["images"], strict=True):
        shown["png_base64"] = base64.b64encode(entry.path.read_bytes()).decode()
    return out


__all__ = ["install_errors", "router"]
