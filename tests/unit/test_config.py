"""Every validation message path of imager.config: one line naming the key, the problem, the value."""

from __future__ import annotations

import pytest

from imager import config
from imager.errors import ConfigError


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def _keys(tree, prefix=""):
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
    return out


def test_the_shipped_params_file_is_valid_and_lists_every_key():
    import yaml

    from tests.conftest import REPO

    params = config.load(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    resolved = params.model_dump()
    # The model's text dimensions come from the embedding cache, so params.yaml leaves them out.
    derived = {f"{s}.model.{k}" for s in ("train_base", "train_sr") for k in ("text_dim", "pooled_dim", "context_length", "super_resolution", "in_channels", "out_channels", "lowres_upsample", "norm_groups")}
    # Keys that only one schedule uses (beta_start, cosine_s, ...) are documented in a comment instead.
    schedule_specific = {k for k in _keys(resolved) if ".schedule." in k and k.rsplit(".", 1)[1] not in ("name", "timesteps", "zero_terminal_snr")}
    assert _keys(resolved) - derived - schedule_specific <= _keys(raw)
    data_sections = ("download", "shard", "embed", "tracking")
    assert {k: v for k, v in resolved.items() if k in data_sections} == {k: v for k, v in config.parse({}).model_dump().items() if k in data_sections}


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"shard": {"resolution": 30}}, "params.yaml: shard.resolution: must be a positive multiple of 8, got 30"),
        ({"shard": {"resolution": -8}}, "params.yaml: shard.resolution: must be a positive multiple of 8, got -8"),
        ({"shard": {"resolutoin": 64}}, "params.yaml: shard.resolutoin: unknown key"),
        ({"shards": {}}, "params.yaml: shards: unknown key"),
        ({"download": {"urls": {"wokers": 2}}}, "params.yaml: download.urls.wokers: unknown key"),
        ({"sampler": "dpm"}, "params.yaml: sampler: must be one of 'ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', 'euler', 'euler_ancestral' or 'heun', got 'dpm'"),
        ({"download": {"source": "s3"}}, "params.yaml: download.source: must be one of 'openmoji', 'folder', 'urls' or 'hf', got 's3'"),
        ({"download": {"limit": 0}}, "params.yaml: download.limit: must be > 0, got 0"),
        ({"shard": {"val_fraction": 1.0}}, "params.yaml: shard.val_fraction: must be < 1, got 1.0"),
        ({"shard": {"val_fraction": -0.1}}, "params.yaml: shard.val_fraction: must be >= 0, got -0.1"),
        ({"embed": {"max_length": 1}}, "params.yaml: embed.max_length: must be >= 2, got 1"),
        ({"download": {"urls": {"workers": 1000}}}, "params.yaml: download.urls.workers: must be <= 256, got 1000"),
        ({"shard": {"samples_per_shard": "many"}}, "params.yaml: shard.samples_per_shard: must be an integer, got 'many'"),
        ({"shard": {"samples_per_shard": 2.5}}, "params.yaml: shard.samples_per_shard: must be an integer, got 2.5"),
        ({"shard": {"max_aspect": "wide"}}, "params.yaml: shard.max_aspect: must be a number, got 'wide'"),
        ({"tracking": {"enabled": "maybe"}}, "params.yaml: tracking.enabled: must be true or false, got 'maybe'"),
        ({"tracking": {"experiment": ""}}, "params.yaml: tracking.experiment: must not be empty, got ''"),
        ({"download": {"folder": {"path": 3}}}, "params.yaml: download.folder.path: must be a string, got 3"),
        ({"download": 3}, "params.yaml: download: must be a mapping of keys to values"),
        ({"download": {"source": "folder"}}, "params.yaml: download.folder.path: required when download.source is 'folder'"),
        ({"download": {"source": "urls"}}, "params.yaml: download.urls.list: required when download.source is 'urls'"),
        ({"download": {"source": "hf"}}, "params.yaml: download.hf.name: required when download.source is 'hf'"),
        ({"shard": {"min_side": 100, "max_side": 10}}, "params.yaml: shard.min_side: must not exceed max_side (10), got 100"),
        ({"embed": {"encoder": "bert"}}, "params.yaml: embed.encoder: must be one of 'minilm', 'clip', 't5' or 'transformers', got 'bert'"),
        ({"shard": {"odd_modes": "keep"}}, "params.yaml: shard.odd_modes: must be one of 'skip' or 'convert', got 'keep'"),
        ([1, 2], "params.yaml: must be a mapping of sections, got list"),
    ],
)
def test_bad_values_name_key_problem_and_value(data, expected):
    assert error_of(data) == expected


def test_several_errors_report_the_first_and_a_count():
    message = error_of({"shard": {"resolution": 30, "val_fraction": 2}})
    assert message.startswith("params.yaml: shard.resolution: must be a positive multiple of 8, got 30")
    assert message.endswith("(and 1 more)")


def test_empty_file_means_all_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("", encoding="utf-8")
    assert config.load(path) == config.Params()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: params file not found$"):
        config.load(tmp_path / "params.yaml")


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("shard:\n  resolution: [64\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith("params.yaml: invalid YAML at line 3")


def test_sections_are_frozen():
    from pydantic import ValidationError

    params = config.parse({})
    with pytest.raises(ValidationError, match="frozen"):
        params.shard.resolution = 32  # type: ignore[misc]


def test_each_section_is_defined_by_the_package_that_owns_it():
    from imager.data import config as data_config
    from imager.text import config as text_config

    owned = {
        data_config: ("Download", "Shard", "OpenMojiSource", "FolderSource", "UrlsSource", "HfSource"),
        text_config: ("Embed", "MiniLMEncoder", "ClipEncoder", "T5Encoder"),
    }
    for module, names in owned.items():
        assert all(getattr(module, name).__module__ == module.__name__ for name in names)
    fields = config.Params.model_fields
    assert fields["download"].annotation is data_config.Download and fields["shard"].annotation is data_config.Shard
    assert fields["embed"].annotation is text_config.Embed
    assert config.Params().embed.prompts == text_config.DEFAULT_PROMPTS
    # imager.config gathers the sections: it re-exports none of their parts.
    parts = ("OpenMojiSource", "FolderSource", "UrlsSource", "HfSource", "MiniLMEncoder", "ClipEncoder", "T5Encoder", "DEFAULT_PROMPTS")
    assert [name for name in parts if hasattr(config, name)] == []
