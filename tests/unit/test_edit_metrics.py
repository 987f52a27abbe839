"""The edit evaluation's pieces: mask kinds, line drawings, the sketch F-score, PSNR, error levels."""

from __future__ import annotations

import math

import pytest
import torch

from imager.evaluation.edits import counting_calls, dark_pixels, edge_fscore, make_masks, max_error_levels, psnr, sketch_of


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mask_kinds_cover_what_they_say():
    size = 16
    centre = make_masks("centre", 2, size, border=2, generator=_gen())
    assert centre.shape == (2, 1, 16, 16) and centre.sum().item() == 2 * 8 * 8
    assert centre[0, 0, 8, 8] == 1 and centre[0, 0, 0, 0] == 0
    half = make_masks("half", 1, size, border=2, generator=_gen())
    assert half[..., 8:].eq(1).all() and half[..., :8].eq(0).all()
    border = make_masks("border", 1, size, border=3, generator=_gen())
    assert border.sum().item() == 16 * 16 - 10 * 10 and border[0, 0, 8, 8] == 0 and border[0, 0, 0, 8] == 1


def test_strokes_are_binary_seeded_and_differ_per_image():
    a = make_masks("strokes", 3, 32, border=2, generator=_gen(1))
    b = make_masks("strokes", 3, 32, border=2, generator=_gen(1))
    c = make_masks("strokes", 3, 32, border=2, generator=_gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a[0], a[1])
    assert 0 < a.mean() < 0.8  # strokes, not the whole image
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_masks("circle", 1, 8, border=1, generator=_gen())


def test_sketch_keeps_dark_pixels_as_black_lines_on_white():
    images = torch.ones(1, 3, 4, 4)  # white
    images[0, :, 1, 1] = -1  # black
    images[0, :, 2, 2] = torch.tensor([-1.0, -0.9, -1.0])  # a dark green
    images[0, :, 3, 3] = torch.tensor([1.0, -1.0, -1.0])  # red: luminance 0.299, above 0.25
    lines, sketch = sketch_of(images, 0.25)
    assert lines[0, 0].nonzero().tolist() == [[1, 1], [2, 2]]
    assert torch.equal(sketch[0, :, 1, 1], torch.tensor([-1.0, -1.0, -1.0])) and torch.equal(sketch[0, :, 3, 3], torch.ones(3))
    assert torch.equal(dark_pixels(sketch, 0.25), lines)  # the sketch's own lines are the lines


def test_edge_fscore_counts_near_pixels_within_the_tolerance():
    ref = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    ref[0, 0, 5, 2:8] = True  # a 6-pixel line
    assert edge_fscore(ref, ref, 0).item() == 1.0
    shifted = ref.roll(1, dims=2)
    assert edge_fscore(ref, shifted, 0).item() == 0.0  # one pixel off, no tolerance
    assert edge_fscore(ref, shifted, 1).item() == 1.0  # within one pixel
    half = ref.clone()
    half[0, 0, 5, 5:8] = False  # 3 of the 6 pixels drawn: precision 1, recall 0.5
    assert math.isclose(edge_fscore(ref, half, 0).item(), 2 * 1 * 0.5 / 1.5, rel_tol=1e-6)
    empty = torch.zeros_like(ref)
    assert edge_fscore(empty, empty, 1).item() == 1.0 and edge_fscore(ref, empty, 1).item() == 0.0


def test_psnr_matches_its_definition_and_error_levels_count_8_bit_steps():
    gen = _gen(3)
    a = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(a, b), 10 * torch.log10(4 / mse), rtol=1e-5)
    where = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    assert max_error_levels(a, b, where) == 0  # nothing selected
    c = a.clone()
    c[1, 2, 3, 4] = (c[1, 2, 3, 4] + 10 / 127.5).clamp(-1, 1) if c[1, 2, 3, 4] < 0.5 else c[1, 2, 3, 4] - 10 / 127.5
    where[1, 0, 3, 4] = True
    assert max_error_levels(c, a, where) in (9, 10, 11)  # ten 8-bit levels, give or take the rounding
    assert max_error_levels(c, a, ~where) == 0


def test_counting_calls_counts_forward_passes_and_detaches():
    layer = torch.nn.Linear(2, 2)
    with counting_calls(layer) as calls:
        layer(torch.zeros(1, 2))
        layer(torch.zeros(3, 2))
    layer(torch.zeros(1, 2))
    assert calls[0] == 2
