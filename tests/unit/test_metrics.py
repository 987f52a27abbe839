"""Evaluation metrics: FID (torchmetrics path), R-precision, CLIP score, and the standard backbones.

References: FID against the closed form of two Gaussians, ||m1-m2||² + Tr(S1 + S2 - 2 (S1 S2)^½)
(Dowson & Landau 1982), with the square root from scipy.linalg.sqrtm on the true parameters;
R-precision and CLIP score against values known by construction. The backbones load offline from
tiny models these tests build (a random CLIP saved with transformers, a randomised Inception
state dict in torch-fidelity's layout).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from imager.errors import ConfigError
from imager.evaluation.metrics import FID, HFClip, InceptionFeatures, clip_score, r_precision

# ---------------------------------------------------------------------------------------------- FID


def gaussian_samples(mean: torch.Tensor, cov: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


class Features(nn.Module):
    """Features pass through: the FID of given feature vectors (N, d)."""

    def __init__(self, width: int):
        super().__init__()
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = FID(Features(real.shape[1]), batch_size=4096)
    fid.add_real(real)
    return fid.score(fake)


def test_fid_of_a_set_against_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    assert abs(frechet(feats, feats)) < 1e-4


def test_fid_of_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    d, n = 8, 20_000
    a, b = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    cov1 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    cov2 = b @ b.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mean1, mean2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    s1, s2 = cov1.numpy(), cov2.numpy()
    expected = float(((mean1 - mean2) ** 2).sum()) + float(np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    got = frechet(gaussian_samples(mean1, cov1, n, g).float(), gaussian_samples(mean2, cov2, n, g).float())
    # Sampling error at n = 20k is ~0.5% (measured over seeds); 3% would still catch a missing
    # factor 2 on the cross term, a mean term left out or sample covariances off by n/(n-1)^2.
    assert got == pytest.approx(expected, rel=0.03)
    assert expected > 3.0  # the test distinguishes the sets


class TinyExtractor(nn.Module):
    """A fixed random conv net: images (N, 3, H, W) -> (N, 6)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3)) + x.mean(dim=(1, 2, 3))[:, None]


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return (torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 1 + shift).clamp(-1, 1)


def test_fid_reuses_the_real_statistics_across_generated_sets():
    real, fakes = images(40, 0), [images(30, 1), images(30, 2, shift=0.3), images(30, 3, shift=-0.5)]
    fid = FID(TinyExtractor(), batch_size=7)
    fid.add_real(real[:25])
    fid.add_real(real[25:])  # accumulates
    scores = [fid.score(fake) for fake in fakes]
    assert fid.real_count == 40
    assert fid.score(fakes[0]) == pytest.approx(scores[0], rel=1e-12)  # fakes reset, real kept
    for fake, score in zip(fakes, scores, strict=True):
        fresh = FID(TinyExtractor(), batch_size=64)  # other batching, a fresh metric
        fresh.add_real(real)
        assert score == pytest.approx(fresh.score(fake), rel=1e-5, abs=1e-9)
    assert scores[0] < scores[1] and scores[0] < scores[2]  # shifted sets are further away
    assert all(isinstance(s, float) for s in scores)


def test_fid_needs_two_samples_and_a_feature_width():
    fid = FID(TinyExtractor())
    fid.add_real(images(5, 0))
    with pytest.raises(ValueError, match="at least 2"):
        fid.score(images(1, 1))
    with pytest.raises(TypeError, match="num_features"):
        FID(nn.Identity())


# ---------------------------------------------------------------------------------- R-precision


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_r_precision_of_a_perfect_retriever_is_one():
    pool = unit(50, 16, 0)
    targets = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(1))
    assert r_precision(pool[targets] * 3.0, pool, targets, k=10, generator=torch.Generator().manual_seed(0)) == 1.0


def test_r_precision_of_random_embeddings_is_chance():
    n, m, k = 20_000, 100, 10
    targets = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2))
    got = r_precision(unit(n, 32, 3), unit(m, 32, 4), targets, k, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(1 / k, abs=0.01)  # binomial sd at n = 20k: 0.002


def test_r_precision_with_the_whole_pool_is_retrieval_accuracy():
    # k = M: the candidates must be the whole pool, so negatives are distinct and never the target.
    image, pool = unit(300, 8, 5), unit(12, 8, 6)
    targets = torch.randint(0, 12, (300,), generator=torch.Generator().manual_seed(7))
    accuracy = ((image @ pool.T).argmax(1) == targets).double().mean().item()
    assert 0.0 < accuracy < 1.0
    assert r_precision(image, pool, targets, k=12, generator=torch.Generator().manual_seed(0)) == pytest.approx(accuracy)


def test_r_precision_counts_ties_as_misses_and_is_seeded():
    pool = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # captions 0 and 1 embed identically
    image = torch.tensor([[1.0, 0.0]] * 4)
    targets = torch.zeros(4, dtype=torch.long)
    assert r_precision(image, pool, targets, k=3) == 0.0
    image, pool = unit(500, 8, 8), unit(40, 8, 9)
    targets = torch.randint(0, 40, (500,), generator=torch.Generator().manual_seed(10))
    runs = [r_precision(image, pool, targets, 5, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


def test_r_precision_rejects_k_above_the_pool_size():
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
        r_precision(unit(3, 4, 0), unit(5, 4, 1), torch.zeros(3, dtype=torch.long), k=6)


# ---------------------------------------------------------------------------------------- CLIP score


def test_clip_score():
    e = unit(10, 8, 0)
    assert clip_score(e, e * 2.0) == pytest.approx(100.0)
    orthogonal = torch.eye(4)
    assert clip_score(orthogonal, orthogonal.roll(1, dims=0)) == pytest.approx(0.0, abs=1e-12)
    assert clip_score(e, -e) == 0.0  # negative cosines are clamped to 0
    assert clip_score(torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]])) == pytest.approx(50.0)
    a, b = unit(10, 8, 1), unit(10, 8, 2)
    expected = 100 * F.cosine_similarity(a.double(), b.double()).clamp(min=0).mean().item()
    assert clip_score(a, b) == pytest.approx(expected)
    with pytest.raises(ValueError, match="clip_score"):
        clip_score(unit(3, 8, 0), unit(4, 8, 0))


# ----------------------------------------------------------------------------------------- HF CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (16-d projection, 32 px vision tower) with a letters-only BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {ch: i + 2 for i, ch in enumerate(letters)}
    vocab |= {ch + "</w>": i + 2 + len(letters) for i, ch in enumerate(letters)}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(root))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root


def test_hf_clip_embeds_images_and_texts(tiny_clip):
    clip = HFClip(tiny_clip, batch_size=3)
    imgs = images(5, 0)  # 12 px: resized by the processor
    emb = clip.embed_images(imgs)
    assert emb.shape == (5, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(clip.embed_images(imgs[3:]), emb[3:], atol=1e-5)  # batching does not matter
    texts = clip.embed_texts(["red circle", "blue square", "x" * 100])  # the last is truncated to 16 tokens
    assert texts.shape == (3, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1])
    assert clip.dim == 16
    assert 0.0 <= clip_score(emb[:3], texts) <= 100.0


def test_hf_clip_missing_or_invalid_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^evaluate\.backbones\.clip: no such folder .*never downloaded") as exc:
        HFClip(tmp_path / "missing")
    assert "\n" not in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^evaluate\.backbones\.clip: cannot load .*empty") as exc:
        HFClip(tmp_path / "empty")
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random state dict in torch-fidelity's InceptionV3 layout (built without any weights:
    load_state_dict is stubbed out while the network is constructed)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # variance-preserving, so the 2048 features are not ~0
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = root / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_inception_features(inception_weights, no_download):
    net = InceptionFeatures(inception_weights)
    assert net.num_features == 2048
    net.train()
    assert not net.training  # frozen
    x = images(2, 0)
    with torch.inference_mode():
        feats = net(x)
        assert feats.shape == (2, 2048) and feats.dtype == torch.float32
        assert torch.isfinite(feats).all() and feats.abs().max() > 1e-3
        assert not torch.allclose(feats[0], feats[1])
        assert net(torch.rand(1, 3, 40, 30) * 2 - 1).shape == (1, 2048)


def test_inception_missing_or_wrong_weights(tmp_path, no_download):
    with pytest.raises(ConfigError, match=r"^evaluate\.backbones\.inception: no such file .*never downloaded") as exc:
        InceptionFeatures(tmp_path / "missing.pth")
    assert "\n" not in str(exc.value)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"^evaluate\.backbones\.inception: .*wrong\.pth does not hold the FID InceptionV3") as exc:
        InceptionFeatures(tmp_path / "wrong.pth")
    assert "\n" not in str(exc.value)
    torch.save({"weights": argparse.Namespace(x=1)}, tmp_path / "code.pth")  # a pickled object: refused, never unpickled
    with pytest.raises(ConfigError, match=r"cannot read .*code\.pth as PyTorch weights \(it pickles more than tensors\)"):
        InceptionFeatures(tmp_path / "code.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ConfigError, match=r"cannot read .*text\.pth as PyTorch weights"):
        InceptionFeatures(tmp_path / "text.pth")
