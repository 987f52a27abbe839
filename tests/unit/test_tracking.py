"""imager.tracking's helpers: metric names MLflow accepts, run names that show the DVC experiment,
and dataset digests that are the DVC hashes of dvc.lock when those describe the data on disk."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from imager.tracking import dataset_digest, metric_name, run_name


@pytest.mark.parametrize(
    "name, valid",
    [
        ("skipped_by_reason.odd_mode_i16", "skipped_by_reason.odd_mode_i16"),
        ("odd_mode:I;16", "odd_mode:I_16"),
        ("sweep_seconds.ddpm (reference).100", "sweep_seconds.ddpm _reference_.100"),
        ("a/b-c d.e", "a/b-c d.e"),
    ],
)
def test_metric_names_keep_what_mlflow_accepts_and_replace_the_rest(name, valid):
    assert metric_name(name) == valid


def test_run_names_show_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_name("evaluate") == "evaluate"
    monkeypatch.setenv("DVC_EXP_NAME", "bumpy-veep")
    assert run_name("evaluate") == "evaluate · bumpy-veep"


def write_lock(root, path: str, md5: str, size: int, nfiles: int) -> None:
    lock = {"schema": "2.0", "stages": {"shard": {"cmd": "x", "outs": [{"path": path, "hash": "md5", "md5": md5, "size": size, "nfiles": nfiles}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_dataset_digest_is_the_dvc_hash_while_it_describes_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    (shards / "a.tar").write_bytes(b"x" * 10)
    (shards / "index.json").write_text("{}")
    dvc_md5 = "4546fbcdc63a81d844137534daf1d9c2.dir"
    write_lock(tmp_path, "data/shards", dvc_md5, 12, 2)
    assert dataset_digest(shards) == dvc_md5 and len(dvc_md5) <= 36  # MLflow's limit for a dataset digest

    (shards / "a.tar").write_bytes(b"y" * 11)  # changed since dvc.lock was written: its hash no longer applies
    own = dataset_digest(shards)
    assert own.startswith("sha256-") and len(own) <= 36
    expected = hashlib.sha256(b"a.tar\0" + b"y" * 11 + b"index.json\0" + b"{}").hexdigest()[:28]
    assert own == f"sha256-{expected}"
    (shards / "a.tar").write_bytes(b"z" * 11)
    assert dataset_digest(shards) != own  # the content decides it


def test_dataset_digest_without_a_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    cache = tmp_path / "emb"
    cache.mkdir()
    (cache / "meta.json").write_text("{}")
    assert dataset_digest(cache).startswith("sha256-")
