"""Character normalisation: invariance to where and how big a drawing is, checked on drawings
rendered analytically (an exact affine map of the same strokes), with the unnormalised images as
the negative control; the moments and the stretch cap against hand computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot.config import load_config
from fewshot.data.registry import load_source, preprocess
from fewshot.data.normalize import axis_scales, ink_moments, normalize_characters, normalize_points
from fewshot.errors import ConfigError, DataError

# Strokes of a made-up character in the unit square: (start, end) segments, (row, col).
STROKES = [((0.25, 0.3), (0.75, 0.3)), ((0.75, 0.3), (0.7, 0.7)), ((0.3, 0.35), (0.55, 0.65))]


def _render(size=105, scale=(1.0, 1.0), shift=(0.0, 0.0), width=0.025, supersample=4):
    """The strokes mapped by p ↦ c0 + scale ⊙ (p − c0) + shift (c0 = the square's centre), drawn at
    ``size`` px with anti-aliasing: a pixel's value is the fraction of its sub-samples within
    ``width`` (in unit-square units, mapped too) of a stroke."""
    n = size * supersample
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rows, cols = torch.meshgrid(u, u, indexing="ij")
    # Pull each sample back to the original drawing: p = c0 + (q − c0 − shift) / scale.
    pr = 0.5 + (rows - 0.5 - shift[0]) / scale[0]
    pc = 0.5 + (cols - 0.5 - shift[1]) / scale[1]
    ink = torch.zeros_like(pr, dtype=torch.bool)
    for (r0, c0), (r1, c1) in STROKES:
        dr, dc = r1 - r0, c1 - c0
        t = (((pr - r0) * dr + (pc - c0) * dc) / (dr * dr + dc * dc)).clamp(0, 1)
        ink |= (pr - r0 - t * dr) ** 2 + (pc - c0 - t * dc) ** 2 <= width**2
    img = ink.double().view(size, supersample, size, supersample).mean((1, 3))
    return img.float()[None, None]


def _area(img, size):
    return F.interpolate(img, size=(size, size), mode="area")


def test_normalised_shifted_stretched_drawing_equals_the_original():
    original = _render()
    moved = _render(scale=(0.8, 1.3), shift=(0.12, -0.08))  # smaller and taller/wider, moved off-centre
    a = normalize_characters(original, 28, spread=0.16, max_stretch=2.0, blur=0.0)
    b = normalize_characters(moved, 28, spread=0.16, max_stretch=2.0, blur=0.0)
    normalised_gap = (a - b).abs().mean() / a.mean()
    raw_gap = (_area(original, 28) - _area(moved, 28)).abs().mean() / _area(original, 28).mean()
    assert normalised_gap < 0.06  # within interpolation error (measured 0.028; stroke widths are stretched too)
    assert raw_gap > 1.0  # negative control: without normalisation the two images barely overlap
    assert (a - b).abs().max() < 0.15


def test_normalised_ink_has_the_target_centre_and_spread():
    img = normalize_characters(_render(scale=(0.7, 1.2), shift=(0.1, 0.1)), 56, spread=0.16, max_stretch=2.0)
    ink = img[0, 0].double().numpy()
    coords = np.arange(56) + 0.5
    m = ink.sum()
    cr, cc = (ink.sum(1) * coords).sum() / m, (ink.sum(0) * coords).sum() / m
    sr = np.sqrt((ink.sum(1) * (coords - cr) ** 2).sum() / m)
    sc = np.sqrt((ink.sum(0) * (coords - cc) ** 2).sum() / m)
    assert abs(cr - 28) < 0.3 and abs(cc - 28) < 0.3
    assert abs(sr - 0.16 * 56) < 0.5 and abs(sc - 0.16 * 56) < 0.5


def test_ink_moments_by_hand():
    img = torch.zeros(1, 1, 4, 6)
    img[0, 0, 1, 1] = 1.0
    img[0, 0, 3, 5] = 3.0
    centre, sigma, mass = ink_moments(img)
    # rows: 1.5 (w 1), 3.5 (w 3) → mean 3.0, var (1·2.25 + 3·0.25)/4 = 0.75; cols 1.5, 5.5 → 4.5, var (9 + 3)/4 = 3
    torch.testing.assert_close(centre[0], torch.tensor([3.0, 4.5]))
    torch.testing.assert_close(sigma[0], torch.tensor([0.75, 3.0]).sqrt())
    assert mass.item() == 4.0


def test_axis_scales_caps_the_stretch():
    s = axis_scales(torch.tensor([[10.0, 8.0], [10.0, 2.0], [0.0, 0.0]]), target=5.0, max_stretch=2.0)
    torch.testing.assert_close(s[0], torch.tensor([0.5, 0.625]))  # both axes to the target spread
    torch.testing.assert_close(s[1], torch.tensor([0.5, 1.0]))  # 2 < 10/2: scaled as if it were 5
    torch.testing.assert_close(s[2], torch.tensor([1.0, 1.0]))  # no ink: left alone
    with pytest.raises(DataError, match="max_stretch"):
        axis_scales(torch.ones(1, 2), 5.0, 0.5)


def test_normalize_points_matches_the_image_normalisation():
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0], [6.0, 6.0]])
    out = normalize_points(pts, spread_px=3.0, max_stretch=2.0)
    torch.testing.assert_close(out.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.tensor([3.0, 3.0]))


def test_empty_image_is_only_resized_and_bad_input_is_one_line():
    out = normalize_characters(torch.zeros(2, 1, 105, 105), 28)
    assert out.shape == (2, 1, 28, 28) and out.abs().max() == 0
    with pytest.raises(DataError, match="spread"):
        normalize_characters(torch.zeros(1, 1, 8, 8), 8, spread=0.7)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        normalize_characters(torch.zeros(8, 8), 8)


def test_data_config_applies_the_same_normalisation_everywhere():
    cfg = load_config(overrides=["data.normalize=true", "data.image_size=16", "data.normalize_from=32"])
    digits = load_source(cfg.data)
    assert digits.images.shape[1:] == (1, 16, 16)
    raw = load_source(load_config(overrides=["data.image_size=32"]).data)
    torch.testing.assert_close(digits.images, preprocess(raw.images, cfg.data))  # one function, one result
    with pytest.raises(ConfigError, match="normalize_max_stretch"):
        load_config(overrides=["data.normalize_max_stretch=0.5"])
