"""Reconstruction pre-training: autoencoder bottlenecks and MAE, checked against independent computations."""

import math
import statistics

import pytest
import torch

from fewshot.config import DataConfig, find_recipe, load_config
from fewshot.data.registry import load_source
from fewshot.data.masking import mae_shuffle, patchify, random_mask, unpatchify
from fewshot.data.types import ImageSet
from fewshot.errors import ConfigError
from fewshot.methods import build_method
from fewshot.models.decoders import LinearDecoder, sincos_2d
from fewshot.objectives.reconstruction import (
    bce_reconstruction,
    l1_sparsity,
    masked_patch_loss,
    mse_reconstruction,
    norm_pix_target,
    topk_sparsify,
)
from fewshot.train.trainer import pretrain

AE = ["method=autoencoder", "data.image_size=16", "encoder.options={width: 8}", "method.code_dim=16",
      "views=none", "train.channels_last=false"]
MAE_TINY = ["method=mae", "data.image_size=16", "encoder=vit-tiny", "encoder.options={depth: 2}", "views=none",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def _images(n=6, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _method(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(overrides=list(overrides)))


# --------------------------------------------------------------------------- objectives


def test_topk_keeps_exactly_the_k_largest_per_row():
    r = torch.randn(7, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = topk_sparsify(r, 4)
    for b in range(7):
        row = r[b].tolist()
        largest = sorted(range(12), key=lambda j: row[j], reverse=True)[:4]  # by value, not |value|
        assert (out[b] != 0).sum() == 4
        for j in range(12):
            assert out[b, j].item() == (row[j] if j in largest else 0.0)
    out.sum().backward()  # gradient only through the kept entries (the support)
    assert torch.equal(r.grad, (out != 0).float())


def test_topk_rejects_k_out_of_range():
    with pytest.raises(ConfigError, match="1 ≤ k ≤ code size 5"):
        topk_sparsify(torch.zeros(2, 5), 6)
    with pytest.raises(ConfigError):
        topk_sparsify(torch.zeros(2, 5), 0)


def test_l1_is_the_hand_sum():
    r = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    by_hand = sum(abs(v) for row in r.tolist() for v in row) / 5
    assert l1_sparsity(r).item() == pytest.approx(by_hand, rel=1e-6)


def test_reconstruction_losses_match_their_formulas():
    g = torch.Generator().manual_seed(2)
    logits, x = torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    n = x.numel()
    bce = -sum(t * math.log(1 / (1 + math.exp(-l))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-l)))
               for l, t in zip(logits.flatten().tolist(), x.flatten().tolist())) / n
    mse = sum((a - b) ** 2 for a, b in zip(logits.flatten().tolist(), x.flatten().tolist())) / n
    assert bce_reconstruction(logits, x).item() == pytest.approx(bce, rel=1e-5)
    assert mse_reconstruction(logits, x).item() == pytest.approx(mse, rel=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        mse_reconstruction(logits, x[:2])


def test_norm_pix_target_standardises_each_patch_on_its_own():
    patches = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    patches[1, 2] = 0.25  # a constant patch: var 0, target 0 (eps keeps it finite)
    target = norm_pix_target(patches)
    for b in range(2):
        for l in range(3):
            p = patches[b, l].tolist()
            mean, var = statistics.fmean(p), statistics.variance(p)  # variance: ÷ (D − 1), as MAE's code
            expected = [(v - mean) / math.sqrt(var + 1e-6) for v in p]
            assert target[b, l].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_masked_patch_loss_counts_removed_patches_only():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 8, 5, generator=g), torch.randn(3, 8, 5, generator=g)
    mask = torch.rand(3, 8, generator=g) < 0.6
    loss = masked_patch_loss(pred, target, mask)
    scored = [(b, l) for b in range(3) for l in range(8) if mask[b, l]]
    by_hand = sum(sum((pred[b, l, d] - target[b, l, d]).item() ** 2 for d in range(5)) / 5 for b, l in scored) / len(scored)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 10.0  # visible patches: no effect
    assert masked_patch_loss(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-7)
    changed[mask] += 1.0  # removed patches: they are the loss
    assert masked_patch_loss(changed, target, mask).item() != pytest.approx(loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="removes no patch"):
        masked_patch_loss(pred, target, torch.zeros(3, 8, dtype=torch.bool))


# --------------------------------------------------------------------------- autoencoder bottlenecks


def test_code_is_the_encoder_output_and_topk_applies_in_eval_too():
    method = _method(*AE, "method.topk=3").eval()
    r = method.encoder(_images())
    assert r.shape == (6, 16) and method.encoder.dim == 16
    assert torch.equal((r != 0).sum(dim=1), torch.full((6,), 3))


def test_code_noise_only_in_training_mode():
    method = _method(*AE, "method.code_noise=0.5")
    r = torch.randn(4, 16)
    noisy = method.train().perturb_code(r, torch.Generator().manual_seed(9))
    expected = r + 0.5 * torch.randn(4, 16, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(method.eval().perturb_code(r, torch.Generator().manual_seed(9)), r)
    # and the eval-mode loss is the noise-free reconstruction
    x = _images()
    loss, _ = method({"images": x}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, bce_reconstruction(method.decoder(method.encoder(x)), x))


def test_denoising_input_is_corrupted_and_target_is_clean():
    method = _method(*AE, "method.input_mask_ratio=0.25", "method.input_mask_patch=4", "method.input_noise=0.1").eval()
    x = _images()
    x_tilde = method.corrupt(x, torch.Generator().manual_seed(5))
    # Independently: Gaussian noise first, then exactly 4 of the 16 4×4 patches zeroed per image.
    g = torch.Generator().manual_seed(5)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    hidden = random_mask((6, 16), 0.25, g)
    for b in range(6):
        for i in range(4):
            for j in range(4):
                block = x_tilde[b, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                if hidden[b, 4 * i + j]:
                    assert torch.equal(block, torch.zeros(4, 4))
                else:
                    assert torch.equal(block, noisy[b, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
    assert int(hidden.sum(dim=1).unique()) == 4
    loss, _ = method({"images": x}, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, bce_reconstruction(method.decoder(method.encoder(x_tilde)), x))


def test_l1_term_joins_the_loss():
    method = _method(*AE, "method.l1=0.3", "method.reconstruction=mse").eval()
    x = _images()
    loss, logs = method({"images": x}, torch.Generator())
    r = method.encoder(x)
    expected = mse_reconstruction(method.decoder(r), x) + 0.3 * r.abs().sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    assert logs["l1"] == pytest.approx(r.abs().sum(dim=1).mean().item(), rel=1e-5)


def test_weak_decoder_is_one_affine_map_with_far_fewer_parameters():
    size = ["data.image_size=28", "encoder.options={pools: 3, blocks: 3}"]
    conv = _method("method=autoencoder", *size).decoder
    linear = _method("method=autoencoder", *size, "method.decoder=linear").decoder
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert isinstance(linear, LinearDecoder) and count(linear) < count(conv) / 2
    # affine: the reconstructions of a mix of codes are the mix of the reconstructions
    r1, r2 = torch.randn(2, 64), torch.randn(2, 64)
    torch.testing.assert_close(linear(0.3 * r1 + 0.7 * r2), 0.3 * linear(r1) + 0.7 * linear(r2))
    assert conv(r1).shape == linear(r1).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("encoder_options", ["{pools: 4}", "{pools: 3, blocks: 3}", "{pools: 2, blocks: 4}"])
def test_conv_decoder_mirrors_the_encoder(encoder_options):
    method = _method("method=autoencoder", "data.image_size=28", f"encoder.options={encoder_options}")
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(method.decoder) == convs(method.encoder)
    assert method.decoder.grid == method.encoder.backbone.grid
    assert method.decoder(torch.randn(2, 64)).shape == (2, 1, 28, 28)


def test_bad_autoencoder_settings_are_config_errors():
    with pytest.raises(ConfigError, match="topk=20.*code_dim=16"):
        _method(*AE, "method.topk=20")
    with pytest.raises(ConfigError, match="input_mask_patch=5 does not divide"):
        _method(*AE, "method.input_mask_ratio=0.5", "method.input_mask_patch=5")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(overrides=["method.sparsity=3"])


# --------------------------------------------------------------------------- MAE


def _patch_embeddings_by_hand(encoder, x):
    """PatchEmbed's conv as a matrix product on patchify's (row, column, channel) flattening."""
    proj = encoder.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)
    return patchify(x, encoder.patch_size) @ weight.T + proj.bias


def test_mae_encoder_sees_exactly_the_visible_patches():
    method = _method(*MAE_TINY).eval()
    enc, x = method.encoder, _images(3)
    seen = []
    enc.trunk.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        method.encode_visible(x, torch.Generator().manual_seed(11))
        ids_keep, _, mask = mae_shuffle(3, 16, 0.75, torch.Generator().manual_seed(11))
        embedded = _patch_embeddings_by_hand(enc, x) + enc.pos_embed[:, 1:]
        cls = enc.cls_token[0, 0] + enc.pos_embed[0, 0]
    (tokens,) = seen
    assert tokens.shape == (3, 1 + 4, enc.dim)  # [CLS] + 16 − round(0.75·16) patches
    for b in range(3):
        torch.testing.assert_close(tokens[b, 0], cls)
        for j, patch in enumerate(ids_keep[b].tolist()):
            assert not mask[b, patch]
            torch.testing.assert_close(tokens[b, 1 + j], embedded[b, patch], atol=1e-5, rtol=1e-5)


def test_mae_masked_pixels_cannot_reach_the_encoder():
    method = _method(*MAE_TINY).eval()
    x = _images(3)
    with torch.no_grad():
        latent, mask, ids_restore = method.encode_visible(x, torch.Generator().manual_seed(2))
        pred = method.decoder(latent, ids_restore)
        # new pixels in every removed patch, the visible ones untouched
        patches = patchify(x, 4)
        patches[mask] = torch.rand(int(mask.sum()), 16, generator=torch.Generator().manual_seed(8))
        x_changed = unpatchify(patches, 4)
        latent2, mask2, _ = method.encode_visible(x_changed, torch.Generator().manual_seed(2))
        pred2 = method.decoder(latent2, ids_restore)
        assert torch.equal(mask, mask2)
        torch.testing.assert_close(latent2, latent, atol=0, rtol=0)
        torch.testing.assert_close(pred2, pred, atol=0, rtol=0)
        # control: a change in one visible patch does reach it
        patches = patchify(x, 4)
        patches[0, int((~mask[0]).nonzero()[0])] += 1.0
        latent3, _, _ = method.encode_visible(unpatchify(patches, 4), torch.Generator().manual_seed(2))
        assert not torch.allclose(latent3, latent)


def test_mae_decoder_puts_each_token_back_at_its_patch():
    method = _method(*MAE_TINY).eval()
    dec, x = method.decoder, _images(2)
    seen = []
    dec.trunk.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        latent, mask, ids_restore = method.encode_visible(x, torch.Generator().manual_seed(4))
        method.decoder(latent, ids_restore)
        ids_keep, _, _ = mae_shuffle(2, 16, 0.75, torch.Generator().manual_seed(4))
        embedded = dec.embed(latent)
    (tokens,) = seen
    pos = torch.cat([torch.zeros(1, 32), sincos_2d(32, 4)])
    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], embedded[b, 0] + pos[0])
        for j, patch in enumerate(ids_keep[b].tolist()):
            torch.testing.assert_close(tokens[b, 1 + patch], embedded[b, 1 + j] + pos[1 + patch])
        for patch in mask[b].nonzero().flatten().tolist():
            torch.testing.assert_close(tokens[b, 1 + patch], dec.mask_token[0, 0] + pos[1 + patch])


def test_sincos_positions_follow_the_formula():
    pe = sincos_2d(8, 3)  # dim/4 = 2 frequencies: ω = 1, 1/100
    for row in range(3):
        for col in range(3):
            expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                        math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
            assert pe[row * 3 + col].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_is_masked_mse_against_the_chosen_target(norm_pix):
    method = _method(*MAE_TINY, f"method.norm_pix_loss={str(norm_pix).lower()}").eval()
    x = _images(3)
    loss, _ = method({"images": x}, torch.Generator().manual_seed(6))
    latent, mask, ids_restore = method.encode_visible(x, torch.Generator().manual_seed(6))
    target = patchify(x, 4)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((method.decoder(latent, ids_restore) - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask].mean())


def test_vit_forward_visible_with_every_patch_is_the_full_forward():
    method = _method(*MAE_TINY, "encoder.options={depth: 2, pool: mean}").eval()
    enc, x = method.encoder, _images(2)
    with torch.no_grad():
        full = enc.forward_tokens(x)
        torch.testing.assert_close(enc.forward_visible(x, torch.arange(16).expand(2, 16)), full)
        torch.testing.assert_close(enc(x), full[:, 1:].mean(1))


def test_bad_mae_settings_are_config_errors():
    with pytest.raises(ConfigError, match="needs a ViT encoder"):
        _method("method=mae", "data.image_size=16")
    with pytest.raises(ConfigError, match="removes none of the 16 patches"):
        _method(*MAE_TINY, "method.mask_ratio=0.01")
    with pytest.raises(ConfigError, match="pool must be"):
        _method(*MAE_TINY, "encoder.options={pool: max}")


# --------------------------------------------------------------------------- through the one trainer


@pytest.fixture(scope="module")
def tiny_digits():
    digits = load_source(DataConfig(source="digits", image_size=16))
    return ImageSet(digits.images[:32], torch.full((32,), -1), [])


TRAIN = ["train.steps=20", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1",
         "train.checkpoint_every=100", "train.lr=3e-3"]


@pytest.mark.parametrize(
    "variant",
    [
        [*AE],  # dimension bottleneck alone
        [*AE, "method.code_noise=0.3"],
        [*AE, "method.input_noise=0.3", "method.input_mask_ratio=0.3"],
        [*AE, "method.topk=4"],
        [*AE, "method.l1=0.01", "method.reconstruction=mse"],
        [*AE, "method.decoder=linear"],
        [*MAE_TINY, "method.norm_pix_loss=true"],
    ],
    ids=["dim", "code-noise", "denoise", "topk", "l1", "weak", "mae"],
)
def test_each_variant_trains_through_the_trainer(tmp_path, tiny_digits, variant):
    # One batch of all 32 images: every step sees the same set, so the loss should fall.
    cfg = load_config(overrides=[f"out={tmp_path}", "name=run", *variant, *TRAIN])
    result = pretrain(cfg, tiny_digits, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert statistics.fmean(losses[-3:]) < 0.9 * statistics.fmean(losses[:3]), losses


@pytest.mark.parametrize(
    "recipe",
    ["ae-omniglot", "ae-noise-omniglot", "ae-denoise-omniglot", "ae-sparse-omniglot", "ae-weak-omniglot",
     "mae-omniglot", "ae-digits", "mae-digits"],
)
def test_recipes_build_their_method(recipe):
    cfg = load_config(find_recipe(recipe))
    method = build_method(cfg)
    x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    loss, _ = method({"images": x}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and method.encoder.eval()(x).shape == (2, method.encoder.dim)
