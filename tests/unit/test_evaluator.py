"""The in-domain evaluator: it learns image-caption agreement, trains deterministically, and its
checkpoint rebuilds it.

The data is synthetic: 8 captions ("red circle", "red square", ... over 4 colours and 2 shapes),
each image a shape of random position and size on white; the text embedding of a caption is a
fixed random unit vector. Colour alone gives R-precision 0.5 at k = 8 (the shape at chance), chance
is 0.125, so a bar of 0.85 on new draws needs both colour and shape.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from imager.errors import CheckpointError
from imager.evaluation.config import Evaluator
from imager.evaluation.evaluator import ImageEvaluator, _contrastive_loss, load_evaluator, save_evaluator, train_evaluator
from imager.evaluation.metrics import FID, r_precision

COLOURS = torch.tensor([(220, 30, 30), (30, 170, 60), (30, 60, 220), (235, 200, 20)], dtype=torch.float32)
CAPTIONS = 8  # label = 2 * colour + shape; shape 0: circle, 1: square
TEXT_DIM = 16
TINY = dict(resolution=32, channels=(16, 32), feature_dim=32, batch_size=64)


def draw(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, size, size): a filled circle or square, centre in the middle half, radius 12-27% of the side."""
    n = len(labels)
    cy, cx = (torch.rand(2, n, generator=g) * 0.5 + 0.25) * size
    r = ((torch.rand(n, generator=g) * 0.15 + 0.12) * size)[:, None, None]
    grid = torch.arange(size) + 0.5
    dy, dx = grid[None, :, None] - cy[:, None, None], grid[None, None, :] - cx[:, None, None]  # (N, S, 1), (N, 1, S)
    circle = dy**2 + dx**2 <= r**2
    square = (dy.abs() <= 0.9 * r) & (dx.abs() <= 0.9 * r)  # about the circle's area
    mask = torch.where((labels % 2 == 0)[:, None, None], circle, square)  # (N, S, S)
    img = torch.where(mask[:, None], COLOURS[labels // 2][:, :, None, None], torch.tensor(255.0))
    return img.round().to(torch.uint8)


def dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CAPTIONS, (n,), generator=g)
    return draw(labels, size, g), labels


@pytest.fixture(scope="module")
def captions() -> torch.Tensor:
    return F.normalize(torch.randn(CAPTIONS, TEXT_DIM, generator=torch.Generator().manual_seed(123)), dim=-1)


@pytest.fixture(scope="module")
def trained(captions):
    images, labels = dataset(512, 32, seed=0)
    logged = []
    cfg = Evaluator(**TINY, epochs=40)
    model, summary = train_evaluator(cfg, images, captions[labels], progress=False, log=lambda m, step: logged.append((step, m)))
    return model, summary, logged


def held_out_r_precision(model: ImageEvaluator, captions: torch.Tensor, size: int = 32) -> float:
    images, labels = dataset(512, size, seed=99)  # new draws
    with torch.no_grad():
        emb = model.embed(images.float() / 127.5 - 1)
    return r_precision(emb, captions, labels, k=CAPTIONS, generator=torch.Generator().manual_seed(0))


def test_trained_evaluator_matches_images_to_their_captions(trained, captions):
    model, summary, logged = trained
    untrained = ImageEvaluator(model.cfg, TEXT_DIM).eval()
    assert held_out_r_precision(untrained, captions) < 0.3  # chance: 0.125
    assert held_out_r_precision(model, captions) > 0.85
    assert held_out_r_precision(model, captions, size=64) > 0.85  # larger inputs are resized (area)
    assert [step for step, _ in logged] == list(range(1, 41))
    assert logged[-1][1]["loss"] < logged[0][1]["loss"] and logged[-1][1]["accuracy"] > 0.8
    assert set(summary) >= {"loss", "accuracy", "epochs", "steps", "images_per_s", "seconds", "parameters"}
    assert summary["epochs"] == 40 and summary["steps"] == 40 * (512 // 64)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert not model.training


def test_training_is_deterministic_per_seed(captions):
    images, labels = dataset(128, 32, seed=1)
    cfg = Evaluator(**TINY, epochs=2, lowres_augment=0.5)
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        runs.append(train_evaluator(cfg.model_copy(update={"seed": seed}), images, captions[labels], progress=False)[0])
    a, b, c = (run.state_dict() for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_training_leaves_global_rng_and_threads_alone(captions):
    images, labels = dataset(64, 16, seed=2)
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cfg = Evaluator(**TINY | {"batch_size": 32}, epochs=1, threads=1)
    train_evaluator(cfg, images, captions[labels], progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_contrastive_loss_counts_identical_captions_as_positives():
    text = F.normalize(torch.randn(3, TEXT_DIM, generator=torch.Generator().manual_seed(0)), dim=-1)[[0, 0, 1, 2]]
    same = torch.tensor([[True, True, False, False], [True, True, False, False], [False, False, True, False], [False, False, False, True]])
    loss, accuracy = _contrastive_loss(text, text, same, torch.tensor(0.05))
    assert accuracy == 1.0  # image 1 picking caption 0 (its twin; argmax takes the first) is right
    # Rows 0 and 1 can give each copy at most p = 1/2: their loss is log 2, the other rows' ~0,
    # in both directions; so the mean is 2 log 2 / 4.
    assert loss.item() == pytest.approx(2 * math.log(2) / 4, abs=1e-3)


def test_shapes_normalisation_and_any_input_size():
    cfg = Evaluator(**TINY)
    model = ImageEvaluator(cfg, TEXT_DIM).eval()
    assert model.num_features == 32
    assert model.temperature.item() == pytest.approx(cfg.temperature)
    with torch.no_grad():
        for size in (8, 32, 48, 64):
            x = torch.rand(3, 3, size, size) * 2 - 1
            assert model(x).shape == model.features(x).shape == (3, 32)
            emb = model.embed(x)
            assert emb.shape == (3, TEXT_DIM) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 32, 32))


def test_evaluator_plugs_into_fid(trained):
    model = trained[0]
    real, _ = dataset(64, 32, seed=3)
    other, _ = dataset(64, 32, seed=4)
    fid = FID(model, batch_size=16)
    fid.add_real(real.float() / 127.5 - 1)
    same_distribution = fid.score(other.float() / 127.5 - 1)
    noise = fid.score(torch.rand(64, 3, 32, 32) * 2 - 1)
    assert 0 <= same_distribution < noise


def test_save_load_round_trip(trained, tmp_path):
    model = trained[0]
    path = tmp_path / "sub" / "evaluator.safetensors"
    save_evaluator(model, path)
    loaded = load_evaluator(path)
    assert not loaded.training and loaded.cfg == model.cfg and loaded.text_dim == TEXT_DIM
    x = torch.rand(5, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.features(x))
        assert torch.equal(loaded.embed(x), model.embed(x))
    save_evaluator(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()  # canonical: same model, same bytes
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["evaluator.safetensors"]  # no temp files left


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no evaluator; run `imager train-evaluator`") as exc:
        load_evaluator(tmp_path / "missing.safetensors")
    assert "\n" not in str(exc.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_evaluator(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="has no imager metadata, not an evaluator"):
        load_evaluator(tmp_path / "plain.safetensors")
    header = {"imager_model": "unet", "config": {}, "extra": {}}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "unet.safetensors"), metadata={"imager": json.dumps(header)})
    with pytest.raises(CheckpointError, match="kind 'unet', not an evaluator"):
        load_evaluator(tmp_path / "unet.safetensors")
    model = ImageEvaluator(Evaluator(**TINY), TEXT_DIM)
    save_evaluator(model, tmp_path / "ok.safetensors")
    header = {"imager_model": "evaluator", "config": Evaluator(**TINY | {"feature_dim": 8}).model_dump(mode="json"), "text_dim": TEXT_DIM}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata={"imager": json.dumps(header)})
    with pytest.raises(CheckpointError, match="weights do not match the stored evaluator config"):
        load_evaluator(tmp_path / "mismatch.safetensors")
