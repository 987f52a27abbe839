"""Image-generation metrics: features in, number out.

Every image tensor here is float (N, 3, H, W) in [-1, 1]; every embedding is (N, D) float.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the features of a
  real and a generated set, ``||μ_r - μ_g||² + Tr(Σ_r + Σ_g - 2 (Σ_r Σ_g)^½)``, computed by
  torchmetrics' ``FrechetInceptionDistance`` over any feature extractor (an ``nn.Module`` with an
  int ``num_features``: the in-domain evaluator, or :class:`InceptionFeatures` for the standard FID).
- R-precision (Xu et al. 2018, AttnGAN): rank an image's own caption against k-1 random others.
- CLIP score (Hessel et al. 2021): ``100 · mean(max(cos(image, text), 0))``.

The standard backbones are read from local files only; nothing here touches the network.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imager.errors import ConfigError
from imager.inference.images import to_uint8

INCEPTION_KEY = "evaluate.backbones.inception"
CLIP_KEY = "evaluate.backbones.clip"
INCEPTION_HINT = (
    "the Inception weights are never downloaded; get weights-inception-2015-12-05-6726825d.pth from "
    "torch-fidelity's v0.2.0 release, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth: same tensors"
)


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


# ---------------------------------------------------------------------------------------------- FID


class FID:
    """FID of several generated sets against one real set, through torchmetrics.

    The real statistics are accumulated once (``add_real``, callable several times) and kept;
    each :meth:`score` resets only the generated statistics, so a sampler sweep scores many sets
    against the same reference. Inputs are fed to ``extractor`` in batches of ``batch_size`` under
    ``torch.inference_mode``, on the extractor's device; torchmetrics passes them through unchanged
    (a custom extractor sees exactly what is given here) and accumulates the sums in float64.

    The extractor is put in eval mode. The score is returned as it comes: for two (near-)identical
    sets rounding in the matrix square root can make it a tiny negative number (|FID| ~ 1e-6 of the
    feature scale), which callers may read as 0.
    """

    def __init__(self, extractor: nn.Module, *, batch_size: int = 64):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not isinstance(getattr(extractor, "num_features", None), int):
            raise TypeError("FID: the extractor needs an int attribute num_features (its output width)")
        if batch_size < 1:
            raise ValueError(f"FID: batch_size must be >= 1, got {batch_size}")
        self.extractor, self.batch_size = extractor.eval(), batch_size
        self.device = _device(extractor)
        self._metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(self.device)

    @property
    def real_count(self) -> int:
        return int(self._metric.real_features_num_samples)

    def add_real(self, images: Tensor) -> None:
        """Accumulate reference images (N, 3, H, W) in [-1, 1] (or features, for an identity extractor)."""
        self._update(images, real=True)

    def score(self, fake_images: Tensor) -> float:
        """FID of ``fake_images`` against every real image added so far."""
        self._metric.reset()  # the generated statistics only (reset_real_features=False)
        self._update(fake_images, real=False)
        fake_count = int(self._metric.fake_features_num_samples)
        if self.real_count < 2 or fake_count < 2:
            raise ValueError(f"FID needs at least 2 real and 2 generated samples, got {self.real_count} and {fake_count}")
        return float(self._metric.compute())

    def _update(self, images: Tensor, *, real: bool) -> None:
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                self._metric.update(images[start : start + self.batch_size].to(self.device), real=real)


# --------------------------------------------------------------------------- image-text agreement


def r_precision(image_emb: Tensor, pool_emb: Tensor, targets: Tensor, k: int, generator: torch.Generator | None = None) -> float:
    """Share of images whose own caption ranks first among k candidates (itself + k-1 random others).

    image_emb (N, D), pool_emb (M, D): embeddings of the images and of M distinct captions
    (normalised here). targets (N,) long: the pool row of each image's caption. For each image,
    k-1 distinct negatives are drawn uniformly from the pool without its target (``generator``,
    on CPU, makes the draw reproducible) and the k candidates are ranked by cosine similarity; a
    tie with a negative counts as a miss. Chance level is 1/k.
    """
    n, m = image_emb.shape[0], pool_emb.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"r_precision: k must be in 1..{m} (the pool size), got {k}")
    if targets.shape != (n,) or image_emb.shape[1] != pool_emb.shape[1]:
        raise ValueError(
            f"r_precision: expected image_emb (N, D), pool_emb (M, D), targets (N,); got {tuple(image_emb.shape)}, "
            f"{tuple(pool_emb.shape)}, {tuple(targets.shape)}"
        )
    targets = targets.long().cpu()
    if n and (targets.min() < 0 or targets.max() >= m):
        raise ValueError(f"r_precision: targets must index the pool (0..{m - 1})")
    image = F.normalize(image_emb.double().cpu(), dim=-1)
    pool = F.normalize(pool_emb.double().cpu(), dim=-1)
    # k-1 distinct negatives: a uniform random subset of the M-1 other rows (the top k-1 of random
    # keys), indices at or above the target shifted by one to skip it.
    keys = torch.rand(n, m - 1, generator=generator)  # (N, M-1)
    negatives = keys.topk(k - 1, dim=1).indices  # (N, k-1)
    negatives = negatives + (negatives >= targets[:, None]).long()
    candidates = torch.cat([targets[:, None], negatives], dim=1)  # (N, k), own caption first
    sims = (image @ pool.T).gather(1, candidates)  # (N, k) cosines
    if k == 1:
        return 1.0
    hits = sims[:, 0] > sims[:, 1:].max(dim=1).values
    return float(hits.double().mean()) if n else float("nan")


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """CLIPScore (Hessel et al. 2021, with w = 100): 100 · mean_i max(cos(image_i, text_i), 0)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"clip_score: expected two (N, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)  # (N,)
    return float(100 * cos.clamp(min=0).mean())


# ------------------------------------------------------------------------------ standard backbones


class InceptionFeatures(nn.Module):
    """The standard FID network: torch-fidelity's InceptionV3 ("inception-v3-compat", the TF FID
    graph, with its TF1-compatible bilinear resize to 299 px), 2048-d pool features.

    ``path`` is the weights file; it is read with ``torch.load(weights_only=True)`` (no pickled
    code) and handed to torch-fidelity as an in-memory copy, so torch-fidelity neither unpickles
    the file itself nor downloads anything (it downloads only when given no weights path).
    Raises :class:`ConfigError` naming ``evaluate.backbones.inception`` when the file is missing
    or is not these weights, or torch-fidelity is not installed.
    """

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ConfigError(f"{INCEPTION_KEY}: torch-fidelity is not installed (pip install torch-fidelity)") from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{INCEPTION_KEY}: no such file {path} ({INCEPTION_HINT})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (pickle, zip and unpickler errors of many types)
            reason = "it pickles more than tensors" if "Weights only load failed" in str(exc) else _first_line(exc)
            raise ConfigError(f"{INCEPTION_KEY}: cannot read {path} as PyTorch weights ({reason})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConfigError(f"{INCEPTION_KEY}: {path} is not a state dict of tensors ({INCEPTION_HINT})")
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)  # plain tensors we wrote ourselves: safe for torch-fidelity's torch.load
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
        except RuntimeError as exc:  # load_state_dict: "Error(s) in loading ...:" then the mismatches
            detail = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [_first_line(exc)]
            raise ConfigError(
                f"{INCEPTION_KEY}: {path} does not hold the FID InceptionV3 weights ({detail[0][:160]}); {INCEPTION_HINT}"
            ) from None

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen: BatchNorm always uses its running statistics

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 2048) float32. Quantised to uint8 first, as torch-fidelity expects."""
        (features,) = self.net(to_uint8(images))
        return features


class HFClip:
    """A pretrained CLIP from a local Hugging Face folder (CLIPModel + CLIPProcessor files), for CLIP
    score and R-precision. Embeddings are L2-normalised float32 on CPU.

    Raises :class:`ConfigError` naming ``evaluate.backbones.clip`` when the folder is missing or
    does not hold a loadable CLIP model and processor. Nothing is downloaded (``local_files_only``).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{CLIP_KEY}: no such folder {path} (a local Hugging Face CLIP folder; CLIP is never downloaded)")
        try:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 (OSError, ValueError, safetensors and tokenizer errors)
            raise ConfigError(f"{CLIP_KEY}: cannot load a CLIP model and processor from {path} ({_first_line(exc)})") from None
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_images(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D). Quantised to uint8 and preprocessed by the folder's
        image processor (resize, centre crop, CLIP mean/std), as CLIP sees a saved image."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = list(to_uint8(images[start : start + self.batch_size]).cpu())  # CHW uint8 each
            pixels = self.processor.image_processor(images=batch, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """N captions -> (N, D); captions longer than the model's context are truncated."""
        texts, out = list(texts), []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            out.append(_pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)


def _pooled(output) -> Tensor:
    """The projected embedding: a tensor (transformers 4) or ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output
