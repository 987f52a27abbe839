"""The app's engine: a queue of generation jobs, one worker that samples them, and the state each
client reads (position, progress, ETA, live preview, results, errors).

One worker: on a small machine two samplings at once only share the same cores, and a queue with
a visible position is what a user can read. Clients never talk to the worker: the worker writes a
job's state and bumps its ``version``, clients read it (:meth:`Engine.wait` blocks until the next
version), so a slow client cannot hold up sampling or anyone else's preview.

Stop: :meth:`Engine.cancel` sets the job's flag; the next denoiser call sees it and raises, so
sampling stops within one call. Images finished before the stop are kept (each is a whole PNG,
written atomically); the one being sampled is dropped. A queued job is simply taken off the queue.

LoRA adapters: a request names files of the server's adapter folders (:mod:`imager.app.adapters`),
resolved and read when it is queued. Each adapter is loaded onto a cascade once and stays; before
each job the worker makes exactly that job's adapters active (and those an MLflow model was logged
with), so another job's adapters never change an image.

Sketch controls: a request's sketch is read and its control (:mod:`imager.app.controls`) resolved
when it is queued; the worker loads the control onto the model's base once (kept per file and base
model), reads the sketch at the base resolution and passes it to ``Cascade.generate``. Controls are
per call, so nothing of one job's control stays on the model.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imager.app.adapters import AdapterLibrary
from imager.app.controls import AvailableControl, ControlLibrary
from imager.app.history import Entry, History, NotFoundError
from imager.app.models import LoadedModel, ModelRegistry, weights_of
from imager.app.request import GenerateRequest, Limits, check_request, decode_upload, lora_specs, parse_request
from imager.errors import ConfigError, ImagerError

log = logging.getLogger("imager")
FINISHED = ("done", "cancelled", "failed")
KEEP_JOBS = 200  # finished jobs remembered for their clients


class StoppedError(Exception):
    """Raised inside sampling when a job is stopped."""


class QueueFullError(ConfigError):
    """The queue holds :attr:`Limits.queue` jobs already (HTTP 503)."""


@dataclass
class Job:
    id: str
    request: GenerateRequest
    created: float = field(default_factory=time.time)
    state: str = "queued"
    position: int = 0  # 1 = next; 0 once running or finished
    error: str | None = None
    stage: str = "queued"  # queued, loading, base, sr, saving, then the final state
    image: int = 0  # the image being made (0-based)
    step: int = 0  # denoiser calls done in this stage for this image
    steps: int = 0  # denoiser calls of this stage for this image
    done_calls: float = 0.0  # work done, in base-call units
    total_calls: float = 0.0
    started: float | None = None
    finished: float | None = None
    eta_s: float | None = None
    preview: bytes | None = None  # PNG of the latest x̂0
    preview_stage: str | None = None
    preview_count: int = 0
    results: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: int = 0
    edit: Any = None  # the prepared EditInput
    adapters: list[tuple[str, Any]] = field(default_factory=list)  # (its name in the listing, AdapterSpec of the resolved file)
    control: tuple[AvailableControl, bytes] | None = None  # the request's control and its sketch's bytes
    cancel_flag: threading.Event = field(default_factory=threading.Event)

    @property
    def finished_state(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    def describe(self) -> dict[str, Any]:
        """The job as JSON: what ``GET /api/v1/jobs/{id}`` returns."""
        fraction = 1.0 if self.state == "done" else (self.done_calls / self.total_calls if self.total_calls else 0.0)
        return {
            "id": self.id,
            "state": self.state,
            "position": self.position,
            "seed": self.request.seed,
            "num_images": self.request.num_images,
            "progress": {
                "stage": self.stage, "image": self.image, "step": self.step, "steps": self.steps,
                "fraction": round(min(fraction, 1.0), 4), "eta_s": None if self.eta_s is None else round(self.eta_s, 2),
                "elapsed_s": None if self.started is None else round((self.finished or time.time()) - self.started, 2),
            },
            "preview": f"/api/v1/jobs/{self.id}/preview.png" if self.preview is not None else None,
            "preview_count": self.preview_count,
            "images": [e.describe() for e in self.results],
            "notes": list(self.notes),
            "error": self.error,
            "version": self.version,
        }  # fmt: skip


class Engine:
    """The queue and its worker thread (started by :meth:`start`, or by the first :meth:`submit`).

    ``threads``: torch's CPU threads while the worker samples (None: torch's default), for a
    server that shares its cores with other work. ``adapters``: the LoRA adapter files requests
    may name; ``controls``: the sketch controls (none of either by default).
    """

    def __init__(
        self, models: ModelRegistry, history: History, limits: Limits | None = None, *, threads: int | None = None,
        adapters: AdapterLibrary | None = None, controls: ControlLibrary | None = None,
    ):
        self.models, self.history, self.limits, self.threads = models, history, limits or Limits(), threads
        self.adapters = adapters or AdapterLibrary()
        self.controls = controls or ControlLibrary()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.completed = 0

    # --- clients -------------------------------------------------------------------------------
    def submit(self, data: Any) -> Job:
        """Check a request and queue it; a ConfigError (one line naming the field) for a bad one,
        before anything is queued. A missing seed is drawn here, so the job reports it at once."""
        req = parse_request(data)
        check_request(req, self.limits)
        self.models.get(req.model)  # an unknown model fails now, not in the queue
        self._check_sampling(req)
        adapters = self._adapters(req)
        edit = self._prepare(req)
        notes: list[str] = [] if edit is None else list(edit.notes)
        control = self._control(req, notes)
        if req.seed is None:
            req = req.model_copy(update={"seed": secrets.randbelow(2**31)})
        job = Job(id=uuid.uuid4().hex[:12], request=req, edit=edit, adapters=adapters, control=control, notes=notes)
        with self._cond:
            if self._closed:
                raise ConfigError("the server is shutting down")
            if len(self._queue) >= self.limits.queue:
                raise QueueFullError(f"the queue is full ({self.limits.queue} requests waiting); try again later")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._renumber()
            self._forget_old()
            self._cond.notify_all()
        self.start()
        return job

    def job(self, id: str) -> Job:
        with self._cond:
            job = self._jobs.get(id)
        if job is None:
            raise NotFoundError(f"job: no job '{id}'")
        return job

    def cancel(self, id: str) -> Job:
        """Stop a job: off the queue if it waits, within one denoiser call if it runs."""
        job = self.job(id)
        with self._cond:
            if job.finished_state:
                return job
            job.cancel_flag.set()
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled")
                self._renumber()
        return job

    def wait(self, job: Job, version: int, timeout: float = 15.0) -> int:
        """Block until the job's version passes ``version`` (or ``timeout``); its version now."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while job.version <= version and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return job.version

    def wait_milestone(self, job: Job, last: dict[str, Any] | None, timeout: float) -> int:
        """Block until the job reaches a :func:`milestone` after the state ``last`` a client was
        sent (or ``timeout``): a client that spaces out its updates still gets these at once."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed and not milestone(job.describe(), last):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return job.version

    def available_adapters(self, model: str | None = None) -> dict[str, Any]:
        """The adapter files requests may name, each with whether it fits ``model`` (the default
        one for None): trained on its weights; None while that model is not loaded."""
        source = self.models.get(model)
        loaded = self.models.peek(source.id)
        known = loaded is not None and bool(loaded.weights)
        listed = []
        for a in self.adapters.list():
            fits = loaded.weights.get(a.stage) == a.base_sha256 if known else None
            listed.append(a.describe(fits))
        return {"model": source.id, "loaded": known, "adapters": listed}

    def available_controls(self, model: str | None = None) -> dict[str, Any]:
        """The control files requests may name, the default one marked, each with whether it fits
        ``model`` (the default one for None): built for its base model; None while it is not loaded."""
        source = self.models.get(model)
        loaded = self.models.peek(source.id)
        known = loaded is not None and bool(loaded.weights)
        listed = self.controls.list()
        default = self.controls.default_name(listed)
        base = loaded.cascade.base.model.config.model_dump() if known else None  # type: ignore[union-attr]
        shown = [c.describe(c.fits(base, loaded.weights.get("base")) if known else None, c.name == default) for c in listed]  # type: ignore[union-attr, arg-type]
        return {"model": source.id, "loaded": known, "default": default, "controls": shown}

    def status(self) -> dict[str, Any]:
        with self._cond:
            running = next((j.id for j in self._jobs.values() if j.state == "running"), None)
            return {"queued": len(self._queue), "running": running, "completed": self.completed, "loaded_models": self.models.loaded()}

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self, preload: bool = False) -> None:
        """Start the worker; ``preload``: it loads the default model first, so that the first
        request does not wait for it (a request queued meanwhile waits for the load)."""
        with self._cond:
            if self._worker is None or not self._worker.is_alive():
                self._closed = False
                self._worker = threading.Thread(target=self._run, args=(preload,), name="imager-engine", daemon=True)
                self._worker.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: queued jobs are cancelled and the running one is stopped."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._finish(self._queue.popleft(), "cancelled")
            for job in self._jobs.values():
                if job.state == "running":
                    job.cancel_flag.set()
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # --- the worker ----------------------------------------------------------------------------
    def _run(self, preload: bool = False) -> None:
        if self.threads is not None:  # torch's intra-op threads, for the whole process: the worker is its one user
            import torch

            torch.set_num_threads(self.threads)
        if preload:
            try:
                self._load(None)
            except Exception as exc:  # noqa: BLE001 - a request for it will say why; the server keeps serving the others
                log.error("the default model did not load: %s", exc)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                job.state, job.stage, job.position, job.started = "running", "loading", 0, time.time()
                self._renumber()
                self._bump(job)
            try:
                self._generate(job)
            except StoppedError:
                self._finish(job, "cancelled")
            except ImagerError as exc:
                self._finish(job, "failed", str(exc))
            except Exception as exc:  # noqa: BLE001 - the worker must survive any job; the user sees the reason
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", f"internal error: {type(exc).__name__}: {exc}")
            else:
                self._finish(job, "done")

    def _generate(self, job: Job) -> None:
        import torch

        from imager.inference.cascade import encode_negative, encode_prompts
        from imager.inference.images import to_hwc

        req = job.request
        model = self._load(req.model)
        record = self._use_adapters(model, job.adapters)
        controls, control_record = self._use_control(model, job)
        sampling = self._sampling(req, model)
        use_sr = req.use_sr and model.cascade.sr is not None
        edit = job.edit
        cond, truncated = encode_prompts(model.encoder, [req.prompt], allow_empty=edit is not None or bool(controls))
        if truncated:
            self._note(job, f"the prompt is longer than {model.encoder.max_length} tokens and was cut")
        negative = encode_negative(model.encoder, [req.negative_prompt])
        plan = self._plan(model, sampling, use_sr, edit)
        weights = {"base": 1.0, "sr": (model.cascade.resolution / model.cascade.base.resolution) ** 2 if use_sr else 0.0}
        rates: dict[str, float] = {}  # measured seconds per denoiser call of each stage
        with self._cond:
            job.total_calls = req.num_images * sum(plan[s] * weights[s] for s in plan)
        image_in = {} if edit is None else {"image": edit.image, "mask": edit.mask}
        for i in range(req.num_images):
            seed = req.seed + i  # type: ignore[operator]
            clock = {"stage": None, "t": time.perf_counter()}

            def on_denoise(stage: str, x0: torch.Tensor, i: int = i, clock: dict = clock) -> None:
                if job.cancel_flag.is_set():
                    raise StoppedError
                now = time.perf_counter()
                if clock["stage"] == stage:  # the time since the last call of the same stage
                    rates[stage] = 0.7 * rates.get(stage, now - clock["t"]) + 0.3 * (now - clock["t"])
                clock["stage"], clock["t"] = stage, now
                with self._cond:
                    if job.stage != stage:
                        job.stage, job.step, job.steps = stage, 0, plan[stage]
                    job.image, job.step = i, job.step + 1
                    job.done_calls += weights[stage]
                    job.eta_s = self._eta(job, stage, rates, weights, plan, use_sr)
                    if job.step % req.preview_every == 0 or job.step == job.steps:
                        job.preview = _png(to_hwc(x0[:1].float().clamp(-1, 1).cpu()).numpy()[0])
                        job.preview_stage, job.preview_count = stage, job.preview_count + 1
                    self._bump(job)

            one = sampling.model_copy(update={"seed": seed, "batch_size": 1})
            with torch.no_grad():
                low, high = model.cascade.generate(cond, one, negative=negative, use_sr=use_sr, on_denoise=on_denoise, control=controls, **image_in)
            if job.cancel_flag.is_set():
                raise StoppedError
            pixels = to_hwc(high if high is not None else low).numpy()[0]
            with self._cond:
                job.stage = "saving"
                self._bump(job)
            params = self._params(req, seed, sampling, model, use_sr, pixels.shape[0], record, control_record)
            entry = self.history.save(pixels, params, job=job.id, index=i)
            with self._cond:
                job.results.append(entry)
                job.done_calls = (i + 1) * job.total_calls / req.num_images
                self._bump(job)

    # --- helpers -------------------------------------------------------------------------------
    def _load(self, id: str | None) -> LoadedModel:
        """The model, with the digests of its networks' weights: computed here, in the worker, the
        one thread that changes its adapters, before any job's adapter is applied."""
        model = self.models.load(id)
        if not model.weights:
            model.weights = weights_of(model.cascade)
        return model

    def _adapters(self, req: GenerateRequest) -> list[tuple[str, Any]]:
        """The request's adapters: each name resolved inside the adapter folders and its file read
        (a ConfigError naming ``lora`` otherwise); with its model loaded, each checked to fit it,
        so that a foreign adapter fails before the queue, not in it."""
        from imager.inference.adapters import AdapterSpec

        loaded = self.models.peek(req.model) if req.lora else None
        out = []
        for spec in lora_specs(req):
            name, path = self.adapters.resolve(str(spec.path))
            adapter = self.adapters.describe(name, path)
            if loaded is not None and loaded.weights:
                check_fits(name, adapter, loaded)
            out.append((name, AdapterSpec(path, spec.scale)))
        return out

    @staticmethod
    def _use_adapters(model: LoadedModel, adapters: list[tuple[str, Any]]) -> list[dict[str, Any]] | None:
        """Make exactly the job's adapters (and the model's logged ones) active on its cascade;
        what its PNGs record of the job's, None without any."""
        from imager.inference.adapters import adapter_record, use_adapters

        specs = [spec for _, spec in adapters]
        try:
            files = use_adapters(model.cascade, [*model.adapters, *specs])
        except ImagerError as exc:
            raise ConfigError(f"lora: {str(exc).removeprefix('--lora: ')}") from None
        record = adapter_record(specs, files[len(model.adapters) :])
        return [r | {"file": name} for r, (name, _) in zip(record, adapters, strict=True)] or None

    def _control(self, req: GenerateRequest, notes: list[str]) -> tuple[AvailableControl, bytes] | None:
        """The request's control resolved inside the control folders and its sketch read (a
        ConfigError naming ``controlnet`` or ``control`` otherwise); with its model loaded, the
        control checked to fit it, so that a foreign control fails before the queue, not in it."""
        if req.control is None:
            return None
        from imager.inference.conditions import read_condition

        control = self.controls.resolve(req.controlnet)
        loaded = self.models.peek(req.model)
        if loaded is not None and loaded.weights:
            check_control_fits(control, loaded)
        sketch = decode_upload(req.control, "control", self.limits)
        read_condition(sketch, 8, "control", notes)  # the size does not matter: the worker reads it at the model's
        return control, sketch

    def _use_control(self, model: LoadedModel, job: Job) -> tuple[list[Any], list[dict[str, Any]] | None]:
        """The job's control on the model's base (:class:`~imager.models.control.ControlInput`) and
        what its PNGs record of it, as ``imager generate --control`` records it; none without one."""
        if job.control is None:
            return [], None
        from imager.inference.conditions import read_condition
        from imager.models.control import ControlInput

        control, sketch = job.control
        req = job.request
        net, sha256 = self.controls.load(control, model.cascade.base.model)
        condition = read_condition(sketch, model.cascade.base.resolution, "control")
        window = {"scale": req.control_scale, "start": req.control_start, "end": req.control_end}
        record = {"control": control.name, "control_sha256": sha256, "arch": control.arch, **window}
        return [ControlInput(net, condition, req.control_scale, req.control_start, req.control_end)], [record]

    def _prepare(self, req: GenerateRequest):
        """The request's image and mask read and checked (edit.prepare: decompression bombs, sizes,
        modes), or None for text to image."""
        if req.image is None:
            return None
        from imager.inference.edit import parse_outpaint, prepare

        image = decode_upload(req.image, "image", self.limits)
        mask = None if req.mask is None else decode_upload(req.mask, "mask", self.limits)
        mode = req.resolved_mode()
        pad = parse_outpaint(req.outpaint, "outpaint") if mode == "outpaint" else None
        if mode in ("img2img", "sketch"):
            mask = None
        return prepare(image, mask, outpaint_pad=pad, mask_blur=req.mask_blur, image_what="image", mask_what="mask")

    def _check_sampling(self, req: GenerateRequest) -> None:
        """The request's sampling fields checked before queueing (on any model's defaults: the
        checks do not depend on them)."""
        from imager.inference import CascadeSampling, check_sampling
        from imager.inference.config import with_overrides

        try:
            sampling = with_overrides(CascadeSampling(sampler="ddim"), self._overrides(req))
            for stage in ("base", "sr"):
                check_sampling(sampling.stage(stage))
        except ImagerError as exc:
            raise ConfigError(str(exc).removeprefix("params: ")) from None

    @staticmethod
    def _overrides(req: GenerateRequest) -> dict[str, Any]:
        given = {
            "sampler": req.sampler, "steps": req.steps, "guidance": req.guidance, "sr_steps": req.sr_steps, "sr_guidance": req.sr_guidance,
            "threshold": req.threshold, "strength": req.resolved_strength() if req.image is not None else None,
            "sr_strength": req.sr_strength if req.image is not None else None, "resample": req.resample,
        }  # fmt: skip
        return {k: v for k, v in given.items() if v is not None}

    def _sampling(self, req: GenerateRequest, model: LoadedModel):
        from imager.inference import check_sampling
        from imager.inference.config import with_overrides

        try:
            sampling = with_overrides(model.sampling, self._overrides(req))
            for stage in ("base", "sr"):
                check_sampling(sampling.stage(stage))
        except ImagerError as exc:
            raise ConfigError(str(exc).removeprefix("params: ")) from None
        return sampling

    @staticmethod
    def _plan(model: LoadedModel, sampling, use_sr: bool, edit) -> dict[str, int]:
        """Denoiser calls of each stage for one image."""
        from imager.inference.sampling import denoiser_calls

        masked = edit is not None and edit.mask is not None
        if masked and not bool(edit.mask.any()):
            return {"base": 0, "sr": 0}
        plan = {"base": denoiser_calls(model.cascade.base, sampling.stage("base"), strength=sampling.strength, resample=sampling.resample, masked=masked)}
        sr_strength = sampling.sr_strength if edit is not None else 1.0
        plan["sr"] = denoiser_calls(model.cascade.sr, sampling.stage("sr"), strength=sr_strength, resample=sampling.sr_resample, masked=masked) if use_sr else 0
        return plan

    @staticmethod
    def _eta(job: Job, stage: str, rates: dict[str, float], weights: dict[str, float], plan: dict[str, int], use_sr: bool) -> float | None:
        """Seconds left: each stage's remaining calls at its measured rate (a stage not yet
        measured: the base rate scaled by its pixels)."""
        if "base" not in rates and stage == "base":
            return None
        base_rate = rates.get("base")
        rate = {s: rates.get(s, (base_rate or rates.get("sr", 0.0)) * weights[s]) for s in plan}
        n = job.request.num_images
        left_this = (plan[stage] - job.step) * rate[stage]
        if stage == "base":
            left_this += plan["sr"] * rate["sr"] if use_sr else 0.0
        later = (n - job.image - 1) * sum(plan[s] * rate[s] for s in plan)
        return max(left_this + later, 0.0)

    @staticmethod
    def _params(
        req: GenerateRequest, seed: int, sampling, model: LoadedModel, use_sr: bool, size: int, adapters: list | None = None, controls: list | None = None
    ) -> dict[str, Any]:
        """What the PNG records: the request as it was sampled (the model's defaults filled in)."""
        from imager.inference.metadata import image_params

        return image_params(
            prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed, sampling=sampling, use_sr=use_sr, mode=req.resolved_mode(),
            size=size, identity=model.identity, mask=req.mask is not None or bool(req.outpaint), mask_blur=req.mask_blur, outpaint=req.outpaint,
            adapters=adapters, controls=controls, model=model.source.id, model_label=model.source.label,
        )  # fmt: skip

    def _note(self, job: Job, note: str) -> None:
        with self._cond:
            job.notes.append(note)
            self._bump(job)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        with self._cond:
            job.state, job.stage, job.error, job.position = state, state, error, 0
            job.finished, job.eta_s = time.time(), None
            if state == "done":
                self.completed += 1
            job.edit = job.control = None  # the tensors and the sketch are not needed any more
            self._bump(job)

    def _bump(self, job: Job) -> None:
        """A change clients should see (call with the lock held)."""
        job.version += 1
        self._cond.notify_all()

    def _renumber(self) -> None:
        for i, queued in enumerate(self._queue):
            if queued.position != i + 1:
                queued.position = i + 1
                self._bump(queued)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.finished_state]
        for key in finished[: max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[key]


def check_fits(name: str, adapter: Any, model: LoadedModel) -> None:
    """A ConfigError naming the adapter unless it was trained on ``model``'s weights of its stage."""
    have = model.weights.get(adapter.stage)
    stage = "super-resolution" if adapter.stage == "sr" else "base"
    if have is None:
        raise ConfigError(f"lora: {name}: adapts the {stage} model, and the model '{model.source.id}' has none")
    if have != adapter.base_sha256:
        raise ConfigError(
            f"lora: {name}: trained on another {stage} model (weights {adapter.base_sha256[:12]}, the model '{model.source.id}' has "
            f"{have[:12]}); GET /api/v1/adapters says which adapters fit"
        )


def check_control_fits(control: AvailableControl, model: LoadedModel) -> None:
    """A ConfigError naming the control unless it was built for ``model``'s base model."""
    if not control.fits(model.cascade.base.model.config.model_dump(), model.weights.get("base")):
        raise ConfigError(
            f"controlnet: {control.name}: trained on another base model (weights {control.base_sha256[:12] or 'unknown'}, the model "
            f"'{model.source.id}' has {model.weights.get('base', '')[:12]}); GET /api/v1/controls says which controls fit"
        )


def milestone(state: dict[str, Any], last: dict[str, Any] | None) -> bool:
    """An event a client should get at once: the first one, a new state or stage, the first preview."""
    if last is None or state["state"] != last["state"] or state["state"] in FINISHED:
        return True
    return state["progress"]["stage"] != last["progress"]["stage"] or (state["preview_count"] > 0 and last["preview_count"] == 0)


def _png(pixels: np.ndarray) -> bytes:
    from imager.inference.metadata import png_bytes

    return png_bytes(pixels)
