"""Image files on disk or in a zip: a read-only file tree, natural sort order, and decoding.

Shared by every file-based loader (:mod:`fewshot.data.sources`, Lake's runs, frame sequences).
:func:`decode_image` is the one preprocessing path: decode with PIL (the first frame of an animated
GIF/WebP), flatten transparency onto white, convert to grayscale or RGB, keep the centred square
and resample it to ``image_size`` with PIL's BOX filter (an exact area average; see
:mod:`fewshot.data.sources` for why), and optionally invert so ink is bright.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fewshot.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "FileTree", "check_image_args", "decode_image", "folder_tree", "is_image", "natural_key", "read_images"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

_RESAMPLE = Image.Resampling.BOX


# ------------------------------------------------------------------ file trees


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically ("run2" < "run10")."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t != ""]


class FileTree:
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
        self.files = sorted(files, key=natural_key)
        self.dirs = sorted(dirs, key=natural_key)
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

    def __enter__(self) -> "FileTree":
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


def check_image_args(image_size: int, channels: int = 1) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")


def read_images(
    tree: FileTree, names: list[str], image_size: int, channels: int, invert: bool
) -> torch.Tensor:
    """Decode ``names`` from ``tree`` into one (N, C, S, S) float32 tensor.

    Decoding is serial: Omniglot's 1-bit 105x105 PNGs take ~0.1 ms each, and a thread
    pool measured slower (0.42 s vs 0.28 s for 2,720 images on 2 cores).
    """
    out = np.empty((len(names), channels, image_size, image_size), dtype=np.float32)
    for i, name in enumerate(names):
        out[i] = decode_image(tree.read(name), image_size, channels, invert, source=f"'{name}' in {tree.path}")
    return torch.from_numpy(out)


def folder_tree(path: str | os.PathLike[str]) -> FileTree:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path '{p}' does not exist")
    if not p.is_dir():
        raise DataError(f"'{p}' is not a folder")
    return FileTree(p)
