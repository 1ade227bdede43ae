"""Sequence data: the moving-shapes generator, the SEQUENCE/FRAME folder loader, and the
run data (sequences for pre-training, held-out shapes as evaluation images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.config import load_config
from fewshot.data.registry import load_run_data, load_source
from fewshot.data.sequences import SHAPES, SequenceSet, load_sequence_folder, moving_shapes
from fewshot.data.types import ImageSet
from fewshot.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- moving shapes


def test_moving_shapes_is_deterministic_shaped_and_balanced() -> None:
    a = moving_shapes(30, frames=6, size=20, seed=3)
    b = moving_shapes(30, frames=6, size=20, seed=3)
    c = moving_shapes(30, frames=6, size=20, seed=4)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (30, 6, 1, 20, 20) and a.frames.dtype == torch.float32
    assert a.classes == list(SHAPES) and a.labeled and len(a) == 30
    assert a.labels.bincount(minlength=len(SHAPES)).tolist() == [3] * len(SHAPES)
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0
    # Every frame shows a shape (ink) on a black border-free canvas, and the shape moves.
    assert (a.frames.flatten(2).amax(dim=2) > 0.9).all()
    assert (a.frames[:, 0] - a.frames[:, -1]).abs().flatten(1).sum(dim=1).min() > 1.0
    assert moving_shapes(2, 3, 16, channels=3).frames.shape == (2, 3, 3, 16, 16)


def test_each_label_draws_its_own_shape() -> None:
    """Label k is SHAPES[k]: a disc fills most of its bounding box, a ring (with its hole) much less."""
    s = moving_shapes(40, frames=2, size=48, seed=0)
    circle, ring = s.classes.index("circle"), s.classes.index("ring")
    def fill(i: int) -> float:
        img = s.frames[i, 0, 0] > 0.5
        rows, cols = img.any(dim=1).nonzero(), img.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        return float(img.sum() / box)
    assert min(fill(i) for i in (s.labels == circle).nonzero()[:, 0]) > 0.7
    assert max(fill(i) for i in (s.labels == ring).nonzero()[:, 0]) < 0.65


def test_moving_shapes_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown shape"):
        moving_shapes(4, shapes=["circle", "blob"])
    with pytest.raises(DataError, match="frames"):
        moving_shapes(4, frames=1)


def test_sequence_set_contract() -> None:
    s = moving_shapes(12, frames=4, size=16, seed=1)
    batch = s.batch(torch.tensor([2, 5]))
    x, y = batch["frames"], batch["labels"]
    assert x.shape == (2, 4, 1, 16, 16) and torch.equal(y, s.labels[[2, 5]])
    sub = s.select_classes([3, 0])
    assert sub.classes == [s.classes[3], s.classes[0]]
    assert torch.equal(sub.frames, s.frames[(s.labels == 3) | (s.labels == 0)])
    assert set(sub.labels.tolist()) == {0, 1}
    all_frames = s.as_images()
    assert isinstance(all_frames, ImageSet) and all_frames.images.shape == (48, 1, 16, 16)
    assert torch.equal(all_frames.images[4 * 5 + 2], s.frames[5, 2]) and all_frames.labels[4 * 5 + 2] == s.labels[5]
    middle = s.as_images(frame=2)
    assert torch.equal(middle.images, s.frames[:, 2]) and torch.equal(middle.labels, s.labels)
    with pytest.raises(ValueError, match="T >= 2"):
        SequenceSet(torch.zeros(3, 1, 1, 8, 8), torch.zeros(3, dtype=torch.long), [])


# ----------------------------------------------------------------------------- folder loader


def _write_sequences(root, frames: torch.Tensor, names=None) -> None:
    for i, seq in enumerate(frames):
        folder = root / (names[i] if names else f"seq{i}")
        folder.mkdir(parents=True)
        for j, f in enumerate(seq):
            Image.fromarray(np.rint(f[0].numpy() * 255).astype(np.uint8), "L").save(folder / f"frame{j}.png")


def test_folder_round_trips_written_png_frames(tmp_path) -> None:
    src = moving_shapes(3, frames=11, size=16, seed=2)
    # seq10 after seq2 and frame10 after frame9: numbers sort numerically.
    _write_sequences(tmp_path, src.frames, names=["seq2", "seq10", "seq1"])
    loaded = load_sequence_folder(tmp_path, 16)
    assert loaded.frames.shape == (3, 11, 1, 16, 16) and not loaded.labeled
    expected = src.frames[[2, 0, 1]]  # seq1, seq2, seq10
    assert (loaded.frames - expected).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    first = load_sequence_folder(tmp_path, 16, frames=4)
    assert torch.equal(first.frames, loaded.frames[:, :4])


@pytest.mark.parametrize(
    "layout,kwargs,match",
    [
        ({}, {}, "no sequence folders"),
        ({"a": 3, "loose.png": None}, {}, "lies directly in"),
        ({"a": 3, "b": 0}, {}, "'b'.*0 frame"),
        ({"a": 3, "b": 1}, {}, "'b'.*1 frame"),
        ({"a": 3, "b": 4}, {}, "'b'.*4 frames.*data.frames"),
        ({"a": 3, "b": 4}, {"frames": 4}, "'a'.*3 frame.*at least 4"),
        ({"a": 3, "a/sub": 2}, {}, "subfolder of sequence 'a'"),
        ({"a": 3, "bad": "corrupt"}, {}, "bad/frame0.png"),
    ],
)
def test_bad_sequence_folders_raise_data_error(tmp_path, layout, kwargs, match) -> None:
    img = Image.new("L", (8, 8), 0)
    for name, n in layout.items():
        if n is None:
            img.save(tmp_path / name)
        elif n == "corrupt":
            (tmp_path / name).mkdir()
            (tmp_path / name / "frame0.png").write_bytes(b"not a png")
            img.save(tmp_path / name / "frame1.png")
            img.save(tmp_path / name / "frame2.png")
        else:
            (tmp_path / name).mkdir(parents=True)
            for j in range(n):
                img.save(tmp_path / name / f"f{j}.png")
    with pytest.raises(DataError, match=match):
        load_sequence_folder(tmp_path, 8, **kwargs)


def test_missing_path_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_sequence_folder(tmp_path / "nope", 8)
    with pytest.raises(DataError, match="needs data.path"):
        load_run_data(load_config(overrides=["data.source=sequences"]).data)


# ----------------------------------------------------------------------------- run data


def test_moving_shapes_run_data_holds_out_whole_shapes() -> None:
    cfg = load_config(overrides=["data.source=moving-shapes", "data.sequences=50", "data.frames=6", "data.image_size=16"])
    data = load_run_data(cfg.data)
    assert isinstance(data.pretrain, SequenceSet) and data.pretrain.frames.shape[1:] == (6, 1, 16, 16)
    assert len(data.pretrain.classes) == 5 and len(data.evaluation.classes) == 5
    assert not set(data.pretrain.classes) & set(data.evaluation.classes)
    # One image per held-out sequence, its middle frame (index 3 of 6).
    full = load_source(cfg.data)  # every frame of every sequence, as images
    assert len(full) == 50 * 6 and len(data.evaluation) == 25
    first_eval_class = data.evaluation.classes[0]
    seqs = full.images.reshape(50, 6, 1, 16, 16)
    kept = [i for i in range(50) if full.classes[int(full.labels[6 * i])] == first_eval_class]
    assert torch.equal(data.evaluation.images[data.evaluation.labels == 0], seqs[kept, 3])


def test_sequence_sources_in_config_and_run_data(tmp_path) -> None:
    _write_sequences(tmp_path, moving_shapes(4, frames=5, size=12).frames)
    cfg = load_config(overrides=["data.source=sequences", f"data.path={tmp_path}", "data.image_size=12", "data.frames=3"])
    data = load_run_data(cfg.data)
    assert data.pretrain.frames.shape == (4, 3, 1, 12, 12) and data.evaluation is None
    with pytest.raises(ConfigError, match="data.frames"):
        load_config(overrides=["data.frames=1"])
    with pytest.raises(DataError, match="unlabeled_path"):
        load_run_data(load_config(overrides=["data.source=moving-shapes", f"data.unlabeled_path={tmp_path}"]).data)
