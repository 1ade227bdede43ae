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

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fewshot.data.types import ImageSet
from fewshot.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "OMNIGLOT_URL_PREFIX",
    "decode_image",
    "download_omniglot",
    "file_sha256",
    "load_digits",
    "load_image_folder",
    "load_omniglot",
    "load_unlabeled_folder",
    "omniglot_downloads",
    "resolve_data_path",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

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

_RESAMPLE = Image.Resampling.BOX


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


# ------------------------------------------------------------------ file trees


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically ("run2" < "run10")."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t != ""]


class _Tree:
    """A read-only view of a folder or a zip file: relative POSIX names -> bytes.

    Hidden files and folders (a name starting with ".") and ``__MACOSX`` are ignored.
    ``files`` lists regular files; ``dirs`` lists folders (including those implied by
    file names).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        files: list[str] = []
        dirs: set[str] = set()
        if not path.exists():
            raise DataError(f"data path '{path}' does not exist")
        if path.is_dir():
            for current, subdirs, names in os.walk(path, followlinks=True):
                subdirs[:] = [d for d in subdirs if not _hidden(d)]
                rel = Path(current).relative_to(path).as_posix()
                prefix = "" if rel == "." else rel + "/"
                for d in subdirs:
                    dirs.add(prefix + d)
                files.extend(prefix + n for n in names if not _hidden(n))
        elif zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
                infos = self._zip.infolist()
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"cannot open zip file '{path}': {err}") from None
            for info in infos:
                name = info.filename.rstrip("/")
                parts = name.split("/")
                if not name or any(_hidden(p) for p in parts):
                    continue
                if info.is_dir():
                    dirs.add(name)
                else:
                    files.append(name)
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        else:
            raise DataError(f"'{path}' is neither a folder nor a zip file")
        self.files = sorted(files, key=_natural_key)
        self.dirs = sorted(dirs, key=_natural_key)
        self._file_set = set(files)

    def __contains__(self, name: str) -> bool:
        return name in self._file_set

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except Exception as err:  # noqa: BLE001 - any failure is the file's fault
            raise DataError(f"cannot read '{name}' in {self.path}: {err}") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "_Tree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------- decoding


def decode_image(
    data: bytes,
    image_size: int,
    channels: int = 1,
    invert: bool = False,
    *,
    source: str = "image",
) -> np.ndarray:
    """Decode one encoded image into a (channels, image_size, image_size) float32 array in [0, 1].

    See the module docstring for the exact preprocessing. ``source`` names the image in
    the DataError raised when it cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im.load()
            im = _to_mode(im, "L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {source}: not a recognised image file") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise DataError(f"cannot read image {source}: {err}") from None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    im = im.resize((image_size, image_size), _RESAMPLE, box=(left, top, left + side, top + side))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    if invert:
        arr = 1.0 - arr
    return np.ascontiguousarray(arr)


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB", flattening transparency onto white and scaling 16-bit gray."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert(mode)


def _check_args(image_size: int, channels: int = 1) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")


def _read_images(
    tree: _Tree, names: list[str], image_size: int, channels: int, invert: bool
) -> torch.Tensor:
    """Decode ``names`` from ``tree`` into one (N, C, S, S) float32 tensor.

    Decoding is serial: Omniglot's 1-bit 105x105 PNGs take ~0.1 ms each, and a thread
    pool measured slower (0.42 s vs 0.28 s for 2,720 images on 2 cores).
    """
    out = np.empty((len(names), channels, image_size, image_size), dtype=np.float32)
    for i, name in enumerate(names):
        out[i] = decode_image(tree.read(name), image_size, channels, invert, source=f"'{name}' in {tree.path}")
    return torch.from_numpy(out)


# ----------------------------------------------------------------- loaders


def load_digits(image_size: int = 28) -> ImageSet:
    """scikit-learn's built-in 8x8 digits (1,797 images, 10 classes; no download).

    Pixel values 0..16 are divided by 16 (ink is already bright) and resized bilinearly
    (antialiased) to ``image_size``; one channel; classes "0".."9".
    """
    from sklearn.datasets import load_digits as _sk_digits

    _check_args(image_size)
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
    _check_args(image_size)
    with _Tree(Path(path)) as tree:
        images = [n for n in tree.files if _is_image(n)]
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
        classes = sorted(by_class, key=lambda c: [_natural_key(p) for p in c.split("/")])
        names: list[str] = []
        labels: list[int] = []
        for k, c in enumerate(classes):
            files = sorted(by_class[c], key=_natural_key)
            names.extend(files)
            labels.extend([k] * len(files))
        tensor = _read_images(tree, names, image_size, 1, invert=True)
    return ImageSet(
        images=tensor,
        labels=torch.tensor(labels, dtype=torch.long),
        classes=classes,
        groups=[c.split("/")[0] for c in classes],
    )


def _omniglot_root(tree: _Tree, images: list[str]) -> str:
    """The folder inside ``tree`` that holds the alphabets ("" for the top)."""
    depths = {n.count("/") for n in images}
    if depths == {2}:
        return ""
    if depths == {3}:
        tops = sorted({n.split("/", 1)[0] for n in images}, key=_natural_key)
        if len(tops) == 1:
            return tops[0]
        raise DataError(
            f"{tree.path} holds several image sets ({', '.join(tops)}); pass one of them "
            f"(expected the layout {OMNIGLOT_LAYOUT})"
        )
    deeper = [n for n in images if n.count("/") not in (2, 3)]
    odd = deeper[0] if deeper else next(n for n in images if n.count("/") == 2)
    raise DataError(f"unexpected file '{odd}' in {tree.path}; expected the layout {OMNIGLOT_LAYOUT}")


def _folder_tree(path: str | os.PathLike[str]) -> _Tree:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path '{p}' does not exist")
    if not p.is_dir():
        raise DataError(f"'{p}' is not a folder")
    return _Tree(p)


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
    _check_args(image_size, channels)
    with _folder_tree(path) as tree:
        class_dirs = [d for d in tree.dirs if "/" not in d]
        top_images = [n for n in tree.files if "/" not in n and _is_image(n)]
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
            if "/" in n and _is_image(n):
                per_class[n.split("/", 1)[0]].append(n)
        for d in class_dirs:
            if not per_class[d]:
                raise DataError(f"class folder '{d}' in {tree.path} has no images")
        names: list[str] = []
        labels: list[int] = []
        for k, d in enumerate(class_dirs):
            names.extend(per_class[d])
            labels.extend([k] * len(per_class[d]))
        tensor = _read_images(tree, names, image_size, channels, invert)
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
    _check_args(image_size, channels)
    with _folder_tree(path) as tree:
        names = [n for n in tree.files if "/" not in n and _is_image(n)]
        if not names:
            sub = [d for d in tree.dirs if "/" not in d]
            hint = f" (it has subfolders {', '.join(sub[:3])}...: use load_image_folder for labeled classes)" if sub else ""
            raise DataError(
                f"no images directly in {tree.path}; expected a flat folder of "
                f"{'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))} files{hint}"
            )
        tensor = _read_images(tree, names, image_size, channels, invert)
    return ImageSet(tensor, torch.full((len(names),), -1, dtype=torch.long), [], None)


# ---------------------------------------------------------------- download


def omniglot_downloads() -> list[tuple[str, str, str]]:
    """(url, file name, SHA-256) of each original Omniglot release zip that
    :func:`download_omniglot` fetches."""
    return [(f"{OMNIGLOT_URL_PREFIX}/{rel}", rel.rsplit("/", 1)[-1], sha) for rel, sha in _OMNIGLOT_FILES]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            if file_sha256(path) != sha256:
                raise DataError(
                    f"'{path}' exists but is not the release file (SHA-256 {file_sha256(path)[:12]}…, expected "
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
        got = file_sha256(part) if part.is_file() else "no file"
        if got != sha256:
            part.unlink(missing_ok=True)
            raise DataError(
                f"download of {url} failed its check (SHA-256 {got[:12]}…, expected {sha256[:12]}…); "
                f"deleted it, try again or download it by hand into {target}"
            )
        os.replace(part, path)
    return target
