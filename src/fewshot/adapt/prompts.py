"""Prompt-based adaptation of a frozen encoder: learned inputs, the encoder untouched.

Every wrapper here is ``Wrapper(encoder, **options)``: it keeps the encoder as ``.base`` with all
its parameters frozen (and in eval mode, so BatchNorm keeps its pre-trained statistics), has
``.dim = encoder.dim``, maps images (B, C, H, W) to r (B, dim), and trains only its own parameters.
Prompt tokens go through the ViT's own token trunk (extra tokens, deep prompts or past keys and
values); r is the ViT's own pooling of its [CLS] + patch outputs, prompt outputs dropped.

- :class:`PromptTuning` (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"; on a ViT's patch tokens it is VPT-shallow, Jia et al. 2022, "Visual Prompt Tuning",
  hence the alias :data:`VisualPromptTuning`): n learned tokens P ∈ R^{n×D} enter once,
  ``z_0 = [P, x_cls, E + pos]``, ``z_l = Block_l(z_{l-1})``, r = LN(z_L)[CLS].
- :class:`DeepPromptTuning` (VPT-deep, Jia et al. 2022; P-tuning v2, Liu et al. 2022): fresh
  prompts P_l at every layer's input, replacing the previous layer's prompt outputs,
  ``[_, x_cls, E]_l = Block_l([P_{l-1}, x_cls, E]_{l-1})``.
- :class:`PrefixTuning` (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"): per-layer keys and values P_l = (K_l, V_l) ∈ R^{n×D} prepended inside attention,
  ``head = softmax(Q [K_l; K]ᵀ/√d) [V_l; V]``, reparameterised during training as
  ``P = MLP(P')`` with a smaller P' ∈ R^{n×e}; :meth:`PrefixTuning.materialize` drops the MLP.
- :class:`PaddingPrompt` (Bahng et al. 2022, "Exploring Visual Prompts for Adapting Large-Scale
  Models"): a learned border of width p in pixel space, ``x' = x + φ`` with φ zero inside the
  central (H−2p)×(W−2p) window; any image encoder (conv4, resnet18, ViT).

Prompt tokens get no position embedding (as in VPT and the PGN code), so for the non-causal ViT
where they sit in the sequence does not change r; they go first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewshot.errors import ConfigError, DataError, EncoderMismatch

VIT_PARTS = ("patch_embed", "input_tokens", "trunk", "pool_tokens")


def check_int(who: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{who}: {name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def require_vit(encoder: nn.Module, who: str) -> None:
    missing = [part for part in VIT_PARTS if not hasattr(encoder, part)]
    if missing:
        raise EncoderMismatch(
            f"{who} needs a ViT encoder ({', '.join(VIT_PARTS)}); {type(encoder).__name__} has no {', '.join(missing)}"
        )


class PromptWrapper(nn.Module):
    """Holds the frozen encoder as ``.base``; subclasses add the trainable prompt parameters."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        dim = getattr(encoder, "dim", None)
        if not isinstance(encoder, nn.Module) or not isinstance(dim, int):
            raise ConfigError(f"{type(self).__name__} needs an encoder module with an integer .dim, got {type(encoder).__name__}")
        encoder.requires_grad_(False)
        self.base = encoder
        self.dim = dim
        self.base.eval()

    def train(self, mode: bool = True) -> PromptWrapper:
        super().train(mode)
        self.base.eval()  # frozen means frozen: no BatchNorm statistics drift, no dropout
        return self


def prompted(vit: nn.Module, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Shallow prompts (B, n, D) enter the ViT's trunk first, beside its tokens: r (B, D) of the rest."""
    out = vit.trunk(torch.cat([prompts, vit.input_tokens(images)], dim=1))
    return vit.pool_tokens(out[:, prompts.shape[1] :])


def vpt_init(vit: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """VPT's prompt init: U(−a, a), a = √(6 / (C·p² + D)), Xavier-uniform for the patch projection
    (Jia et al. 2022 code, there with C = 3). Draws from the global generator, like nn.Linear."""
    proj = vit.patch_embed.proj
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    bound = math.sqrt(6.0 / (fan_in + shape[-1]))
    return torch.empty(shape).uniform_(-bound, bound)


class PromptTuning(PromptWrapper):
    """Prompt tuning (Lester et al. 2021) = VPT-shallow on a ViT (Jia et al. 2022).

    ``z_0 = [P, x_cls, E + pos]``, P ∈ R^{n×D} learned (no position), frozen blocks on top,
    r = LN(z_L)[CLS]. Trainable: n·D. ``n_prompts=0`` is the base encoder.
    """

    def __init__(self, encoder: nn.Module, *, n_prompts: int = 8) -> None:
        super().__init__(encoder)
        require_vit(encoder, "prompt tuning")
        n = check_int("prompt tuning", "n_prompts", n_prompts, 0)
        self.prompts = nn.Parameter(vpt_init(encoder, (1, n, self.dim)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return prompted(self.base, images, self.prompts.expand(images.shape[0], -1, -1))


VisualPromptTuning = PromptTuning
"""VPT-shallow (Jia et al. 2022) is prompt tuning applied to the ViT's patch tokens: one class."""


class DeepPromptTuning(PromptWrapper):
    """Deep prompt tuning: VPT-deep (Jia et al. 2022), P-tuning v2 (Liu et al. 2022).

    Layer l reads ``[P_l, x_cls, E]`` where P_l ∈ R^{n×D} is its own learned prompt and the
    previous layer's outputs at the prompt positions are discarded; r = LN(z_L)[CLS].
    Trainable: depth·n·D. ``n_prompts=0`` is the base encoder.
    """

    def __init__(self, encoder: nn.Module, *, n_prompts: int = 8) -> None:
        super().__init__(encoder)
        require_vit(encoder, "deep prompt tuning")
        n = check_int("deep prompt tuning", "n_prompts", n_prompts, 0)
        self.prompts = nn.Parameter(vpt_init(encoder, (len(encoder.trunk.blocks), n, self.dim)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts[:, None].expand(-1, images.shape[0], -1, -1)  # (depth, B, n, D)
        return self.base.pool_tokens(self.base.trunk(self.base.input_tokens(images), prompts=prompts))


class PrefixTuning(PromptWrapper):
    """Prefix tuning (Li & Liang 2021) on the ViT's attention.

    Each block l attends over learned keys/values before its own:
    ``Attn_l(x) = softmax(Q [K_l; K]ᵀ / √d_h) [V_l; V]`` per head, (K_l, V_l) ∈ R^{n×D} split into
    heads, passed to the frozen Block as ``past``. With ``reparam`` (the paper's stabiliser) the
    table is ``P = MLP(P')``: P' ∈ R^{n×e}, MLP = Linear(e, h) → tanh → Linear(h, depth·2·D);
    :meth:`materialize` stores P itself and drops P' and the MLP (same outputs).
    Trainable: n·e + e·h + h + h·2LD + 2LD with the MLP, 2·L·n·D without. ``n_prefix=0`` is the base.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        n_prefix: int = 8,
        reparam: bool = True,
        embed_dim: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__(encoder)
        who = "prefix tuning"
        require_vit(encoder, who)
        n = check_int(who, "n_prefix", n_prefix, 0)
        if not isinstance(reparam, bool):
            raise ConfigError(f"{who}: reparam must be true or false, got {reparam!r}")
        if not reparam and (embed_dim is not None or hidden is not None):
            raise ConfigError(f"{who}: embed_dim and hidden size the reparameterisation MLP; set reparam=true or drop them")
        for block in encoder.trunk.blocks:
            if self.dim % block.attn.heads:
                raise ConfigError(f"{who}: dim {self.dim} is not divisible by {block.attn.heads} heads")
        self.n_prefix, self.depth = n, len(encoder.trunk.blocks)
        if reparam:
            # Defaults: P' at half the width (the paper only asks for smaller), MLP hidden = D as in PEFT.
            e = check_int(who, "embed_dim", self.dim // 2 if embed_dim is None else embed_dim, 1)
            h = check_int(who, "hidden", self.dim if hidden is None else hidden, 1)
            self.embedding = nn.Parameter(torch.randn(n, e))  # nn.Embedding's N(0, 1), as PEFT's prefix encoder
            self.mlp = nn.Sequential(nn.Linear(e, h), nn.Tanh(), nn.Linear(h, self.depth * 2 * self.dim))
            self.register_parameter("prefix", None)
        else:
            self.register_parameter("embedding", None)
            self.mlp = None
            self.prefix = nn.Parameter(torch.randn(self.depth, 2, n, self.dim) * 0.02)

    def prefix_table(self) -> torch.Tensor:
        """Keys and values of every layer: (depth, 2, n, D), [:, 0] keys and [:, 1] values."""
        if self.prefix is not None:
            return self.prefix
        return self.mlp(self.embedding).view(self.n_prefix, self.depth, 2, self.dim).permute(1, 2, 0, 3)

    def past(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, (K_l, V_l) shaped as Attention's ``past``: (B, heads, n, D/heads) each."""
        table, out = self.prefix_table(), []
        for layer, block in enumerate(self.base.trunk.blocks):
            h = block.attn.heads
            k, v = table[layer].view(2, self.n_prefix, h, self.dim // h).transpose(1, 2)  # 2 × (h, n, D/h)
            out.append((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
        return out

    @torch.no_grad()
    def materialize(self) -> PrefixTuning:
        """Replace P' and the MLP by the table P = MLP(P') they produce (inference, or direct tuning)."""
        if self.prefix is None:
            table = self.prefix_table().detach().clone()
            self.embedding, self.mlp = None, None
            self.prefix = nn.Parameter(table)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.pool_tokens(self.base.trunk(self.base.input_tokens(images), past=self.past(images.shape[0])))


def first_conv_channels(encoder: nn.Module) -> int | None:
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


class PaddingPrompt(PromptWrapper):
    """Pixel-space padding prompt (Bahng et al. 2022): ``r = f(x + φ)``.

    φ ∈ R^{C×S×S} is learned on a border of width p and zero in the central (S−2p)² window, so the
    image's interior reaches the frozen encoder untouched. Trainable: C·(S² − (S−2p)²), stored as
    the paper's four strips (top, bottom: p×S; left, right: (S−2p)×p), drawn N(0, 1) as in its code.
    ``image_size``/``in_channels`` default to what the encoder reveals (a ViT's patch grid, the
    first convolution's input channels).
    """

    def __init__(
        self, encoder: nn.Module, *, pad: int = 3, image_size: int | None = None, in_channels: int | None = None
    ) -> None:
        super().__init__(encoder)
        who = "padding prompt"
        if image_size is None and hasattr(encoder, "patch_embed"):
            grid = math.isqrt(encoder.patch_embed.num_patches)
            image_size = grid * encoder.patch_embed.proj.kernel_size[0]
        if image_size is None:
            raise ConfigError(f"{who}: pass image_size; {type(encoder).__name__} does not record its input size")
        in_channels = first_conv_channels(encoder) if in_channels is None else in_channels
        if in_channels is None:
            raise ConfigError(f"{who}: pass in_channels; {type(encoder).__name__} has no convolution to read it from")
        s = check_int(who, "image_size", image_size, 1)
        c = check_int(who, "in_channels", in_channels, 1)
        p = check_int(who, "pad", pad, 1)
        if 2 * p >= s:
            raise ConfigError(f"{who}: pad {p} leaves no interior in {s} px images; use pad < {(s + 1) // 2}")
        self.pad, self.image_size, self.in_channels = p, s, c
        self.pad_up = nn.Parameter(torch.randn(1, c, p, s))
        self.pad_down = nn.Parameter(torch.randn(1, c, p, s))
        self.pad_left = nn.Parameter(torch.randn(1, c, s - 2 * p, p))
        self.pad_right = nn.Parameter(torch.randn(1, c, s - 2 * p, p))

    def prompt_image(self) -> torch.Tensor:
        """φ: (1, C, S, S), zero in the interior."""
        p, s = self.pad, self.image_size
        interior = self.pad_up.new_zeros(1, self.in_channels, s - 2 * p, s - 2 * p)
        middle = torch.cat([self.pad_left, interior, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise DataError(f"padding prompt expects images (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return self.base(images + self.prompt_image())
