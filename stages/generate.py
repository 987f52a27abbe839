"""`imager generate "red apple" --out apple.png`: images from the trained cascade.

Not a pipeline stage: it reads the pipeline's outputs (the model paths below are the train_base and
train_sr outs of dvc.yaml) and the text-encoder and sampling settings of params.yaml (`embed`,
`sampler`, `evaluate`); every sampling option overrides its params value for this call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from imager.errors import ConfigError
from stages._common import ParamsOption, load_params, user_errors

log = logging.getLogger("imager")
SAMPLING = "Sampling (default: params.yaml `sampler` and `evaluate`)"


@user_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw, e.g. 'red apple'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write; with --num N > 1, NAME-0.png ... NAME-{N-1}.png.")],
    num: Annotated[int, typer.Option("--num", "-n", min=1, max=1024, help="Images to make (seeds seed, seed+1, ... within a batch).")] = 1,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt: what to steer away from (replaces the unconditional branch of guidance).", rich_help_panel=SAMPLING)] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler of both stages.", rich_help_panel=SAMPLING)] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=1000, help="Base-model steps.", rich_help_panel=SAMPLING)] = None,
    guidance: Annotated[float | None, typer.Option(min=0, help="Base-model guidance scale (1: none).", rich_help_panel=SAMPLING)] = None,
    spacing: Annotated[str | None, typer.Option(help="Base-model step spacing: linspace, leading, trailing, karras, exponential.", rich_help_panel=SAMPLING)] = None,
    eta: Annotated[float | None, typer.Option(min=0, help="Noise scale of the stochastic samplers (base model).", rich_help_panel=SAMPLING)] = None,
    threshold: Annotated[str | None, typer.Option(help="x̂0 thresholding of both stages: none, static or dynamic.", rich_help_panel=SAMPLING)] = None,
    percentile: Annotated[float | None, typer.Option(min=0, max=1, help="Dynamic thresholding's quantile of |x̂0|.", rich_help_panel=SAMPLING)] = None,
    sr_steps: Annotated[int | None, typer.Option(min=1, max=1000, help="SR steps.", rich_help_panel=SAMPLING)] = None,
    sr_guidance: Annotated[float | None, typer.Option(min=0, help="SR guidance scale.", rich_help_panel=SAMPLING)] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed; the same seed gives the same image on the same device.", rich_help_panel=SAMPLING)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda[:i].")] = "auto",
    base: Annotated[Path, typer.Option(help="Base model file.")] = Path("data/models/base/model.safetensors"),
    sr: Annotated[Path, typer.Option(help="Super-resolution model file.")] = Path("data/models/sr/model.safetensors"),
    no_sr: Annotated[bool, typer.Option("--no-sr", help="Stop at the base model's resolution.")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Generate images for PROMPT with the trained cascade (base, then super-resolution)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from imager.inference import Cascade, check_sampling, encode_prompts, resolve_device
    from imager.inference.cascade import encode_negative
    from imager.inference.config import with_overrides
    from imager.inference.images import to_hwc
    from imager.text import load_text_encoder

    p = load_params(params)
    given = {"sampler": sampler, "steps": steps, "guidance": guidance, "spacing": spacing, "eta": eta, "threshold": threshold,
             "percentile": percentile, "sr_steps": sr_steps, "sr_guidance": sr_guidance, "seed": seed}
    sampling = with_overrides(p.evaluate.sampling(p.sampler), given, cli=True)
    for stage in ("base", "sr"):  # bad input fails before any model loads
        check_sampling(sampling.stage(stage))
    if not prompt.strip():
        raise ConfigError("prompt 1 is empty; give a text such as 'red apple'")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: must be a .png file, got '{out}'")
    if out.parent and not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")
    if negative is not None and negative.strip() and sampling.base.guidance == 1 and (no_sr or sampling.sr.guidance == 1):
        log.warning("--negative has no effect at guidance 1: the unconditional branch is not evaluated")
    target = resolve_device(device, "--device")
    cascade = Cascade.load(base, None if no_sr else sr, device=target)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours), and one line on an error
    encoder = load_text_encoder(p.embed)
    cascade.check_encoder(encoder)
    cond, truncated = encode_prompts(encoder, [prompt] * num)
    if truncated:
        log.warning("the prompt is longer than %d tokens and was cut", encoder.max_length)
    neg = encode_negative(encoder, [negative or ""])
    with tqdm(total=num, desc=f"generate ({target.type})", unit="img") as bar:
        low, high = cascade.generate(cond, sampling, negative=neg, use_sr=not no_sr, on_batch=bar.update)
    images = to_hwc(high if high is not None else low).numpy()
    paths = [out] if num == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num)]
    for image, path in zip(images, paths, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
    typer.echo("\n".join(str(p) for p in paths))
