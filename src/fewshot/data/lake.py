"""The 20 one-shot classification runs of Lake et al. (2015), read from ``all_runs.zip``.

Layout (in the zip, or an unpacked folder, or a folder holding one such folder)::

    runNN/training/classNN.png   one image per class (20)
    runNN/test/itemNN.png        the test items (20)
    runNN/class_labels.txt       lines "runNN/test/itemNN.png runNN/training/classNN.png"

Images get the same preprocessing as :func:`fewshot.data.sources.load_omniglot`
(grayscale, inverted so ink = 1, area-resized).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.data.image_files import FileTree, check_image_args, is_image, natural_key, read_images
from fewshot.errors import DataError

__all__ = ["LakeRun", "load_lake_runs"]

_RUN = re.compile(r"run\d+")
LAKE_LAYOUT = "runNN/{training/classNN.png, test/itemNN.png, class_labels.txt} (as in all_runs.zip)"


@dataclass
class LakeRun:
    """One N-way one-shot run (N = 20 in the published runs).

    train_images: (N, C, H, W), one image per class, ordered by class file number.
    test_images: (M, C, H, W), ordered by item file number.
    answers: (M,) int64; ``answers[i]`` is the index into ``train_images`` of test item i's class.
    """

    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    answers: torch.Tensor


def load_lake_runs(path: str | os.PathLike[str], image_size: int = 28) -> list[LakeRun]:
    """All runs under ``path`` (``all_runs.zip`` or its unpacked folder), sorted by run number."""
    check_image_args(image_size)
    with FileTree(Path(path)) as tree:
        labels_files = [f for f in tree.files if f.rsplit("/", 1)[-1] == "class_labels.txt"]
        runs: dict[str, str] = {}  # run folder (with prefix) -> prefix ("" or "top/")
        for f in labels_files:
            parts = f.split("/")
            if len(parts) in (2, 3) and _RUN.fullmatch(parts[-2]):
                runs[f.rsplit("/", 1)[0]] = "/".join(parts[:-2]) + "/" if len(parts) == 3 else ""
        if not runs:
            raise DataError(f"no Lake runs (runNN/class_labels.txt) in {tree.path}; expected the layout {LAKE_LAYOUT}")
        prefixes = sorted(set(runs.values()))
        if len(prefixes) > 1:
            raise DataError(
                f"{tree.path} holds runs in several folders ({', '.join(p.rstrip('/') or '.' for p in prefixes)}); pass one of them"
            )
        prefix = prefixes[0]
        # A run folder without its class_labels.txt is a broken copy: say so rather than skip it.
        for d in tree.dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix):] and _RUN.fullmatch(d[len(prefix):]):
                if d not in runs:
                    raise DataError(f"run folder '{d}' in {tree.path} has no class_labels.txt")
        return [_load_run(tree, prefix, run, image_size) for run in sorted(runs, key=natural_key)]


def _load_run(tree: FileTree, prefix: str, run: str, image_size: int) -> LakeRun:
    training = [f for f in tree.files if f.startswith(f"{run}/training/") and is_image(f)]
    test = [f for f in tree.files if f.startswith(f"{run}/test/") and is_image(f)]
    for kind, files in (("training", training), ("test", test)):
        if not files:
            raise DataError(f"run folder '{run}/{kind}' in {tree.path} has no images; expected the layout {LAKE_LAYOUT}")
    training.sort(key=natural_key)
    test.sort(key=natural_key)
    train_index = {f: i for i, f in enumerate(training)}
    labels_name = f"{run}/class_labels.txt"
    try:
        text = tree.read(labels_name).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read '{labels_name}' in {tree.path}: {err}") from None
    answer_of: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {lineno} of '{labels_name}' in {tree.path}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'runNN/test/itemNN.png runNN/training/classNN.png', got {line.strip()!r}")
        item, cls = (prefix + f.replace("\\", "/") for f in fields)
        for f in (item, cls):
            if f not in tree:
                raise DataError(f"{where} names '{f}', which is not in {tree.path}")
        if cls not in train_index:
            raise DataError(f"{where}: '{cls}' is not a training image of {run}")
        if item in answer_of:
            raise DataError(f"{where}: test item '{item}' is listed twice")
        answer_of[item] = train_index[cls]
    missing = [f for f in test if f not in answer_of]
    if missing:
        raise DataError(f"test item '{missing[0]}' has no line in '{labels_name}' in {tree.path}")
    extra = sorted(set(answer_of) - set(test), key=natural_key)
    if extra:
        raise DataError(f"'{labels_name}' in {tree.path} lists '{extra[0]}', which is not a test item of {run}")
    images = read_images(tree, training + test, image_size, 1, invert=True)
    return LakeRun(
        name=run[len(prefix):],
        train_images=images[: len(training)].clone(),
        test_images=images[len(training):].clone(),
        answers=torch.tensor([answer_of[f] for f in test], dtype=torch.long),
    )
