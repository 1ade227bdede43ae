"""Two-view augmentation recipes for contrastive pre-training, applied to whole batches.

A recipe turns a batch ``x`` of shape (B, C, H, W), float32 in [0, 1] with the foreground
bright, into a batch of random views of shape (B, C, image_size, image_size), still in
[0, 1]. Each image gets its own random draw, but the work is done with batched tensor ops
(one ``grid_sample`` for all geometry, per-image parameter tensors for colour and blur), so
a batch of 256 small images costs a few milliseconds on a CPU. torchvision's v2 transforms
are not used for the random part because, handed a batch, they apply one draw to all of it;
its functional ops serve as references in the tests (per-image sigmas and factors do not
fit them, and grey as a batched matmul is cheaper than rgb_to_grayscale plus a select).

Sampling is bilinear without antialiasing: inputs should already be about image_size
(resize once when loading); a large downscale here would alias.

Randomness: every random number is drawn on the CPU from the ``torch.Generator`` passed in
(the trainer owns and checkpoints it), in a fixed order that does not depend on the device,
so the same generator state gives the same views. Parameters are then moved to ``x.device``
and the image math runs there, so CUDA batches work too.

Recipes (see :func:`make_views`): ``"simclr"``, ``"characters"``, ``"none"``
(:mod:`~fewshot.data.views.recipes`, built from :mod:`~fewshot.data.views.kernels`) and the
learned ``"viewmaker"`` (:mod:`~fewshot.data.views.viewmaker`). A new recipe is one
:class:`ViewRecipe` subclass and one :func:`register_views` call.
"""

from __future__ import annotations

import inspect

from fewshot.data.views.recipes import CharacterViews, IdentityViews, SimCLRViews, ViewRecipe
from fewshot.data.views.viewmaker import ViewmakerViews
from fewshot.errors import ConfigError

__all__ = [
    "VIEW_RECIPES",
    "CharacterViews",
    "IdentityViews",
    "SimCLRViews",
    "ViewRecipe",
    "ViewmakerViews",
    "make_views",
    "register_views",
]

_RECIPES: dict[str, type[ViewRecipe]] = {}
VIEW_RECIPES: list[str] = []  # the registered names, in registration order


def register_views(name: str, recipe: type[ViewRecipe]) -> type[ViewRecipe]:
    """Make ``views.name=<name>`` build ``recipe(image_size, [channels,] **options)``."""
    if not (isinstance(recipe, type) and issubclass(recipe, ViewRecipe)):
        raise TypeError(f"view recipe '{name}' must subclass ViewRecipe")
    if name not in _RECIPES:
        VIEW_RECIPES.append(name)
    _RECIPES[name] = recipe
    return recipe


for _recipe in (SimCLRViews, CharacterViews, IdentityViews, ViewmakerViews):
    register_views(_recipe.name, _recipe)


def make_views(name: str, image_size: int, channels: int, **options: object) -> ViewRecipe:
    """The view recipe called ``name`` (one of VIEW_RECIPES) producing image_size² views of
    ``channels``-channel images (the data's; recipes that build layers for it, the viewmaker, take it).
    Unknown names and options raise ConfigError; so do out-of-range option values.
    """
    cls = _RECIPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown view recipe {name!r}; known recipes: {', '.join(VIEW_RECIPES)}")
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "image_size", "channels")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for view recipe {name!r}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )
    if "channels" in params:
        options = {**options, "channels": channels}
    return cls(image_size, **options)
