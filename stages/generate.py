"""`imager generate "red apple" --out apple.png`: images from the trained cascade.

Not a pipeline stage: it reads the pipeline's outputs (the model paths below are the train_base and
train_sr outs of dvc.yaml) and the text-encoder and sampling settings of params.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from imager.errors import ConfigError
from stages._common import ParamsOption, load_params, user_errors

log = logging.getLogger("imager")


@user_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw, e.g. 'red apple'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write; with --num N > 1, NAME-0.png ... NAME-{N-1}.png.")],
    num: Annotated[int, typer.Option("--num", "-n", min=1, max=1024, help="Images to make (seeds seed, seed+1, ... within a batch).")] = 1,
    sampler: Annotated[str | None, typer.Option(help="Sampler; default: params.yaml `sampler`.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=1000, help="Base-model steps; default: evaluate.base.steps.")] = None,
    guidance: Annotated[float | None, typer.Option(min=0, help="Base-model guidance; default: evaluate.base.guidance.")] = None,
    sr_steps: Annotated[int | None, typer.Option(min=1, max=1000, help="SR steps; default: evaluate.sr.steps.")] = None,
    sr_guidance: Annotated[float | None, typer.Option(min=0, help="SR guidance; default: evaluate.sr.guidance.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed; the same seed gives the same image. Default: evaluate.seed.")] = None,
    base: Annotated[Path, typer.Option(help="Base model file.")] = Path("data/models/base/model.safetensors"),
    sr: Annotated[Path, typer.Option(help="Super-resolution model file.")] = Path("data/models/sr/model.safetensors"),
    no_sr: Annotated[bool, typer.Option("--no-sr", help="Stop at the base model's resolution.")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Generate images for PROMPT with the trained cascade (base, then super-resolution)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from imager.cascade import Cascade, encode_prompts
    from imager.samplers import get_sampler
    from imager.serving import sampling_defaults
    from imager.text.base import load_text_encoder
    from imager.training.tasks import to_uint8

    p = load_params(params)
    s = sampling_defaults(p)
    given = {"sampler": sampler, "steps": steps, "guidance": guidance, "sr_steps": sr_steps, "sr_guidance": sr_guidance, "seed": seed}
    s |= {k: v for k, v in given.items() if v is not None}
    get_sampler(s["sampler"])  # bad input fails before any model loads
    if not prompt.strip():
        raise ConfigError("prompt 1 is empty; give a text such as 'red apple'")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: must be a .png file, got '{out}'")
    if out.parent and not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")
    cascade = Cascade.load(base, None if no_sr else sr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours), and one line on an error
    encoder = load_text_encoder(p.embed)
    cascade.check_encoder(encoder)
    cond, truncated = encode_prompts(encoder, [prompt] * num)
    if truncated:
        log.warning("the prompt is longer than %d tokens and was cut", encoder.max_length)
    with tqdm(total=num, desc="generate", unit="img") as bar:
        low, high = cascade.generate(
            cond, sampler=s["sampler"], base_steps=s["steps"], base_guidance=s["guidance"], sr_steps=s["sr_steps"],
            sr_guidance=s["sr_guidance"], aug_level=s["aug_level"], seed=s["seed"], batch_size=s["batch_size"],
            use_sr=not no_sr, on_batch=bar.update,
        )
    images = to_uint8(high if high is not None else low).permute(0, 2, 3, 1).numpy()
    paths = [out] if num == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num)]
    for image, path in zip(images, paths, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
    typer.echo("\n".join(str(p) for p in paths))
