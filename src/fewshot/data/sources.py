"""Loaders that turn data on disk into an in-memory :class:`ImageSet`.

Every loader returns images as float32 in [0, 1] with the foreground bright.

Preprocessing shared by all file-based loaders (:func:`decode_image`):

* the image is decoded with PIL (the first frame of an animated GIF/WebP), images with
  transparency are flattened onto a white background, then converted to grayscale
  (``channels=1``) or RGB (``channels=3``);
* non-square images are scaled so that the *shorter* side becomes ``image_size`` and the
  centred square is kept (done in one step: the central square crop of the source is
  resampled to ``image_size x image_size``);
* resampling uses PIL's ``BOX`` filter, an exact area average. Omniglot strokes are 2-3 px
  wide at 105 px and shrink by 3.75x to 28 px; an area average turns every stroke into
  pixels whose value is the fraction of ink they cover, so no stroke vanishes (as with
  NEAREST), none are blurred over a wider footprint than necessary (BILINEAR/BICUBIC
  at this ratio), and there is no ringing (LANCZOS overshoots and leaves halos that would
  be clipped at 0 and 1). The total ink is preserved;
* ``invert=True`` maps x -> 1 - x, so black ink on white paper becomes bright strokes (1)
  on a dark background (0). Omniglot and the Lake runs are always inverted.

Omniglot and Lake runs are read straight from their release zips (no extraction); an
unpacked folder works too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fewshot.data.image_files import (
    IMAGE_EXTENSIONS,
    FileTree,
    check_image_args,
    decode_image,
    folder_tree,
    is_image,
    natural_key,
    read_images,
)
from fewshot.data.types import ImageSet
from fewshot.errors import DataError
from fewshot.io import sha256_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "OMNIGLOT_URL_PREFIX",
    "decode_image",
    "download_omniglot",
    "load_digits",
    "load_image_folder",
    "load_omniglot",
    "load_unlabeled_folder",
    "omniglot_downloads",
    "resolve_data_path",
]

OMNIGLOT_LAYOUT = (
    "ALPHABET/characterNN/*.png, either at the top or inside one folder "
    "(as in images_background_small1.zip)"
)

OMNIGLOT_URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# SHA-256 of every release zip, all checked. The four image zips: as published in TensorFlow Datasets'
# url_checksums/omniglot.txt (images_background_small1.zip's equals the copy in ../shared/data/omniglot).
# all_runs.zip has no published digest: the copy in ../shared/data/omniglot (352,787 bytes).
_OMNIGLOT_FILES: tuple[tuple[str, str], ...] = (
    ("images_background.zip", "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    ("images_evaluation.zip", "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
    ("images_background_small1.zip", "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
    ("images_background_small2.zip", "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
    ("one-shot-classification/all_runs.zip", "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"),
)


# --------------------------------------------------------------------------- paths


def resolve_data_path(path: str | os.PathLike[str] | None, default_relative: str) -> Path:
    """The data path to read: ``path`` when given, else ``$FEWSHOT_DATA/default_relative``.

    Raises DataError naming the path tried and how to fix it when it does not exist.
    """
    root = os.environ.get("FEWSHOT_DATA", "")
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if p.exists():
            return p
        # A relative path that is not here may be relative to the data root (omniglot/all_runs.zip).
        if root and not p.is_absolute() and (Path(root).expanduser() / p).exists():
            return Path(root).expanduser() / p
        under = f" nor under FEWSHOT_DATA '{root}'" if root and not p.is_absolute() else ""
        raise DataError(f"data path '{p}' does not exist{under}; pass an existing file or folder, or set the data root with --data")
    if not root:
        raise DataError(
            f"no data path given and FEWSHOT_DATA is not set; pass --data PATH or set "
            f"FEWSHOT_DATA to the folder that holds {default_relative}"
        )
    p = Path(root).expanduser() / default_relative
    if not p.exists():
        raise DataError(
            f"data path '{p}' (from FEWSHOT_DATA) does not exist; pass --data PATH or set "
            f"FEWSHOT_DATA to the folder that holds {default_relative}"
        )
    return p


# ----------------------------------------------------------------- loaders


def load_digits(image_size: int = 28) -> ImageSet:
    """scikit-learn's built-in 8x8 digits (1,797 images, 10 classes; no download).

    Pixel values 0..16 are divided by 16 (ink is already bright) and resized bilinearly
    (antialiased) to ``image_size``; one channel; classes "0".."9".
    """
    from sklearn.datasets import load_digits as _sk_digits

    check_image_args(image_size)
    bunch = _sk_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageSet(images.contiguous(), labels, [str(d) for d in range(10)], None)


def load_omniglot(path: str | os.PathLike[str], image_size: int = 28) -> ImageSet:
    """Omniglot characters from a release zip or its unpacked folder.

    ``path`` is the zip itself, the folder holding the alphabets, or a parent folder with
    exactly one such folder inside. Any set or subset of alphabets is accepted. Images are
    grayscale, inverted (ink = 1) and area-resized to ``image_size``.

    Classes are "Alphabet/characterNN", sorted by alphabet then character; ``groups`` holds
    each class's alphabet; images within a class are sorted by file name.
    """
    check_image_args(image_size)
    with FileTree(Path(path)) as tree:
        images = [n for n in tree.files if is_image(n)]
        if not images:
            raise DataError(f"no images in {tree.path}; expected the layout {OMNIGLOT_LAYOUT}")
        root = _omniglot_root(tree, images)
        strip = len(root) + 1 if root else 0
        by_class: dict[str, list[str]] = {}
        for name in images:
            rel = name[strip:]
            alphabet, character, _ = rel.split("/")
            by_class.setdefault(f"{alphabet}/{character}", []).append(name)
        # A character folder with no images is a broken copy, not a smaller alphabet.
        for d in tree.dirs:
            if (not root or d.startswith(root + "/")) and d[strip:].count("/") == 1:
                if d[strip:] not in by_class:
                    raise DataError(f"character folder '{d}' in {tree.path} has no images")
        classes = sorted(by_class, key=lambda c: [natural_key(p) for p in c.split("/")])
        names: list[str] = []
        labels: list[int] = []
        for k, c in enumerate(classes):
            files = sorted(by_class[c], key=natural_key)
            names.extend(files)
            labels.extend([k] * len(files))
        tensor = read_images(tree, names, image_size, 1, invert=True)
    return ImageSet(
        images=tensor,
        labels=torch.tensor(labels, dtype=torch.long),
        classes=classes,
        groups=[c.split("/")[0] for c in classes],
    )


def _omniglot_root(tree: FileTree, images: list[str]) -> str:
    """The folder inside ``tree`` that holds the alphabets ("" for the top)."""
    depths = {n.count("/") for n in images}
    if depths == {2}:
        return ""
    if depths == {3}:
        tops = sorted({n.split("/", 1)[0] for n in images}, key=natural_key)
        if len(tops) == 1:
            return tops[0]
        raise DataError(
            f"{tree.path} holds several image sets ({', '.join(tops)}); pass one of them "
            f"(expected the layout {OMNIGLOT_LAYOUT})"
        )
    deeper = [n for n in images if n.count("/") not in (2, 3)]
    odd = deeper[0] if deeper else next(n for n in images if n.count("/") == 2)
    raise DataError(f"unexpected file '{odd}' in {tree.path}; expected the layout {OMNIGLOT_LAYOUT}")


def load_image_folder(
    path: str | os.PathLike[str],
    image_size: int,
    channels: int = 1,
    invert: bool = False,
) -> ImageSet:
    """Labeled images in class-per-folder layout: ``path/CLASS/**/IMAGE``.

    Every non-hidden subfolder of ``path`` is a class (sorted by name; numbers in names
    sort numerically); its images may sit at any depth below it. Extensions png, jpg,
    jpeg, bmp, gif, webp (any case) count as images; other files are ignored. Non-square
    images keep their centred square after scaling the shorter side to ``image_size``.
    Use ``invert=True`` for dark ink on a light background.
    """
    check_image_args(image_size, channels)
    with folder_tree(path) as tree:
        class_dirs = [d for d in tree.dirs if "/" not in d]
        top_images = [n for n in tree.files if "/" not in n and is_image(n)]
        if not class_dirs:
            hint = (
                f" (found {len(top_images)} images directly inside; use load_unlabeled_folder for those)"
                if top_images
                else ""
            )
            raise DataError(f"no class folders in {tree.path}; expected the layout CLASS/IMAGE{hint}")
        if top_images:
            raise DataError(
                f"image '{top_images[0]}' lies directly in {tree.path}; put every image inside its class folder"
            )
        per_class: dict[str, list[str]] = {d: [] for d in class_dirs}
        for n in tree.files:
            if "/" in n and is_image(n):
                per_class[n.split("/", 1)[0]].append(n)
        for d in class_dirs:
            if not per_class[d]:
                raise DataError(f"class folder '{d}' in {tree.path} has no images")
        names: list[str] = []
        labels: list[int] = []
        for k, d in enumerate(class_dirs):
            names.extend(per_class[d])
            labels.extend([k] * len(per_class[d]))
        tensor = read_images(tree, names, image_size, channels, invert)
    return ImageSet(tensor, torch.tensor(labels, dtype=torch.long), list(class_dirs), None)


def load_unlabeled_folder(
    path: str | os.PathLike[str],
    image_size: int,
    channels: int = 1,
    invert: bool = False,
) -> ImageSet:
    """The images lying directly in ``path`` (subfolders are not read), sorted by name.

    Labels are all -1 and ``classes`` is empty. Preprocessing as :func:`load_image_folder`.
    """
    check_image_args(image_size, channels)
    with folder_tree(path) as tree:
        names = [n for n in tree.files if "/" not in n and is_image(n)]
        if not names:
            sub = [d for d in tree.dirs if "/" not in d]
            hint = f" (it has subfolders {', '.join(sub[:3])}...: use load_image_folder for labeled classes)" if sub else ""
            raise DataError(
                f"no images directly in {tree.path}; expected a flat folder of "
                f"{'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))} files{hint}"
            )
        tensor = read_images(tree, names, image_size, channels, invert)
    return ImageSet(tensor, torch.full((len(names),), -1, dtype=torch.long), [], None)


# ---------------------------------------------------------------- download


def omniglot_downloads() -> list[tuple[str, str, str]]:
    """(url, file name, SHA-256) of each original Omniglot release zip that
    :func:`download_omniglot` fetches."""
    return [(f"{OMNIGLOT_URL_PREFIX}/{rel}", rel.rsplit("/", 1)[-1], sha) for rel, sha in _OMNIGLOT_FILES]



def download_omniglot(root: str | os.PathLike[str]) -> Path:
    """Download the original Omniglot release zips into ``root/omniglot`` and return that folder.

    Every file is checked against its SHA-256 (:func:`omniglot_downloads`). A download goes to a
    hidden ``.NAME.part`` file first and becomes ``NAME`` only if its digest matches; a mismatch is
    deleted and reported (DataError). A file already present is kept if it matches and refused,
    untouched, if it does not. The zips are not extracted: the loaders read them directly, so
    ``FEWSHOT_DATA=root`` works.
    """
    from torchvision.datasets.utils import download_url

    target = Path(root).expanduser() / "omniglot"
    for url, filename, sha256 in omniglot_downloads():
        path = target / filename
        if path.exists():
            if sha256_file(path) != sha256:
                raise DataError(
                    f"'{path}' exists but is not the release file (SHA-256 {sha256_file(path)[:12]}…, expected "
                    f"{sha256[:12]}…); move it away and download again"
                )
            continue
        part = target / f".{filename}.part"
        part.unlink(missing_ok=True)
        try:
            download_url(url, str(target), filename=part.name)
        except Exception as err:  # noqa: BLE001 - network/disk failures are the user's to fix
            part.unlink(missing_ok=True)
            raise DataError(
                f"could not download {url} to {path}: {err}; "
                f"download it by hand into {target}"
            ) from None
        got = sha256_file(part) if part.is_file() else "no file"
        if got != sha256:
            part.unlink(missing_ok=True)
            raise DataError(
                f"download of {url} failed its check (SHA-256 {got[:12]}…, expected {sha256[:12]}…); "
                f"deleted it, try again or download it by hand into {target}"
            )
        os.replace(part, path)
    return target
