"""Ordered data: sequences of frames for time-contrastive learning (TCN, R3M).

A :class:`SequenceSet` holds ``N`` sequences of ``T`` frames each as one tensor
(N, T, C, H, W); the trainer draws whole sequences (``batch(idx)``) and the method picks the
frames it needs. Two sources:

* :func:`load_sequence_folder`: ``root/SEQUENCE/FRAME`` image files, frames in name order
  (numbers in names sort numerically), decoded like every other image file
  (:func:`fewshot.data.sources.decode_image`);
* :func:`moving_shapes`: generated sequences of one shape each moving with constant
  velocity, bouncing off the canvas edges, turning and growing or shrinking. The shape is the
  sequence's label, so held-out shapes give few-shot evaluation classes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from fewshot.data.image_files import check_image_args, folder_tree, is_image, read_images
from fewshot.data.types import ImageSet
from fewshot.errors import DataError

__all__ = ["SHAPES", "SequenceSet", "load_sequence_folder", "moving_shapes"]


@dataclass
class SequenceSet:
    """Sequences of frames held in memory; a :class:`~fewshot.data.types.TrainingData`.

    frames: (N, T, C, H, W) float32 in [0, 1], foreground bright; T ≥ 2 frames per sequence.
    labels: (N,) int64 indices into ``classes`` (one label per sequence); all -1 when unlabeled.
    classes: class names (empty when unlabeled).
    """

    frames: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.frames.ndim != 5 or self.frames.shape[1] < 2:
            raise ValueError(f"frames must be (N, T, C, H, W) with T >= 2, got shape {tuple(self.frames.shape)}")
        if self.labels.shape != (self.frames.shape[0],):
            raise ValueError(f"labels must be ({self.frames.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"frames": (B, T, C, H, W), "labels": (B,)}`` of the sequences ``idx`` (no labels when unlabeled)."""
        return {"frames": self.frames[idx], "labels": self.labels[idx]} if self.labeled else {"frames": self.frames[idx]}

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"frames", "labels"} if self.labeled else {"frames"})

    @property
    def labeled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    @property
    def num_frames(self) -> int:
        return self.frames.shape[1]

    def select_classes(self, class_indices: list[int]) -> "SequenceSet":
        """The sequences of the given classes, relabelled 0..len(class_indices)-1 in that order."""
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[torch.as_tensor(class_indices, dtype=torch.long)] = torch.arange(len(class_indices))
        keep = remap[self.labels] >= 0
        return SequenceSet(self.frames[keep], remap[self.labels[keep]], [self.classes[i] for i in class_indices])

    def as_images(self, frame: int | None = None) -> ImageSet:
        """An :class:`ImageSet` of every frame (``frame=None``, sequence by sequence) or of frame
        ``frame`` of each sequence; each image keeps its sequence's label."""
        n, t = self.frames.shape[:2]
        if frame is None:
            return ImageSet(self.frames.flatten(0, 1), self.labels.repeat_interleave(t), list(self.classes))
        if not -t <= frame < t:
            raise DataError(f"frame {frame} is out of range for sequences of {t} frames")
        return ImageSet(self.frames[:, frame], self.labels.clone(), list(self.classes))


# ----------------------------------------------------------------------------- folder of sequences

SEQUENCE_LAYOUT = "SEQUENCE/FRAME (one folder per sequence, its frames inside, in name order)"


def load_sequence_folder(
    path: str | os.PathLike[str],
    image_size: int,
    channels: int = 1,
    invert: bool = False,
    frames: int | None = None,
) -> SequenceSet:
    """Unlabeled sequences from ``path/SEQUENCE/FRAME`` image files.

    Every non-hidden subfolder of ``path`` is a sequence (sorted by name, numbers
    numerically); the images directly inside it are its frames in name order (png, jpg,
    jpeg, bmp, gif, webp; other files are ignored). ``frames=None`` keeps every frame, and
    then all sequences must have the same number; ``frames=N`` keeps the first N of each.
    Frames are decoded like :func:`fewshot.data.sources.load_image_folder` images.

    Raises:
        DataError: naming the folder or file: no sequence folders, an image outside a sequence
            folder, a sequence with fewer than 2 (or ``frames``) frames, sequences of different
            lengths with ``frames=None``, or an unreadable image.
    """
    check_image_args(image_size, channels)
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
        raise DataError(f"frames must be an integer >= 2 (or None for all), got {frames!r}")
    with folder_tree(path) as tree:
        seq_dirs = [d for d in tree.dirs if "/" not in d]
        per_seq: dict[str, list[str]] = {d: [] for d in seq_dirs}
        for name in tree.files:
            if not is_image(name):
                continue
            parts = name.split("/")
            if len(parts) == 1:
                raise DataError(f"image '{name}' lies directly in {tree.path}; expected the layout {SEQUENCE_LAYOUT}")
            if len(parts) > 2:
                raise DataError(
                    f"image '{name}' in {tree.path} lies in a subfolder of sequence '{parts[0]}'; "
                    f"frames must lie directly in their sequence folder ({SEQUENCE_LAYOUT})"
                )
            per_seq[parts[0]].append(name)
        if not seq_dirs:
            raise DataError(f"no sequence folders in {tree.path}; expected the layout {SEQUENCE_LAYOUT}")
        need = 2 if frames is None else frames
        for d in seq_dirs:
            if len(per_seq[d]) < need:
                raise DataError(
                    f"sequence folder '{d}' in {tree.path} has {len(per_seq[d])} frame image(s); at least {need} needed"
                )
        length = frames if frames is not None else len(per_seq[seq_dirs[0]])
        for d in seq_dirs:
            if frames is None and len(per_seq[d]) != length:
                raise DataError(
                    f"sequence folder '{d}' in {tree.path} has {len(per_seq[d])} frames, '{seq_dirs[0]}' has {length}; "
                    f"set data.frames to keep the first N frames of each"
                )
        names = [n for d in seq_dirs for n in per_seq[d][:length]]  # tree.files is already in natural order
        images = read_images(tree, names, image_size, channels, invert)
    return SequenceSet(images.reshape(len(seq_dirs), length, *images.shape[1:]), torch.full((len(seq_dirs),), -1), [])


# ----------------------------------------------------------------------------- moving shapes


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outer, inner_pts = _regular(points), _regular(points, inner, math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


# Each shape: polygons in unit coordinates (about radius 1, y down), drawn in order with their
# fill (1 = ink, 0 = cut out). No two shapes are rotations of each other (the sequences rotate),
# so a square and a diamond, or a plus and an X, would be one class.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_regular(48, 0.9), 1)],
    "square": [([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)], 1)],
    "triangle": [(_regular(3), 1)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 1)],
    "star": [(_star(5, 0.45), 1)],
    "ring": [(_regular(48, 1.0), 1), (_regular(48, 0.55), 0)],
    "ell": [([(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.7, 0.45), (0.7, 1), (-0.7, 1)], 1)],
    "tee": [([(-1, -0.8), (1, -0.8), (1, -0.25), (0.28, -0.25), (0.28, 1), (-0.28, 1), (-0.28, -0.25), (-1, -0.25)], 1)],
    "half-disc": [([(math.cos(a), 0.4 - math.sin(a)) for a in np.linspace(0, math.pi, 25)], 1)],
    "arrow": [([(0, -1), (0.8, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.8, -0.1)], 1)],
}

_SUPERSAMPLE = 4  # draw at 4× and area-average down: anti-aliased edges, as sources.decode_image resizes


def _fold(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Reflect ``u`` into [lo, hi] (a triangle wave): constant velocity bouncing off both walls."""
    span = hi - lo
    m = np.mod(u - lo, 2 * span)
    return lo + np.where(m <= span, m, 2 * span - m)


def _draw(shape: list[tuple[list[tuple[float, float]], int]], size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(angle), math.sin(angle)
    for points, fill in shape:
        xy = [((cx + r * (c * x - s * y)) * big, (cy + r * (s * x + c * y)) * big) for x, y in points]
        draw.polygon(xy, fill=255 * fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def moving_shapes(
    n_sequences: int,
    frames: int = 16,
    size: int = 28,
    seed: int = 0,
    channels: int = 1,
    shapes: list[str] | None = None,
) -> SequenceSet:
    """Generated sequences of one bright shape moving on a black canvas; label = the shape.

    Per sequence, drawn from ``numpy.random.default_rng(seed)`` (the same on every machine):
    the shape (classes balanced: sequence i gets shape i mod K, then the order is shuffled),
    a radius r₀ ∈ [0.16, 0.24]·size and a growth of ±0.008·size per frame, bouncing between
    0.14 and 0.28·size; a start angle and a turn of ±(3°..15°) per frame; a start position and a
    velocity of 0.03–0.08·size per frame in a random direction, the centre bouncing off the walls
    so the shape stays on the canvas (position, radius: a reflected straight line, so speeds are
    constant). Frames are drawn at 4× and area-averaged to ``size`` (anti-aliased).

    Args:
        n_sequences: N ≥ 1.
        frames: T ≥ 2 frames per sequence.
        size: canvas side in pixels (≥ 8).
        seed: seed of every random draw.
        channels: 1, or 3 (the grey frame repeated).
        shapes: names from :data:`SHAPES` (default all, in that order).

    Returns:
        A labeled :class:`SequenceSet` of frames (N, T, channels, size, size); ``classes`` are the shape names.
    """
    names = list(SHAPES) if shapes is None else list(shapes)
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names:
        raise DataError(f"unknown shape(s) {unknown or names}; known shapes: {', '.join(SHAPES)}")
    for what, value, low in (("n_sequences", n_sequences, 1), ("frames", frames, 2), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"moving_shapes: {what} must be an integer >= {low}, got {value!r}")
    check_image_args(size, channels)
    rng = np.random.default_rng(seed)
    n, k = n_sequences, len(names)
    labels = rng.permutation(np.arange(n) % k)
    r_lo, r_hi = 0.14, 0.28
    r0 = rng.uniform(0.16, 0.24, n)
    dr = rng.uniform(-0.008, 0.008, n)
    a0 = rng.uniform(0, 2 * math.pi, n)
    da = rng.uniform(math.radians(3), math.radians(15), n) * rng.choice([-1.0, 1.0], n)
    speed = rng.uniform(0.03, 0.08, n)
    heading = rng.uniform(0, 2 * math.pi, n)
    p0 = rng.uniform(0.3, 0.7, (n, 2))

    t = np.arange(frames)[None, :]
    radius = _fold(r0[:, None] + dr[:, None] * t, np.full((n, 1), r_lo), np.full((n, 1), r_hi))
    angle = a0[:, None] + da[:, None] * t
    # The centre bounces between the largest radius and 1 minus it, so a shape stays on the canvas
    # (bar the corners of the few shapes whose vertices reach past radius 1).
    wall = np.full((n, 1), r_hi)
    x = _fold(p0[:, :1] + speed[:, None] * np.cos(heading)[:, None] * t, wall, 1 - wall)
    y = _fold(p0[:, 1:] + speed[:, None] * np.sin(heading)[:, None] * t, wall, 1 - wall)

    out = np.empty((n, frames, 1, size, size), dtype=np.float32)
    for i in range(n):
        shape = SHAPES[names[labels[i]]]
        for j in range(frames):
            out[i, j, 0] = _draw(shape, size, x[i, j], y[i, j], radius[i, j], angle[i, j])
    tensor = torch.from_numpy(out)
    if channels == 3:
        tensor = tensor.expand(-1, -1, 3, -1, -1).contiguous()
    return SequenceSet(tensor, torch.from_numpy(labels.astype(np.int64)), names)
