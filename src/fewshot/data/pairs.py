"""Image–caption pairs: an image folder plus a manifest, in open_clip's CSV layout, read into a :class:`PairSet`.

The manifest (open_clip's ``--dataset-type csv`` defaults): tab-separated, a header row naming the
columns, the image path under ``filepath`` and the caption under ``title``, one row per
(image, caption), so an image with five captions has five rows. Other columns are allowed and
kept only when known (``noise``: the planted-noise label of generated scenes). A ``.jsonl``
manifest holds one JSON object per line with the same keys. Relative image paths are read from
the manifest's folder (open_clip reads them from the working directory), so a folder can move.

Every image is decoded once, whatever its number of captions (:func:`fewshot.data.image_files.decode_image`:
centred square, area-averaged to ``image_size``). Captions are tokenized with the run's BPE
tokenizer into ``context`` ids padded with [PAD]; longer captions are cut at ``context`` and the
cut ones counted (:attr:`PairSet.truncated`), never silently.

A bad row is a one-line :class:`~fewshot.errors.DataError` naming the manifest and its line: a
missing or unreadable image, an empty caption, a missing field.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer

from fewshot.config import DataConfig
from fewshot.data.image_files import check_image_args, decode_image
from fewshot.data.sources import resolve_data_path
from fewshot.data.text import TEXT_DEFAULT, read_corpus, split_text
from fewshot.data.token_ids import PAD_ID
from fewshot.data.tokenizer import train_tokenizer
from fewshot.data.types import Batch
from fewshot.errors import DataError
from fewshot.io import atomic_write

__all__ = [
    "CAPTION_KEY", "IMAGE_KEY", "SEPARATOR", "Manifest", "PairSet", "PairsDataConfig", "manifest_path", "pairs_tokenizer_text", "load_pairs", "pair_set", "read_manifest", "tokenize_captions",
    "tokenizer_text", "train_pair_tokenizer", "write_manifest",
]

IMAGE_KEY, CAPTION_KEY, SEPARATOR = "filepath", "title", "\t"  # open_clip's --csv-img-key, --csv-caption-key, --csv-separator
NOISE_KEY = "noise"


@dataclass
class Manifest:
    """The rows of a manifest: image path (as written), caption, noise label ("" when clean or unknown) and line number."""

    path: Path
    filepaths: list[str]
    captions: list[str]
    noise: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.captions)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def write_manifest(path: str | os.PathLike[str], filepaths: Sequence[str], captions: Sequence[str], noise: Sequence[str] | None = None) -> Path:
    """Write a manifest atomically: tab-separated with a header (``.tsv``/``.csv``; fields quoted only when they hold a
    tab, quote or line end, as Python's and pandas' CSV readers expect) or JSON lines (``.jsonl``)."""
    path = Path(path)
    if len(filepaths) != len(captions) or (noise is not None and len(noise) != len(captions)):
        raise DataError(f"manifest '{path}': {len(filepaths)} image paths for {len(captions)} captions")
    columns = [IMAGE_KEY, CAPTION_KEY] + ([NOISE_KEY] if noise is not None else [])
    rows = zip(filepaths, captions, *([noise] if noise is not None else []))

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if path.suffix == ".jsonl":
                for row in rows:
                    f.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")
            else:
                writer = csv.writer(f, delimiter=SEPARATOR, lineterminator="\n")
                writer.writerow(columns)
                writer.writerows(rows)

    atomic_write(path, write)
    return path


def read_manifest(path: str | os.PathLike[str], separator: str = SEPARATOR) -> Manifest:
    """The rows of a ``.jsonl`` manifest or of a delimited one with a header (``separator``, default tab).

    Raises:
        DataError: naming the manifest and line: no such file, no ``filepath``/``title`` column, a row
            with a missing field, an empty caption, a line that is not a JSON object; or no rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest '{path}' is not a file")
    filepaths, captions, noise, lines = [], [], [], []

    def add(line: int, row: dict) -> None:
        image, caption = row.get(IMAGE_KEY), row.get(CAPTION_KEY)
        if image is None or caption is None:
            raise DataError(f"{path} line {line}: the row has no {IMAGE_KEY if image is None else CAPTION_KEY} field")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{path} line {line}: empty image path")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path} line {line}: empty caption for image '{image}'")
        filepaths.append(image)
        captions.append(caption)
        noise.append(str(row.get(NOISE_KEY) or ""))
        lines.append(line)

    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".jsonl":
                for number, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {number}: not JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {number}: expected a JSON object with '{IMAGE_KEY}' and '{CAPTION_KEY}'")
                    add(number, row)
            else:
                reader = csv.DictReader(f, delimiter=separator)
                header = reader.fieldnames or []
                missing = [k for k in (IMAGE_KEY, CAPTION_KEY) if k not in header]
                if missing:
                    raise DataError(
                        f"{path} line 1: the header {_one_line(header)} lacks {' and '.join(missing)}; open_clip's layout is "
                        f"'{IMAGE_KEY}<TAB>{CAPTION_KEY}' (separator {separator!r})"
                    )
                for row in reader:
                    line = reader.line_num  # the row's last line (a quoted caption may span lines)
                    if None in row:  # more fields than the header
                        raise DataError(f"{path} line {line}: {len(header) + len(row[None])} fields for a header of {len(header)}")
                    add(line, row)
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest '{path}' is not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise DataError(f"{path}: {_one_line(exc)}") from None
    if not captions:
        raise DataError(f"manifest '{path}' has no rows")
    return Manifest(path, filepaths, captions, noise, lines)


def tokenize_captions(tokenizer: Tokenizer, captions: Sequence[str], context: int) -> tuple[torch.Tensor, int]:
    """((R, context) int64 ids right-padded with [PAD], the number of captions cut at ``context`` tokens).

    Plain caption ids, no specials: the text tower adds its own start token."""
    if context < 1:
        raise DataError(f"the caption context must be at least 1 token, got {context}")
    unique = list(dict.fromkeys(captions))
    ids = [e.ids for e in tokenizer.encode_batch(unique, add_special_tokens=False)]
    table = torch.full((len(unique), context), PAD_ID, dtype=torch.long)
    cut = set()
    for i, row in enumerate(ids):
        if len(row) > context:
            cut.add(i)
        row = row[:context]
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    index = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([index[c] for c in captions], dtype=torch.long)
    truncated = sum(1 for c in captions if index[c] in cut)
    return table[rows], truncated


def caption_keys(captions: Sequence[str]) -> torch.Tensor:
    """(R,) int64: equal exactly when two captions' texts are identical (first-seen order)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in captions], dtype=torch.long)


class PairSet:
    """Image–caption rows as the trainer's :class:`~fewshot.data.types.TrainingData`.

    images: (N, C, H, W), each image once: uint8 (kept so, a quarter of float32's memory: 50,000 RGB images of
    32×32 take 154 MB) or float32 in [0, 1]; image_index: (R,) the image of each row;
    tokens: (R, T) int64 caption ids padded with [PAD]; captions: the R texts; noise: R labels ("" = clean
    or unknown); truncated: rows whose caption was cut at T tokens. ``batch(idx)`` gives ``images``
    (B, C, H, W) float32 in [0, 1], ``tokens`` (B, T) and ``caption_keys`` (B,), equal exactly when two rows' captions are
    the same text (the CLIP loss counts those as positives, not negatives).
    """

    labeled = False
    keys = frozenset({"images", "tokens", "caption_keys"})

    def __init__(
        self, images: torch.Tensor, image_index: torch.Tensor, tokens: torch.Tensor, captions: list[str],
        noise: list[str] | None = None, truncated: int = 0,
    ) -> None:
        rows = len(captions)
        if images.ndim != 4 or image_index.shape != (rows,) or tokens.ndim != 2 or tokens.shape[0] != rows:
            raise ValueError(
                f"PairSet: images {tuple(images.shape)}, image_index {tuple(image_index.shape)}, tokens {tuple(tokens.shape)} "
                f"for {rows} captions"
            )
        if rows and (int(image_index.min()) < 0 or int(image_index.max()) >= len(images)):
            raise ValueError(f"PairSet: image_index outside 0..{len(images) - 1}")
        self.images, self.image_index, self.tokens, self.captions = images, image_index.long(), tokens.long(), list(captions)
        self.caption_keys = caption_keys(self.captions)
        self.noise = list(noise) if noise is not None else [""] * rows
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, idx: torch.Tensor) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        images = self.images[self.image_index[idx]]
        images = images.float().div_(255) if images.dtype == torch.uint8 else images
        return {"images": images, "tokens": self.tokens[idx], "caption_keys": self.caption_keys[idx]}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def pair_set(
    images: np.ndarray | torch.Tensor, row_image: Sequence[int], captions: Sequence[str], tokenizer: Tokenizer, context: int,
    noise: Sequence[str] | None = None,
) -> PairSet:
    """A :class:`PairSet` from images in memory ((N, C, H, W) uint8, or float in [0, 1]) and rows (image index, caption)."""
    x = torch.as_tensor(images)
    x = x if x.dtype == torch.uint8 else x.float()
    tokens, truncated = tokenize_captions(tokenizer, captions, context)
    return PairSet(x, torch.as_tensor(list(row_image), dtype=torch.long), tokens, list(captions), None if noise is None else list(noise), truncated)


def load_pairs(
    path: str | os.PathLike[str], tokenizer: Tokenizer, context: int, image_size: int, channels: int = 3, separator: str = SEPARATOR,
) -> PairSet:
    """The manifest at ``path`` with its images decoded at ``image_size`` (each file once) and captions tokenized.

    Raises:
        DataError: as :func:`read_manifest`, and for a row whose image is missing or unreadable (manifest, line, file).
    """
    check_image_args(image_size, channels)
    manifest = read_manifest(path, separator)
    root = manifest.path.parent
    index: dict[str, int] = {}
    row_image = [index.setdefault(f, len(index)) for f in manifest.filepaths]
    first_line = {}
    for f, line in zip(manifest.filepaths, manifest.lines):
        first_line.setdefault(f, line)
    out = np.empty((len(index), channels, image_size, image_size), dtype=np.uint8)
    for name, i in index.items():
        file = Path(name) if os.path.isabs(name) else root / name
        where = f"{manifest.path} line {first_line[name]}"
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{where}: image '{name}' does not exist (looked for {file})") from None
        except OSError as exc:
            raise DataError(f"{where}: cannot read image '{name}': {_one_line(exc.strerror or exc)}") from None
        try:
            # decode_image's values are PIL's 8-bit levels / 255, so the uint8 copy is exact
            out[i] = np.rint(decode_image(data, image_size, channels, source=f"'{name}'") * 255)
        except DataError as exc:
            raise DataError(f"{where}: {_one_line(exc)}") from None
    tokens, truncated = tokenize_captions(tokenizer, manifest.captions, context)
    return PairSet(torch.from_numpy(out), torch.tensor(row_image, dtype=torch.long), tokens, manifest.captions, manifest.noise, truncated)


def tokenizer_text(captions: Sequence[str], corpus: str | None = None) -> str:
    """What a pairs run's BPE tokenizer learns from: the distinct caption texts, one a line, then the training split
    of a text corpus (default ``$FEWSHOT_DATA/text/tinyshakespeare.txt``; its held-out tenth stays unseen, as in text runs)."""
    return "\n".join(dict.fromkeys(captions)) + "\n" + split_text(read_corpus(resolve_data_path(corpus, TEXT_DEFAULT)), 0.1).train


def train_pair_tokenizer(captions: Sequence[str], vocab_size: int, corpus: str | None = None) -> Tokenizer:
    """A BPE tokenizer of at most ``vocab_size`` ids trained on :func:`tokenizer_text`."""
    return train_tokenizer(tokenizer_text(captions, corpus), vocab_size)


class PairsDataConfig(DataConfig):
    """``data.source=pairs``: an image–caption manifest (``data.path``: manifest.tsv or .jsonl in open_clip's
    layout, e.g. the one ``fewshot data scenes`` writes, or your own)."""

    image_size: int = Field(32, ge=8, le=512, description="images are resized to image_size × image_size")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale, 3 = RGB")
    seq_len: int = Field(32, ge=1, description="pairs: caption tokens kept, padded with [PAD]; longer captions are cut and "
                         "counted (the text tower's context is seq_len + 1 with [CLS])")
    vocab_size: int = Field(2048, ge=262, description="pairs: byte-level BPE vocabulary of the run's tokenizer (256 bytes + 6 specials at least)")
    separator: str = Field(SEPARATOR, min_length=1, max_length=1, description="pairs: the field separator of a .tsv/.csv manifest (open_clip's default: tab)")
    corpus: str | None = Field(None, description="pairs: text the tokenizer learns besides the captions (its first 90%); "
                               "default $FEWSHOT_DATA/text/tinyshakespeare.txt")


def manifest_path(data: PairsDataConfig) -> Path:
    if data.path is None:
        raise DataError("data.source=pairs needs data.path: a manifest (.tsv in open_clip's layout, or .jsonl), e.g. from fewshot data scenes")
    return Path(resolve_data_path(data.path, ""))


def pairs_tokenizer_text(data: PairsDataConfig) -> str:
    """The text a new pairs run's tokenizer is trained on: the manifest's captions plus ``data.corpus``."""
    return tokenizer_text(read_manifest(manifest_path(data), data.separator).captions, data.corpus)
