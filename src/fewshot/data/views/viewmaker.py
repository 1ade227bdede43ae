"""Viewmaker views: augmentations learned adversarially (Tamkin et al. 2021, "Viewmaker
Networks: Learning Views for Unsupervised Representation Learning", ICLR).

A small conv network looks at the image and at random-noise channels and outputs a
perturbation δ of the image's shape, projected onto the L1 sphere of radius ε·C·H·W (the
paper's distortion budget: the mean absolute change per pixel and channel is ε):

    δ = ε·C·H·W · t / ‖t‖₁,   t = tanh(viewmaker(x, noise)),   view = clamp(x + δ, 0, 1)

The viewmaker is trained to *maximise* the contrastive loss the encoder minimises. Instead of
the paper's second optimizer, δ passes through a gradient reversal (identity forward, −grad
backward), so the trainer's one optimizer descends the loss for the encoder and ascends it for
the viewmaker. As an ``nn.Module`` held by the method (``TwoViewMethod.views``), the
viewmaker's weights are trained, saved in the checkpoint and restored on resume.

The network follows the paper's (Johnson et al.'s style-transfer net: a conv stem, residual
blocks with instance norm, fresh noise channels concatenated before the stem and before each
block) at a small scale and full resolution: ``width`` channels, ``depth`` blocks, no
down/upsampling (the images are 28–84 px, not 224).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.views.kernels import check_batch, check_number
from fewshot.data.views.recipes import ViewRecipe
from fewshot.errors import ConfigError

__all__ = ["ViewmakerViews", "l1_sphere", "reverse_gradient"]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """Identity in the forward pass; the gradient is negated on the way back (Ganin & Lempitsky 2015)."""
    return _ReverseGradient.apply(x)


def l1_sphere(t: Tensor, budget: float) -> Tensor:
    """Scale each sample of ``t`` (B, ...) to L1 norm ``budget``·(elements per sample): δ = ε·n·t/‖t‖₁.

    Computed in float32 (bf16 sums over 784+ elements lose digits); an all-zero sample stays zero.
    """
    flat = t.float().flatten(1)
    norm = flat.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat * (budget * flat.shape[1] / norm)).reshape(t.shape).to(t.dtype)


class _Block(nn.Module):
    """Residual block on [features, noise]: conv → IN → ReLU → conv → IN, plus the features."""

    def __init__(self, width: int, noise: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width + noise, width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(width, affine=True),
        )

    def forward(self, y: Tensor, noise: Tensor) -> Tensor:
        return y + self.body(torch.cat([y, noise], dim=1))


class ViewmakerViews(ViewRecipe):
    """``"viewmaker"``: views x + δ from a learned, adversarial perturbation network.

    Options:

    - budget=0.05: distortion budget ε, the mean |δ| per pixel and channel (paper: 0.05 for
      images); ‖δ‖₁ = ε·C·H·W exactly for every image, before the clamp to [0, 1].
    - noise=1: uniform-noise channels concatenated before the stem and before each block
      (paper's code: 1); the noise is what makes two views of one image differ, so ≥ 1.
    - width=32: channels of the network (paper: 32–128 in a deeper net).
    - depth=3: residual blocks (paper: 5).

    ``channels`` is the data's (passed by :func:`~fewshot.data.views.make_views` from
    ``data.channels``), not a user option.
    """

    name = "viewmaker"

    def __init__(
        self, image_size: int, *, channels: int = 1, budget: float = 0.05, noise: int = 1, width: int = 32, depth: int = 3
    ) -> None:
        super().__init__(image_size)
        self.budget = check_number("budget", budget)
        if not 0 < self.budget <= 1:
            raise ConfigError(f"view option budget must be in (0, 1] (mean |δ| per pixel), got {budget!r}")
        for what, value, low in (("noise", noise, 1), ("width", width, 1), ("depth", depth, 0), ("channels", channels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"view option {what} must be an integer >= {low}, got {value!r}")
        self.channels, self.noise, self.width, self.depth = channels, noise, width, depth
        self.stem = nn.Sequential(
            nn.Conv2d(channels + noise, width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList(_Block(width, noise) for _ in range(depth))
        self.head = nn.Conv2d(width, channels, 3, padding=1, padding_mode="reflect")

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, channels={self.channels}, budget={self.budget}, noise={self.noise}"

    def _resize(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    def perturbation(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """δ for every image of x (B, C, H, W), ‖δ_b‖₁ = ε·C·H·W; no gradient reversal here."""
        check_batch(x, generator)
        if x.shape[1] != self.channels:
            raise ValueError(f"this viewmaker was built for {self.channels}-channel images, got {x.shape[1]}")
        b, _, h, w = x.shape
        # One draw on the CPU for every layer's noise, then one copy to x's device (as views.py does).
        noise = torch.rand(b, self.noise * (self.depth + 1), h, w, generator=generator).to(x.device, x.dtype)
        chunks = noise.split(self.noise, dim=1)
        y = self.stem(torch.cat([x, chunks[0]], dim=1))
        for block, n in zip(self.blocks, chunks[1:]):
            y = block(y, n)
        return l1_sphere(torch.tanh(self.head(y)), self.budget)

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        x = self._resize(x)
        # Reversed: the optimizer step that lowers the loss for the encoder raises it for the viewmaker.
        return (x + reverse_gradient(self.perturbation(x, generator))).clamp(0.0, 1.0)


