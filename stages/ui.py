"""`imager ui`: the web app and its HTTP API for the trained cascade.

Not a pipeline stage: like `imager generate` it reads the pipeline's outputs (the train_base and
train_sr model files of dvc.yaml by default) with params.yaml's `embed` and sampling settings,
and offers every `cascade` model the evaluate runs logged to MLflow as well. Requests may use the
LoRA adapter files of the `--lora-dir` folders (`data/finetune`, where fine-tuning writes them, by
default) and the sketch controls of the `--control-dir` folders (`data/control`, where
`imager train-control` writes them, by default; params.yaml's `control.default` variant is the
default control), and no other file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from imager.errors import ConfigError
from stages._common import ParamsOption, load_params, user_errors

log = logging.getLogger("imager")
MODELS = "Models"
LIMITS = "Limits per request"
ACCESS = "Access"
LORA_DIR = Path("data/finetune")  # where the fine-tuning stages write their adapters
CONTROL_DIR = Path("data/control")  # where `imager train-control` writes its controls


@user_errors
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback exposes the app to the network (use --auth).", rich_help_panel=ACCESS)] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.", rich_help_panel=ACCESS)] = 7860,
    auth: Annotated[str | None, typer.Option(help="USER:PASSWORD asked of every visitor and API call (HTTP Basic).", envvar="IMAGER_AUTH", rich_help_panel=ACCESS)] = None,
    token: Annotated[str | None, typer.Option(help="A token API clients may send as 'Authorization: Bearer TOKEN'.", envvar="IMAGER_API_TOKEN", rich_help_panel=ACCESS)] = None,
    base: Annotated[Path, typer.Option(help="Base model file.", rich_help_panel=MODELS)] = Path("data/models/base/model.safetensors"),
    sr: Annotated[Path, typer.Option(help="Super-resolution model file.", rich_help_panel=MODELS)] = Path("data/models/sr/model.safetensors"),
    model: Annotated[list[str] | None, typer.Option(help="An MLflow model URI (runs:/ID/cascade, models:/...) or run id to offer; the first is the default. Repeatable.", rich_help_panel=MODELS)] = None,
    mlflow_models: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="Also offer every cascade logged to the MLflow store.", rich_help_panel=MODELS)] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda[:i].", rich_help_panel=MODELS)] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads of the sampling worker. Default: torch's (the cores).", rich_help_panel=MODELS)] = None,
    lora_dir: Annotated[list[Path] | None, typer.Option("--lora-dir", metavar="DIR", help=f"A folder of LoRA adapter files requests may use (no file outside these folders is read). Repeatable. Default: {LORA_DIR} if it exists.", rich_help_panel=MODELS)] = None,
    control_dir: Annotated[list[Path] | None, typer.Option("--control-dir", metavar="DIR", help=f"A folder of sketch control (ControlNet, adapter) files requests may use (no file outside these folders is read). Repeatable. Default: {CONTROL_DIR} if it exists.", rich_help_panel=MODELS)] = None,
    history: Annotated[Path, typer.Option(help="Folder of the generated PNGs (each with its parameters).")] = Path("outputs/history"),
    max_steps: Annotated[int, typer.Option(min=1, help="Most sampling steps a request may ask for.", rich_help_panel=LIMITS)] = 200,
    max_images: Annotated[int, typer.Option(min=1, help="Most images per request.", rich_help_panel=LIMITS)] = 8,
    max_prompt: Annotated[int, typer.Option(min=1, help="Longest prompt, in characters.", rich_help_panel=LIMITS)] = 500,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, help="Largest uploaded image, in MB.", rich_help_panel=LIMITS)] = 8.0,
    queue: Annotated[int, typer.Option(min=1, help="Most requests waiting at once.", rich_help_panel=LIMITS)] = 32,
    api_only: Annotated[bool, typer.Option("--api-only", help="Serve the HTTP API without the web page.")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Serve the web app (http://127.0.0.1:7860) and the HTTP API (/api/v1, docs at /api/v1/docs)."""
    from imager.app.adapters import AdapterLibrary
    from imager.app.controls import ControlLibrary
    from imager.app.engine import Engine
    from imager.app.history import History
    from imager.app.models import ModelRegistry, files_source, mlflow_source
    from imager.app.request import Limits
    from imager.app.server import create_app, is_loopback, parse_auth, serve
    from imager.inference import resolve_device
    from imager.tracking import tracking_uri

    p = load_params(params)
    credentials = parse_auth(auth)
    if token is not None and len(token) < 8:
        raise ConfigError("--token: use at least 8 characters")
    resolve_device(device, "--device")
    sources = [mlflow_source(uri) for uri in model or []]
    if base.is_file():
        sources.append(files_source(base, sr if sr.is_file() else None, label=f"workspace: {base.parent}"))
    elif base != Path("data/models/base/model.safetensors"):
        raise ConfigError(f"--base: no model file {base}")
    if mlflow_models:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
    registry = ModelRegistry(sources, params=p, device=device, search_mlflow=mlflow_models)
    if not registry.list():
        raise ConfigError("no model to serve: train one with `dvc repro`, or give --base/--sr files or --model URI")
    limits = Limits(prompt_chars=max_prompt, steps=max_steps, images=max_images, upload_bytes=int(max_upload_mb * 1e6), queue=queue)
    if history.exists() and not history.is_dir():
        raise ConfigError(f"--history: {history} is a file, not a folder")
    controls = ControlLibrary(folders(control_dir, CONTROL_DIR, "--control-dir"), default=p.control.default)
    engine = Engine(registry, History(history), limits, threads=threads, adapters=AdapterLibrary(folders(lora_dir, LORA_DIR, "--lora-dir")), controls=controls)
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can use the app%s", host, "" if credentials or token else "; protect it with --auth")
    app = create_app(engine, auth=credentials, token=token, ui=not api_only, defaults=form_defaults(p))
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    typer.echo(f"Imager at http://{shown}:{port}/  (API: http://{shown}:{port}/api/v1/docs; Ctrl+C stops)", err=True)
    engine.start(preload=True)  # the default model loads while the server starts
    try:
        serve(app, host=host, port=port)
    finally:
        engine.close()


def folders(given: list[Path] | None, default: Path, option: str) -> list[Path]:
    """The folders of ``option``, each checked to exist; none given: ``default`` if it exists."""
    if not given:
        return [default] if default.is_dir() else []
    for folder in given:
        if not folder.is_dir():
            raise ConfigError(f"{option}: no folder {folder}")
    return list(given)


def form_defaults(p) -> dict:
    """The form's initial values: params.yaml's sampler and evaluation settings."""
    sampling = p.evaluate.sampling(p.sampler)
    return {"sampler": sampling.sampler, "steps": sampling.base.steps, "guidance": sampling.base.guidance, "threshold": sampling.base.threshold,
            "sr_steps": sampling.sr.steps, "sr_guidance": sampling.sr.guidance}  # fmt: skip
