"""`imager generate "red apple" --out apple.png`: images from the trained cascade.

Not a pipeline stage: it reads the pipeline's outputs (the model paths below are the train_base and
train_sr outs of dvc.yaml) and the text-encoder and sampling settings of params.yaml (`embed`,
`sampler`, `evaluate`); every sampling option overrides its params value for this call.

From an image (``--init-image``): img2img at ``--strength``, inpainting of ``--mask`` (white =
repaint) and outpainting (``--outpaint``). The inputs are read and checked by
:func:`imager.inference.edit.prepare` before any model loads; what it did to them (resized, cropped,
converted, nothing to repaint) is logged as warnings.

Each PNG carries its parameters in its text chunks (:mod:`imager.inference.metadata`): prompt,
negative prompt, seed, sampler, steps, guidance, strength, the model files' SHA-256 and Imager's
version; `imager ui` restores them from a dropped file. Images of one batch share its seed (the
noise of the batch is drawn at once): such a PNG also records its ``batch_index`` and ``batch_size``.

LoRA adapters (``--lora FILE[:SCALE]``, repeatable) change the base or SR model each was trained on,
at its weight (:mod:`imager.inference.adapters`); the files are checked before any model loads, and
the PNG records them (``adapters``: file, weight, SHA-256, stage, rank). ``--merge-lora`` folds them
into the weights first: one matmul less per adapted layer and step, the same image up to rounding.

A dataset (``--prompts FILE --out DIR``): ``--num`` images per prompt of the list, written as a
folder the data stages read back (PNGs, captions, a manifest of every image's parameters; tar
shards too with ``--format webdataset``), in chunks that a rerun skips when already made
(:mod:`imager.inference.dataset`).

A sketch (``--control SKETCH[:SCALE]``, repeatable) steers the base model through a trained control
(``--controlnet``: a ControlNet or adapter file of `imager train-control`, refused for another base
model), from ``--control-start`` to ``--control-end`` of the sampling; the PNG records each
(``controls``: file, SHA-256, kind, sketch, scale, window).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imager.app.request import IMG2IMG_STRENGTH  # the one default of every img2img entry point
from imager.errors import CheckpointError, ConfigError, ImagerError
from stages._common import ParamsOption, load_params, user_errors

if TYPE_CHECKING:
    from imager.inference.adapters import AdapterSpec
    from imager.inference.edit import EditInput

log = logging.getLogger("imager")
SAMPLING = "Sampling (default: params.yaml `sampler` and `evaluate`)"
IMAGE = "Image input"
ADAPTERS = "LoRA adapters"
CONTROL = "Sketch control (ControlNet)"
DATASET = "A dataset from a prompt list"


@user_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw, e.g. 'red apple'; may be '' with --init-image (the image alone guides). Leave out with --prompts.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write; with --num N > 1, NAME-0.png ... NAME-{N-1}.png. With --prompts: the dataset's folder.", show_default=False)] = None,
    num: Annotated[int, typer.Option("--num", "-n", min=1, max=1024, help="Images to make (seeds seed, seed+1, ... within a batch); with --prompts, images per prompt.")] = 1,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="A dataset from a prompt list (a text file, one per line, or a csv/jsonl/parquet table with a prompt column) into the folder --out: PNGs, captions and a manifest; run again to resume.", rich_help_panel=DATASET, show_default=False)] = None,
    chunk: Annotated[int, typer.Option(min=1, max=4096, help="Prompts made together (a unit of resuming; its images draw their noise from seed + its first image's index).", rich_help_panel=DATASET)] = 8,
    data_format: Annotated[str, typer.Option("--format", help="folder (images, captions, manifest) or webdataset (the same, and tar shards in DIR/shards).", rich_help_panel=DATASET)] = "folder",
    licence: Annotated[str, typer.Option(help="The licence the dataset's manifest records for its images.", rich_help_panel=DATASET)] = "CC BY-SA 4.0",
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
    init_image: Annotated[Path | None, typer.Option("--init-image", help="Image to start from (img2img), or to inpaint with --mask or outpaint with --outpaint. Not square: centre-cropped, unless outpainted.", rich_help_panel=IMAGE)] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask of --init-image: white = repaint, black = keep. Same shape as the image; another size is resized.", rich_help_panel=IMAGE)] = None,
    strength: Annotated[float | None, typer.Option(help=f"How much of --init-image is redrawn, in (0, 1]; 1: from noise. Default: {IMG2IMG_STRENGTH} (AUTOMATIC1111's) for img2img, 1 with --mask or --outpaint.", rich_help_panel=IMAGE)] = None,
    sr_strength: Annotated[float | None, typer.Option(help="SR stage: refine --init-image (at the SR resolution) from this strength, in (0, 1], instead of upsampling from noise.", rich_help_panel=IMAGE)] = None,
    resample: Annotated[int | None, typer.Option(help="RePaint resampling of the base stage with a mask: each step taken N times (1: none); blends the repainted part, N times the time.", rich_help_panel=IMAGE)] = None,
    mask_blur: Annotated[float | None, typer.Option(help="Feather the mask's edge by this many pixels of the input image (into the repainted side; kept pixels stay kept).", rich_help_panel=IMAGE)] = None,
    outpaint: Annotated[str | None, typer.Option(help="Extend --init-image and paint the new border: 'left=16,top=8' (pixels of the input image) or '16' for every side.", rich_help_panel=IMAGE)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda[:i].")] = "auto",
    base: Annotated[Path, typer.Option(help="Base model file.")] = Path("data/models/base/model.safetensors"),
    sr: Annotated[Path, typer.Option(help="Super-resolution model file.")] = Path("data/models/sr/model.safetensors"),
    no_sr: Annotated[bool, typer.Option("--no-sr", help="Stop at the base model's resolution.")] = False,
    lora: Annotated[list[str] | None, typer.Option("--lora", metavar="FILE[:SCALE]", help="A LoRA adapter file and its weight (default 1; 0: off, negative: away from it). Repeatable: several at once, each with its weight; each adapts the base or SR model it was trained on (another model is refused).", rich_help_panel=ADAPTERS)] = None,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="Merge the adapters into the weights before sampling: faster per step, the same image up to rounding.", rich_help_panel=ADAPTERS)] = False,
    control: Annotated[list[str] | None, typer.Option("--control", metavar="SKETCH[:SCALE]", help="A sketch to follow (PNG, dark lines on a light ground, square) and its conditioning scale (default 1; 0: off). Repeatable: several at once, their effects added.", rich_help_panel=CONTROL)] = None,
    controlnet: Annotated[list[Path] | None, typer.Option("--controlnet", help="The trained control (ControlNet or adapter) file for the sketches: one for all or one per --control. Default: the params' control.default variant, data/control/NAME/control.safetensors.", rich_help_panel=CONTROL)] = None,
    control_start: Annotated[float, typer.Option(help="The controls act from this fraction of the way from noise to the image...", rich_help_panel=CONTROL)] = 0.0,
    control_end: Annotated[float, typer.Option(help="... to this one (diffusers' control_guidance_start/end).", rich_help_panel=CONTROL)] = 1.0,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Generate images for PROMPT with the trained cascade (base, then super-resolution)."""
    from tqdm.auto import tqdm

    from imager.inference import Cascade, check_sampling, encode_prompts, resolve_device
    from imager.inference.cascade import encode_negative
    from imager.inference.conditions import load_controls
    from imager.inference.config import with_overrides
    from imager.inference.dataset import read_prompts
    from imager.inference.images import to_hwc
    from imager.inference.metadata import file_sha256, image_params, save_png
    from imager.text import load_text_encoder

    p = load_params(params)
    if prompts is not None:
        _refuse_with_prompts(prompt=prompt, init_image=init_image, mask=mask, outpaint=outpaint, control=control, out=out, data_format=data_format)
    elif prompt is None:
        raise ConfigError("give a PROMPT (e.g. 'red apple') or --prompts FILE (a dataset from a prompt list)")
    elif out is None:
        raise ConfigError("--out: give the PNG to write, e.g. --out apple.png")
    if strength is None and init_image is not None:
        strength = 1.0 if mask is not None or outpaint is not None else IMG2IMG_STRENGTH
    given = {"sampler": sampler, "steps": steps, "guidance": guidance, "spacing": spacing, "eta": eta, "threshold": threshold,
             "percentile": percentile, "sr_steps": sr_steps, "sr_guidance": sr_guidance, "seed": seed,
             "strength": strength, "sr_strength": sr_strength, "resample": resample}  # fmt: skip
    sampling = with_overrides(p.evaluate.sampling(p.sampler), given, cli=True)
    for stage in ("base", "sr"):  # bad input fails before any model loads
        check_sampling(sampling.stage(stage))
    if prompts is not None:
        texts = read_prompts(prompts)
    elif not prompt.strip() and init_image is None:  # an edit of an image may go without text
        raise ConfigError("prompt 1 is empty; give a text such as 'red apple', or an --init-image to edit")
    elif out.suffix.lower() != ".png":
        raise ConfigError(f"--out: must be a .png file, got '{out}'")
    elif out.parent and not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")
    if negative is not None and negative.strip() and sampling.base.guidance == 1 and (no_sr or sampling.sr.guidance == 1):
        log.warning("--negative has no effect at guidance 1: the unconditional branch is not evaluated")
    edit = read_edit(init_image, mask, outpaint, mask_blur, strength=strength, sr_strength=sr_strength)
    if resample is not None and resample > 1 and (edit is None or edit.mask is None):
        log.warning("--resample has no effect without a mask to repaint (--mask or --outpaint)")
    if sr_strength is not None and no_sr:
        log.warning("--sr-strength has no effect with --no-sr")
    if edit is not None and mask is None and outpaint is None and sampling.strength == 1 and (no_sr or sampling.sr_strength == 1):
        log.warning("--init-image is not used at --strength 1 without a mask: the image is drawn from noise")
    adapters = read_lora(lora or [], no_sr=no_sr)
    sketches, control_files = read_control_options(control or [], controlnet, control_start, control_end, p.control.default)
    if merge_lora and not adapters:
        log.warning("--merge-lora has no effect without --lora")
    target = resolve_device(device, "--device")
    cascade = Cascade.load(base, None if no_sr else sr, device=target)
    record = apply_lora(cascade, adapters, merge=merge_lora)
    controls, control_record = load_controls(cascade.base.model, sketches, control_files, start=control_start, end=control_end, size=cascade.base.resolution)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours), and one line on an error
    encoder = load_text_encoder(p.embed)
    cascade.check_encoder(encoder)
    identity = {"base_sha256": file_sha256(base)} | ({} if no_sr else {"sr_sha256": file_sha256(sr)})
    if prompts is not None:
        make_dataset_of(texts, out, num, chunk, data_format, licence, cascade=cascade, encoder=encoder, sampling=sampling, negative=negative,
                        use_sr=not no_sr, identity=identity, adapters=record, shard_cfg=p.shard)  # fmt: skip
        return
    cond, truncated = encode_prompts(encoder, [prompt] * num, allow_empty=edit is not None)
    if truncated:
        log.warning("the prompt is longer than %d tokens and was cut", encoder.max_length)
    neg = encode_negative(encoder, [negative or ""])
    image_in = {} if edit is None else {"image": edit.image, "mask": edit.mask}  # batch 1: the same for every image
    with tqdm(total=num, desc=f"generate ({target.type})", unit="img") as bar:
        low, high = cascade.generate(cond, sampling, negative=neg, use_sr=not no_sr, on_batch=bar.update, control=controls, **image_in)
    images = to_hwc(high if high is not None else low).numpy()
    paths = [out] if num == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num)]
    mode = "text" if edit is None else "outpaint" if outpaint is not None else "inpaint" if mask is not None else "img2img"
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        start = i - i % sampling.batch_size  # the batch's noise is drawn from seed + its first index
        batch = {} if num - start == 1 or sampling.batch_size == 1 else {"batch_index": i - start, "batch_size": min(sampling.batch_size, num - start)}
        meta = image_params(
            prompt=prompt, negative_prompt=negative or "", seed=sampling.seed + start, sampling=sampling, use_sr=not no_sr, mode=mode,
            size=image.shape[0], identity=identity, mask=mode in ("inpaint", "outpaint"), mask_blur=mask_blur or 0.0, outpaint=outpaint,
            adapters=record, **batch, **({"controls": control_record} if control_record else {}),
        )  # fmt: skip
        save_png(path, image, meta)
    typer.echo("\n".join(str(p) for p in paths))


def _refuse_with_prompts(*, prompt, init_image, mask, outpaint, control, out, data_format) -> None:
    """One line for what a dataset from a prompt list cannot take."""
    if prompt is not None:
        raise ConfigError("give a PROMPT or --prompts FILE, not both")
    for name, given in (("--init-image", init_image), ("--mask", mask), ("--outpaint", outpaint), ("--control", control)):
        if given:
            raise ConfigError(f"{name}: not with --prompts (a dataset is made from text alone)")
    if out is None:
        raise ConfigError("--out: give the folder of the dataset, e.g. --out data/synthetic")
    if data_format not in ("folder", "webdataset"):
        raise ConfigError(f"--format: must be folder or webdataset, got '{data_format}'")


def make_dataset_of(texts: list[str], out: Path, per_prompt: int, chunk: int, data_format: str, licence: str, *, cascade, encoder, sampling,
                    negative: str | None, use_sr: bool, identity: dict, adapters, shard_cfg) -> None:  # fmt: skip
    """`imager generate --prompts`: the dataset's folder (and shards), resumed where it stopped."""
    from tqdm.auto import tqdm

    from imager.inference import encode_prompts
    from imager.inference.cascade import encode_negative
    from imager.inference.dataset import SETTINGS, make_dataset, prompts_sha256
    from imager.inference.images import to_hwc
    from imager.inference.metadata import image_params, png_bytes

    settings = {"prompts_sha256": prompts_sha256(texts), "per_prompt": per_prompt, "chunk": chunk, "negative_prompt": negative or "",
                "sampling": sampling.model_dump(mode="json"), "use_sr": use_sr, **identity, "adapters": adapters, "licence": licence}  # fmt: skip
    neg = encode_negative(encoder, [negative or ""])

    def make(c) -> list[tuple[bytes, dict]]:
        rows = [text for text in c.prompts for _ in range(per_prompt)]
        cond, truncated = encode_prompts(encoder, rows)
        if truncated:
            log.warning("%d prompts of prompts %d-%d are longer than %d tokens and were cut", truncated // per_prompt, c.first + 1, c.first + len(c.prompts), encoder.max_length)
        seeded = sampling.model_copy(update={"seed": sampling.seed + c.first_image})
        low, high = cascade.generate(cond, seeded, negative=neg, use_sr=use_sr)
        images = to_hwc(high if high is not None else low).numpy()
        made = []
        for i, image in enumerate(images):
            start = i - i % sampling.batch_size  # the batch's noise is drawn from seed + its first index
            batch = {"batch_index": i - start, "batch_size": min(sampling.batch_size, len(images) - start)}
            meta = image_params(prompt=rows[i], negative_prompt=negative or "", seed=seeded.seed + start, sampling=sampling, use_sr=use_sr,
                                mode="text", size=image.shape[0], identity=identity, adapters=adapters, **batch)  # fmt: skip
            extra = {"prompt_index": c.first + i // per_prompt, "image_index": i % per_prompt, "seed": seeded.seed + start, **batch}
            made.append((png_bytes(image, meta), extra))
        return made

    total = len(texts) * per_prompt
    with tqdm(total=total, desc="generate dataset", unit="img") as bar:
        report = make_dataset(out, texts, settings, per_prompt=per_prompt, chunk=chunk, licence=licence, make=make, on_image=bar.update)
    if data_format == "webdataset":
        from imager.data.shard import shard

        size = cascade.sr.resolution if use_sr and cascade.sr is not None else cascade.base.resolution
        cfg = shard_cfg.model_copy(update={"resolution": size, "val_fraction": 0.0, "distributor": "local"})
        shard(out, out / "shards", cfg)
    typer.echo(f"{report['images']} images of {report['prompts']} prompts in {out} ({report['made']} made now, "
               f"{report['already_there']} already there); settings in {out / SETTINGS}")  # fmt: skip


def read_control_options(texts: list[str], files: list[Path] | None, start: float, end: float, default: str) -> tuple[list[tuple[Path, float]], list[Path]]:
    """The ``--control`` sketches with their scales and the control files, each read and checked now
    (before any model loads): a one-line error naming the option for a bad spec, sketch or file."""
    from imager.inference.adapters import parse_spec
    from imager.inference.conditions import check_window, read_condition
    from imager.models.control import read_control

    check_window(start, end, "--control-start/--control-end")
    if not texts:
        if files or start != 0 or end != 1:
            log.warning("--controlnet, --control-start and --control-end have no effect without --control")
        return [], []
    specs = [parse_spec(text, "--control") for text in texts]
    for spec in specs:
        read_condition(spec.path, 8, "--control")
    files = list(files or [Path("data/control") / default / "control.safetensors"])
    for file in files:
        try:
            read_control(file)
        except CheckpointError as exc:
            raise CheckpointError(f"--controlnet: {exc}") from None
    return [(spec.path, spec.scale) for spec in specs], files


def read_lora(texts: list[str], *, no_sr: bool) -> list[AdapterSpec]:
    """The ``--lora`` specs, each file read and checked now (before any model loads): a one-line
    error naming ``--lora`` for a bad spec, a missing file or one that is not an adapter. An SR
    adapter with ``--no-sr`` has nothing to change: it is dropped with a warning."""
    from imager.inference.adapters import parse_spec
    from imager.models.lora import read_adapter

    specs = []
    for text in texts:
        spec = parse_spec(text)
        try:
            stage = read_adapter(spec.path).stage
        except CheckpointError as exc:
            raise CheckpointError(f"--lora: {exc}") from None
        if stage == "sr" and no_sr:
            log.warning("--lora %s adapts the super-resolution model, which --no-sr leaves out: not used", spec.path)
            continue
        specs.append(spec)
    return specs


def apply_lora(cascade, specs: list[AdapterSpec], *, merge: bool) -> list[dict] | None:
    """Load the adapters onto the cascade at their weights (merged into the weights with ``merge``);
    what the PNGs record of them, None without any (so such a PNG is what it was before adapters)."""
    if not specs:
        return None
    from imager.inference.adapters import adapter_record, use_adapters

    try:
        files = use_adapters(cascade, specs, merge=merge)
    except ImagerError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith("--lora") else f"--lora: {message}") from None
    return adapter_record(specs, files)


def read_edit(
    init_image: Path | None, mask: Path | None, outpaint: str | None, mask_blur: float | None, *, strength: float | None, sr_strength: float | None
) -> EditInput | None:
    """The prepared input image and mask, or None without --init-image; a ConfigError naming the
    option for bad input or an image option given without the image."""
    from imager.inference.edit import parse_outpaint, prepare

    if init_image is None:
        needs_image = {
            "--mask": mask is not None,
            "--outpaint": outpaint is not None,
            "--strength": strength is not None and strength < 1,
            "--sr-strength": sr_strength is not None,
            "--mask-blur": mask_blur is not None,
        }
        for name, given in needs_image.items():
            if given:
                raise ConfigError(f"{name}: needs --init-image (the image to edit); give one, or leave out {name}")
        return None
    if mask_blur is not None and mask_blur < 0:
        raise ConfigError(f"--mask-blur: must be >= 0 pixels, got {mask_blur}")
    if mask_blur and mask is None and outpaint is None:
        log.warning("--mask-blur has no effect without a mask (--mask or --outpaint)")
    if outpaint is not None and not outpaint.strip():  # the library reads blank as "none"; here it is a mistake
        raise ConfigError("--outpaint: is empty; give SIDE=PIXELS, e.g. left=16,top=8, or 16 for every side")
    pad = parse_outpaint(outpaint, "--outpaint")
    edit = prepare(init_image, mask, outpaint_pad=pad, mask_blur=mask_blur or 0.0, image_what="--init-image", mask_what="--mask")
    for note in edit.notes:
        log.warning("%s", note)
    return edit
