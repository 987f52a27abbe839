"""imager.training.init: where a fine-tune starts, from a file, a folder or an MLflow URI, and the
one-line errors of a model that does not fit."""

from __future__ import annotations

import mlflow
import pytest
import torch

from imager.errors import CheckpointError
from imager.inference.metadata import file_sha256
from imager.models import UNet, save_model
from imager.serving import log_cascade
from imager.training.init import load_into, resolve
from tests.app.conftest import SAMPLING, write_models
from tests.unit.test_unet import randomized, tiny


def test_a_file_or_its_folder(tmp_path):
    base, _ = write_models(tmp_path / "m")
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(base.read_bytes())
    for source in (str(base), str(folder)):
        init = resolve(source, "base")
        assert init.sha256 == file_sha256(base) and init.record() == {"source": source, "sha256": init.sha256}
    with pytest.raises(CheckpointError, match="init_from: .*: model file not found"):
        resolve(str(tmp_path / "nothing"), "base")


def test_mlflow_run_artifacts_and_logged_cascades(tmp_path, mlflow_uri):
    base, sr = write_models(tmp_path / "m")
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.create_experiment(f"init-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(base), "model")
        info = log_cascade(base, sr, embed={"encoder": "minilm", "max_length": 6}, sampling=SAMPLING, workdir=tmp_path / "work")
    assert resolve(f"runs:/{run.info.run_id}/model/{base.name}", "base").sha256 == file_sha256(base)
    assert resolve(info.model_uri, "base").sha256 == file_sha256(base)  # a logged cascade: the stage's own file
    assert resolve(info.model_uri, "sr").sha256 == file_sha256(sr)
    with pytest.raises(CheckpointError, match="init_from: runs:/0+/x: cannot download from MLflow"):
        resolve("runs:/" + "0" * 32 + "/x", "base")


def test_the_weights_are_copied_and_a_model_of_another_shape_is_refused(tmp_path):
    torch.manual_seed(0)
    source = randomized(UNet(tiny()), 1)
    save_model(source, tmp_path / "a.safetensors")
    init = resolve(str(tmp_path / "a.safetensors"), "base")
    target = UNet(tiny(dropout=0.1))  # dropout changes no weight: allowed
    load_into(target, init)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    for other, message in ((tiny(base_channels=32, norm_groups=8), "base_channels is 16 there, 32 here"),
                           (tiny(attention_levels=(0, 1)), r"attention_levels is \[1\] there, \[0, 1\] here")):
        with pytest.raises(CheckpointError, match=message) as err:
            load_into(UNet(other), init)
        assert "\n" not in str(err.value)
