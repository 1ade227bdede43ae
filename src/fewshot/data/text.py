"""Text corpora: reading, a contiguous train / held-out split, token windows for the trainer, speeches by speaker.

The corpus is split once, contiguously: the first ``1 - heldout_fraction`` of the characters
train the tokenizer and the model, the rest is held out for perplexity and the speaker episodes.
The cut moves forward to the next blank line so no speech is split between the two sides.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from tokenizers import Tokenizer

from fewshot.config import DataConfig
from fewshot.data.sources import resolve_data_path
from fewshot.data.tokenizer import encode
from fewshot.errors import DataError

TEXT_DEFAULT = "text/tinyshakespeare.txt"

__all__ = [
    "TEXT_DEFAULT", "LabeledTexts", "TextDataConfig", "TextSplits", "TokenSet", "encode_text", "load_labeled_texts", "load_text_splits",
    "parse_speeches", "read_corpus", "speaker_lines", "split_text",
]


class TextDataConfig(DataConfig):
    """``data.source=text``: a play-format corpus (``data.path``, default ``$FEWSHOT_DATA/text/tinyshakespeare.txt``)."""

    seq_len: int = Field(128, ge=2, description="text: tokens per training window (the model's context is seq_len + 1 with [BOS]/[CLS])")
    vocab_size: int = Field(2048, ge=262, description="text: byte-level BPE vocabulary size (256 bytes + 6 specials at least)")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="text: the last fraction of the corpus (from a blank line on) held out of tokenizer and model training"
    )


def read_corpus(path: str | os.PathLike[str]) -> str:
    """The whole corpus as one string (UTF-8; Windows line ends become ``\\n``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text corpus '{p}' is not a file")
    try:
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read text corpus '{p}': {exc}") from None
    if not text.strip():
        raise DataError(f"text corpus '{p}' is empty")
    return text


@dataclass
class TextSplits:
    train: str
    heldout: str


def split_text(text: str, heldout_fraction: float) -> TextSplits:
    """Contiguous split: the last ``heldout_fraction`` of the characters, starting at a blank line, is held out."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    cut = int(len(text) * (1 - heldout_fraction))
    blank = text.find("\n\n", cut)
    cut = blank + 2 if blank >= 0 else cut
    train, heldout = text[:cut], text[cut:]
    if not train.strip() or not heldout.strip():
        raise DataError(f"heldout_fraction {heldout_fraction} leaves one side of the {len(text)}-character corpus empty")
    return TextSplits(train, heldout)


def load_text_splits(data: TextDataConfig) -> TextSplits:
    """The corpus named by ``data.path`` (default ``$FEWSHOT_DATA/text/tinyshakespeare.txt``), split."""
    return split_text(read_corpus(resolve_data_path(data.path, TEXT_DEFAULT)), data.heldout_fraction)


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """(N,) int64 ids of ``text``."""
    return torch.tensor(encode(tokenizer, text), dtype=torch.long)


class TokenSet:
    """Fixed-length windows over one token stream, as the trainer's :class:`~fewshot.data.types.TrainingData`.

    tokens: (N,) int64. Window i is ``tokens[i*stride : i*stride + seq_len]``; ``stride=1`` makes
    every offset a sample (the seeded batch order then draws random windows, as nanoGPT does),
    ``stride=seq_len`` gives non-overlapping windows. ``batch(idx)`` returns ``{"tokens": (B, seq_len) ids}``:
    pre-training text is unlabeled.
    """

    labeled = False
    keys = frozenset({"tokens"})

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int = 1) -> None:
        if tokens.ndim != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a 1-D int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len and stride must be ≥ 1, got {seq_len}, {stride}")
        if len(tokens) < seq_len:
            raise DataError(f"the text has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self._offsets = torch.arange(seq_len)

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len) // self.stride + 1

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        starts = torch.as_tensor(idx, dtype=torch.long) * self.stride
        return {"tokens": self.tokens[starts[:, None] + self._offsets]}


_HEADER = re.compile(r"^([^\n:][^\n]*):$")


def parse_speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs from play text: blocks separated by blank lines, each ``NAME:`` then the lines.

    The speech keeps its lines joined by ``\\n`` (as in the file, stripped of surrounding blank
    space). A header with no lines under it (the corpus has some cut speeches) is skipped.
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        m = _HEADER.match(lines[0].strip())
        speech = "\n".join(lines[1:]).strip()
        if m and speech:
            out.append((m.group(1).strip(), speech))
    return out


def speaker_lines(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Every (speaker, speech) of the play-format corpus at ``path`` ("NAME:\\n lines...\\n\\n"), in order."""
    return parse_speeches(read_corpus(path))


@dataclass
class LabeledTexts:
    """``texts[i]`` belongs to ``classes[labels[i]]``; labels (n,) int64, classes sorted."""

    texts: list[str]
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _labeled_rows(p: Path, text: str) -> list[tuple[int, object, object]]:
    """(line, text, label) of a JSON Lines file (a .jsonl / .ndjson name, or a first character '{') or a CSV with a header."""
    if p.suffix.lower() in (".jsonl", ".ndjson") or text.lstrip().startswith("{"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = None
            if not isinstance(item, dict) or "text" not in item or "label" not in item:
                raise DataError(f"{p}: line {n} is not a JSON object with 'text' and 'label'")
            rows.append((n, item["text"], item["label"]))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
        raise DataError(f"{p}: a CSV needs a header with 'text' and 'label' columns, got {reader.fieldnames}")
    return [(reader.line_num, row["text"], row["label"]) for row in reader]


def load_labeled_texts(path: str | os.PathLike[str]) -> LabeledTexts:
    """A small labeled text set for adapting a text base: a CSV with a ``text,label`` header (other
    columns ignored; quote texts that hold commas or line breaks) or JSON Lines of
    ``{"text": ..., "label": ...}``. Labels are read as strings; at least two classes."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labeled text file '{p}' does not exist (a CSV with text,label columns or JSON Lines)")
    try:
        content = p.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read labeled text file '{p}': {exc}") from None
    texts, names = [], []
    for n, text, label in _labeled_rows(p, content):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: line {n} has an empty text")
        if label is None or not str(label).strip():
            raise DataError(f"{p}: line {n} has no label")
        texts.append(text)
        names.append(str(label).strip())
    if not texts:
        raise DataError(f"{p} holds no labeled texts")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise DataError(f"{p}: every text has the label '{classes[0]}'; adaptation needs at least two classes")
    index = {c: k for k, c in enumerate(classes)}
    return LabeledTexts(texts, torch.tensor([index[c] for c in names], dtype=torch.long), classes)
