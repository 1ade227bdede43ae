"""Batched two-view augmentations: shapes, randomness, and the maths checked against
independent references (torch.rot90 / slicing for geometry, torchvision's per-image
functional ops for colour and blur, max-pooling for stroke thickness)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fewshot.data.views import (
    VIEW_RECIPES,
    ViewRecipe,
    make_views,
)
from fewshot.data.views.kernels import (
    affine_theta,
    blur,
    colour_matrices,
    dilate3,
    erase,
    gaussian_kernels,
    jitter,
    stroke_thickness,
    warp,
)
from fewshot.errors import ConfigError

# Every random range of the characters recipe closed: the warp must be the identity.
CHAR_STILL = dict(rotation=0, shear=0, translate=0, scale=1, crop_scale=(1, 1), thickness_prob=0, elastic_prob=0)
SIMCLR_STILL = dict(
    crop_scale=(1, 1), crop_ratio=(1, 1), hflip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=0
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int, h: int, w: int | None = None, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, c, h, w or h, generator=gen(seed))


def strokes(b: int, s: int = 28) -> torch.Tensor:
    """Bright lines on black, like a character: an L shape and a diagonal."""
    x = torch.zeros(b, 1, s, s)
    x[:, :, 5:22, 8:10] = 1.0
    x[:, :, 20:22, 8:20] = 1.0
    idx = torch.arange(4, 24)
    x[:, :, idx, idx] = 0.7
    return x


def zeros(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.float64)


def theta(b: int, **kw: float) -> torch.Tensor:
    args = dict(cw=1.0, ch=1.0, cx=0.0, cy=0.0, flip=1.0, angle=0.0, shear=0.0, zoom=1.0, tx=0.0, ty=0.0)
    args.update(kw)
    return affine_theta(**{k: zeros(b) + v for k, v in args.items()}).float()


# ----------------------------------------------------------------------------- contract

CASES = [
    ("characters", 1, {}),
    ("characters", 3, {}),
    ("characters", 1, dict(erase_prob=1.0, hflip_prob=0.5, thickness_prob=1.0, rotation=180, shear=60)),
    ("simclr", 3, {}),
    ("simclr", 1, {}),
    ("simclr", 3, dict(strength=2.5, crop_scale=(0.01, 1.0), blur_prob=1.0, grayscale_prob=0.5)),
    ("none", 1, {}),
    ("none", 3, {}),
]


@pytest.mark.parametrize("name,c,opts", CASES)
def test_shape_dtype_range_and_no_nan(name: str, c: int, opts: dict) -> None:
    recipe = make_views(name, 20, 1, **opts)
    assert isinstance(recipe, ViewRecipe)
    x = images(16, c, 20)
    x[0] = 0.0  # extreme inputs: all background, all foreground
    x[1] = 1.0
    for seed in range(3):
        v1, v2 = recipe.two_views(x, gen(seed))
        for v in (v1, v2, recipe(x, gen(seed))):
            assert v.shape == x.shape and v.dtype == x.dtype and v.device == x.device
            assert not torch.isnan(v).any()
            assert v.min() >= 0.0 and v.max() <= 1.0


@pytest.mark.parametrize("name", ["characters", "simclr", "none"])
def test_output_is_image_size_for_other_input_sizes(name: str) -> None:
    recipe = make_views(name, 16, 1)
    for shape in [(4, 3, 24, 24), (4, 3, 20, 30)]:
        v = recipe(torch.rand(shape), gen())
        assert v.shape == (4, 3, 16, 16)
        assert 0.0 <= v.min() and v.max() <= 1.0


def test_recipe_names() -> None:
    assert set(VIEW_RECIPES) == {"simclr", "characters", "none", "viewmaker"}


# ---------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("name,c", [("characters", 1), ("simclr", 3), ("simclr", 1)])
def test_each_image_gets_its_own_draw(name: str, c: int) -> None:
    x = (strokes(8) if c == 1 else images(1, 3, 28).expand(8, -1, -1, -1)).contiguous()
    v = make_views(name, 28, 1)(x, gen(3))
    assert not torch.allclose(v, x)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(v[i], v[j]), (i, j)


@pytest.mark.parametrize("name,c", [("characters", 1), ("simclr", 3)])
def test_same_seed_same_views_other_seed_other_views(name: str, c: int) -> None:
    recipe = make_views(name, 24, 1, **({"erase_prob": 0.5} if name == "characters" else {}))
    x = images(6, c, 24)
    a1, a2 = recipe.two_views(x, gen(7))
    b1, b2 = recipe.two_views(x, gen(7))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = recipe.two_views(x, gen(8))
    assert not torch.allclose(a1, c1)
    # Views differ from each other, and a generator moves on between calls.
    assert not torch.allclose(a1, a2)
    g = gen(7)
    assert not torch.allclose(recipe(x, g), recipe(x, g))


def test_none_is_exact_identity_and_draws_nothing() -> None:
    recipe = make_views("none", 28, 1)
    x = images(4, 1, 28)
    g = gen(5)
    state = g.get_state()
    v1, v2 = recipe.two_views(x, g)
    assert torch.equal(v1, x) and torch.equal(v2, x)
    assert torch.equal(g.get_state(), state)


def test_rejects_bad_batches_and_generators() -> None:
    recipe = make_views("characters", 28, 1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        recipe(torch.rand(1, 28, 28), gen())
    with pytest.raises(ValueError, match="B, C, H, W"):
        recipe(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_views("simclr", 28, 1)(torch.rand(2, 2, 28, 28), gen())


# ----------------------------------------------------------------------------- geometry


def test_characters_with_closed_ranges_is_identity() -> None:
    x = images(5, 1, 28)
    v1, v2 = make_views("characters", 28, 1, **CHAR_STILL).two_views(x, gen())
    torch.testing.assert_close(v1, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, x, atol=1e-5, rtol=0)


def test_simclr_with_closed_ranges_is_identity() -> None:
    x = images(5, 3, 32)
    v = make_views("simclr", 32, 1, **SIMCLR_STILL)(x, gen())
    torch.testing.assert_close(v, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle,k", [(90, 1), (-90, -1), (180, 2)])
def test_fixed_rotation_matches_rot90(angle: int, k: int) -> None:
    # With align_corners=False a quarter turn of a square grid maps pixel centres onto pixel
    # centres, so bilinear sampling is exact up to float rounding; tolerance 1e-5.
    x = images(3, 1, 28)
    opts = {**CHAR_STILL, "rotation": (angle, angle)}
    v = make_views("characters", 28, 1, **opts)(x, gen())
    torch.testing.assert_close(v, torch.rot90(x, k, dims=(2, 3)), atol=1e-5, rtol=0)


def test_flip_matches_torch_flip() -> None:
    x = images(3, 3, 28)
    v = make_views("characters", 28, 1, **CHAR_STILL, hflip_prob=1.0)(x, gen())
    torch.testing.assert_close(v, torch.flip(x, dims=(3,)), atol=1e-5, rtol=0)
    v = make_views("simclr", 28, 1, **{**SIMCLR_STILL, "hflip_prob": 1.0})(x, gen())
    torch.testing.assert_close(v, torch.flip(x, dims=(3,)), atol=1e-5, rtol=0)


def test_crop_box_matches_slicing() -> None:
    # The top-left quadrant box resampled at half size lands on the input's pixel centres.
    x = images(2, 1, 28)
    v = warp(x, theta(2, cw=0.5, ch=0.5, cx=-0.5, cy=-0.5), 14)
    torch.testing.assert_close(v, x[:, :, :14, :14], atol=1e-5, rtol=0)


def test_translation_moves_content_right_and_down() -> None:
    x = images(2, 1, 28)
    one_px = 2 / 28
    v = warp(x, theta(2, tx=one_px, ty=2 * one_px), 28)
    torch.testing.assert_close(v[:, :, 2:, 1:], x[:, :, :-2, :-1], atol=1e-5, rtol=0)
    assert v[:, :, :2, :].abs().max() < 1e-5  # zero (background) fill
    assert v[:, :, :, :1].abs().max() < 1e-5


def test_composition_order_crop_then_rotate() -> None:
    # Crop the top-left quadrant, then rotate by 90°: equals rot90 of the quadrant.
    x = images(2, 1, 28)
    v = warp(x, theta(2, cw=0.5, ch=0.5, cx=-0.5, cy=-0.5, angle=90.0), 14)
    torch.testing.assert_close(v, torch.rot90(x[:, :, :14, :14], 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_zoom_about_the_centre_matches_interpolate() -> None:
    # Zoom 2 about the centre: the central 14×14 block fills the 28×28 output, which is
    # bilinear upsampling of that block (borders excluded: interpolate clamps at the edge
    # of the block, the warp reads the neighbouring input pixels).
    x = images(2, 1, 28)
    v = warp(x, theta(2, zoom=2.0), 28)
    ref = F.interpolate(x[:, :, 7:21, 7:21], size=28, mode="bilinear", align_corners=False)
    torch.testing.assert_close(v[:, :, 1:-1, 1:-1], ref[:, :, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_shear_slants_rows_by_whole_pixels() -> None:
    # x-shear of 45° (tan = 1) about the centre of a 27 px image: output row i reads input
    # row i shifted by i - 13 px (whole pixels, so bilinear sampling is exact).
    x = images(2, 1, 27)
    v = warp(x, theta(2, shear=45.0), 27)
    ref = torch.zeros_like(x)
    for i in range(27):
        shift = i - 13
        for j in range(27):
            if 0 <= j - shift < 27:
                ref[:, :, i, j] = x[:, :, i, j - shift]
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=0)


def test_stroke_thickness_and_morphology() -> None:
    x = strokes(3)
    torch.testing.assert_close(dilate3(x), F.max_pool2d(x, 3, 1, 1), atol=0, rtol=0)
    t = torch.tensor([1.0, -1.0, 0.0])
    out = stroke_thickness(x, t)
    torch.testing.assert_close(out[0], F.max_pool2d(x[0], 3, 1, 1))
    torch.testing.assert_close(out[1], -F.max_pool2d(-x[1], 3, 1, 1))
    torch.testing.assert_close(out[2], x[2], atol=0, rtol=0)
    assert out[0].sum() > x[0].sum() > out[1].sum()


def test_erase_blanks_exactly_one_box() -> None:
    x = torch.ones(2, 1, 10, 12)
    out = erase(x, torch.tensor([2, 0]), torch.tensor([3, 0]), torch.tensor([4, 0]), torch.tensor([5, 3]))
    expected = torch.ones_like(x)
    expected[0, :, 2:6, 3:8] = 0
    assert torch.equal(out, expected)  # image 1 has height 0: untouched
    v = make_views("characters", 28, 1, **CHAR_STILL, erase_prob=1.0)(torch.ones(4, 1, 28, 28), gen())
    for img in v[:, 0]:
        rows, cols = (img == 0).nonzero(as_tuple=True)
        assert rows.numel() > 0
        box = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert torch.equal(box, torch.zeros_like(box))  # a solid rectangle
        assert (img != 0).sum() == img.numel() - box.numel()


# ------------------------------------------------------------------------------- colour


def ones(b: int) -> torch.Tensor:
    return torch.ones(b)


def colour(x: torch.Tensor, sat: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Only the colour matrix: brightness and contrast 1."""
    b = x.shape[0]
    return jitter(x, ones(b), ones(b), colour_matrices(sat, hue))


@pytest.mark.parametrize("c", [1, 3])
def test_brightness_is_scaled_and_clamped(c: int) -> None:
    x = images(3, c, 8)
    f = torch.tensor([0.0, 0.5, 1.8])
    eye = torch.eye(3).expand(3, 3, 3) if c == 3 else None
    out = jitter(x, f, ones(3), eye)
    torch.testing.assert_close(out, (x * f.view(-1, 1, 1, 1)).clamp(0, 1), atol=1e-6, rtol=0)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.adjust_brightness(x[i], float(f[i])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_contrast_matches_torchvision(c: int) -> None:
    x = images(3, c, 8)
    f = torch.tensor([0.0, 0.4, 1.7])
    eye = torch.eye(3).expand(3, 3, 3) if c == 3 else None
    out = jitter(x, ones(3), f, eye)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.adjust_contrast(x[i], float(f[i])), atol=1e-5, rtol=0)
    # factor 0: every pixel is the image's mean grey
    assert torch.allclose(out[0], out[0].flatten()[0].expand_as(out[0]), atol=1e-6)


def test_brightness_then_contrast_matches_torchvision() -> None:
    x = images(2, 3, 8)
    out = jitter(x, torch.tensor([1.5, 0.6]), torch.tensor([0.5, 1.4]), torch.eye(3).expand(2, 3, 3))
    for i, (fb, fc) in enumerate([(1.5, 0.5), (0.6, 1.4)]):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], fb), fc)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_contrast_folded_into_the_colour_matrix() -> None:
    # Contrast below 1 never leaves [0, 1], so torchvision's intermediate clamp is a no-op
    # and the fused matmul must equal contrast followed by saturation (and by the hue turn).
    x = images(2, 3, 8)
    f, sat, hue = torch.tensor([0.5, 0.8]), torch.tensor([1.5, 0.3]), torch.tensor([0.2, -0.1])
    out = jitter(x, ones(2), f, colour_matrices(sat, torch.zeros(2)))
    for i in range(2):
        ref = TF.adjust_saturation(TF.adjust_contrast(x[i], float(f[i])), float(sat[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    fused = jitter(x, ones(2), f, colour_matrices(sat, hue))
    staged = colour(jitter(x, ones(2), f, torch.eye(3).expand(2, 3, 3)), sat, hue)
    torch.testing.assert_close(fused, staged, atol=1e-5, rtol=0)


def test_no_jitter_is_exactly_no_change() -> None:
    x = images(2, 3, 8)
    assert torch.equal(jitter(x, ones(2), ones(2), colour_matrices(ones(2), torch.zeros(2))), x)
    x1 = images(2, 1, 8)
    assert torch.equal(jitter(x1, ones(2), ones(2), None), x1)


def test_saturation_zero_is_grayscale_and_others_match_torchvision() -> None:
    x = images(3, 3, 8)
    sat = torch.tensor([0.0, 0.5, 1.6])
    out = colour(x, sat, torch.zeros(3))
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0]).expand(3, -1, -1), atol=1e-6, rtol=0)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.adjust_saturation(x[i], float(sat[i])), atol=1e-5, rtol=0)


def test_hue_rotation_properties() -> None:
    eye = torch.eye(3).expand(2, 3, 3)
    m0 = colour_matrices(torch.ones(2), torch.zeros(2))
    assert torch.equal(m0, eye)  # no change at all when not jittered
    # Mid-range colours so that nothing clamps.
    x = 0.3 + 0.4 * images(4, 3, 6)
    hue = torch.tensor([0.1, -0.25, 0.5, -0.5])
    out = colour(x, ones(4), hue)
    yiq_y = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((out * yiq_y).sum(1), (x * yiq_y).sum(1), atol=1e-5, rtol=0)  # luma kept
    assert not torch.allclose(out, x, atol=1e-3)
    m = colour_matrices(torch.ones(4), hue)
    torch.testing.assert_close(m[2], m[3], atol=1e-6, rtol=0)  # ±180° is the same turn
    grey = torch.full((4, 3, 2, 2), 0.4)
    torch.testing.assert_close(colour(grey, ones(4), hue), grey)
    # Same direction as torchvision: a small positive shift turns red towards yellow (G up).
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    shifted = colour(red, ones(1), torch.tensor([0.05]))
    assert shifted[0, 1] > red[0, 1] and TF.adjust_hue(red, 0.05)[0, 1] > red[0, 1]


def test_per_image_blur_matches_torchvision() -> None:
    x = images(3, 3, 20)
    sigma = torch.tensor([0.1, 0.9, 2.0], dtype=torch.float64)
    out = blur(x, gaussian_kernels(sigma, 5))
    for i in range(3):
        ref = TF.gaussian_blur(x[i], kernel_size=[5, 5], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    delta = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]).expand(3, -1)
    assert torch.equal(blur(x, delta), x)


def test_simclr_grayscale_and_jitter_paths() -> None:
    x = images(4, 3, 16)
    v = make_views("simclr", 16, 1, **{**SIMCLR_STILL, "grayscale_prob": 1.0})(x, gen())
    torch.testing.assert_close(v, TF.rgb_to_grayscale(x).expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    v = make_views("simclr", 16, 1, **{**SIMCLR_STILL, "jitter_prob": 1.0, "strength": 0.0})(x, gen())
    torch.testing.assert_close(v, x, atol=1e-5, rtol=0)  # strength 0: jitter is a no-op


def test_simclr_blurs_only_the_images_drawn_for_it() -> None:
    x = images(16, 3, 20)
    v = make_views("simclr", 20, 1, **{**SIMCLR_STILL, "blur_prob": 0.5})(x, gen(2))
    same = [torch.allclose(v[i], x[i], atol=1e-5) for i in range(16)]
    assert 0 < sum(same) < 16

    def roughness(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:] - t[..., :-1]).abs().mean()

    for i in range(16):
        if not same[i]:
            assert roughness(v[i]) < roughness(x[i])


# ------------------------------------------------------------------------------ registry


def test_unknown_recipe_names_itself_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        make_views("simclrr", 28, 1)
    msg = str(err.value)
    assert "simclrr" in msg and all(name in msg for name in VIEW_RECIPES)


@pytest.mark.parametrize(
    "name,opts,match",
    [
        ("characters", {"rotaton": 10}, "rotaton"),
        ("simclr", {"crop_scale": (0.9, 0.5)}, "crop_scale"),
        ("simclr", {"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ("simclr", {"blur_prob": 1.5}, "blur_prob"),
        ("simclr", {"strength": -1}, "strength"),
        ("characters", {"rotation": "a lot"}, "rotation"),
        ("characters", {"shear": -5}, "shear"),
        ("characters", {"translate": float("nan")}, "translate"),
        ("characters", {"thickness_prob": True}, "thickness_prob"),
        ("none", {"strength": 1.0}, "strength"),
    ],
)
def test_bad_options_are_config_errors(name: str, opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_views(name, 28, 1, **opts)


def test_bad_image_size() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        make_views("characters", 0, 1)


def test_options_accept_lists_from_config_files() -> None:
    recipe = make_views("characters", 28, 1, crop_scale=[0.5, 1.0], rotation=[-5, 20])
    assert recipe.crop_scale == (0.5, 1.0) and recipe.rotation == (-5.0, 20.0)


# -------------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,c", [("characters", 1), ("simclr", 3)])
def test_cuda_matches_cpu_for_the_same_generator_state(name: str, c: int) -> None:
    recipe = make_views(name, 28, 1, **({"erase_prob": 0.5} if name == "characters" else {}))
    x = images(16, c, 28)
    cpu = recipe(x, gen(11))
    gpu = recipe(x.cuda(), gen(11))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_elastic_offsets_are_smooth_and_scaled() -> None:
    from fewshot.data.views.kernels import elastic_offsets

    noise = torch.randn(64, 2, 4, 4, generator=gen(3), dtype=torch.float64)
    field = elastic_offsets(noise, 28, torch.full((64,), 0.04, dtype=torch.float64))
    assert field.shape == (64, 28, 28, 2)
    # Bicubic upsampling of unit-variance noise keeps roughly unit variance: std ≈ the magnitude.
    assert 0.02 < field.std().item() < 0.06
    # Smooth: neighbouring pixels move almost together (white noise would give no correlation).
    a, b = field[:, :, :-1].flatten(), field[:, :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95
    assert torch.equal(elastic_offsets(noise, 28, torch.zeros(64, dtype=torch.float64)), torch.zeros_like(field))


def test_elastic_alone_bends_but_keeps_the_ink() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 6:22, 13:15] = 1.0  # a vertical bar
    opts = {**CHAR_STILL, "elastic_prob": 1.0, "elastic": 0.05}
    out = make_views("characters", 28, 1, **opts)(x, gen(4))
    assert not torch.allclose(out, x, atol=1e-3)  # it moved
    ink_in, ink_out = x.sum((1, 2, 3)), out.sum((1, 2, 3))
    assert ((ink_out - ink_in).abs() / ink_in).max() < 0.4  # local stretch changes the area a little
    cols = torch.arange(28.0)
    centre_x = (out.sum((1, 2)) * cols).sum(-1) / ink_out
    assert (centre_x - 13.5).abs().max() < 2.0  # the bar bends in place: a small smooth warp, not a scramble
    same = make_views("characters", 28, 1, **opts)(x, gen(4))
    assert torch.equal(out, same)


def test_every_piece_runs_under_cpu_bf16_autocast() -> None:
    # train.precision=bf16-mixed on a CPU: grid_sample hands the later pieces a bf16 batch, and
    # stroke thickness once crashed there (a float32 blend weight against bf16 images).
    x = torch.rand(4, 1, 28, 28, generator=gen(1))
    opts = dict(thickness_prob=1.0, erase_prob=1.0, elastic_prob=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = make_views("characters", 28, 1, **opts)(x, gen(2))
    assert v.shape == (4, 1, 28, 28) and torch.isfinite(v.float()).all()
    assert stroke_thickness(x.bfloat16(), torch.full((4,), 0.5)).dtype == torch.bfloat16
