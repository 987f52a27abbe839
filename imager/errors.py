"""Typed errors. Each carries a one-line message that names the problem and, where possible, the fix.

Stages catch :class:`ImagerError`, print its message on one line and exit non-zero; anything else
is a bug and keeps its traceback.
"""


class ImagerError(Exception):
    """Base class for every error caused by user input (params, files, URLs, prompts)."""


class ConfigError(ImagerError):
    """params.yaml is missing, unreadable, or has a bad value or an unknown key."""


class DataError(ImagerError):
    """An input dataset, manifest or shard is missing or malformed."""


class SourceError(DataError):
    """A data source (folder, URL list, Hugging Face dataset) cannot be read."""


class EncoderError(ImagerError):
    """A text encoder cannot be loaded (missing local files, unknown model name, ...)."""


class CheckpointError(ImagerError):
    """A model checkpoint is missing, not a safetensors file, or does not match its stored config."""


class SamplerError(ImagerError):
    """An unknown sampler name, or an option the chosen sampler does not take."""
