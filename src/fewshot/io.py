"""Files on the ground floor: atomic writes, content hashes, the versions a file records, and the
safetensors + JSON pairs (checkpoints, adapters) read back with their format and hash checked.

Checkpoints, adapter files and downloads all go through these, so a crash mid-write never leaves
a half-written file under the final name, and a file can be checked against the hash it was written with.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fewshot.errors import CheckpointError
from fewshot.version import __version__

CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION = "fewshot-checkpoint", 1  # a run's safetensors + JSON pair


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    """What wrote a file: fewshot, torch and Python versions."""
    return {"fewshot": __version__, "torch": torch.__version__, "python": platform.python_version()}


__all__ = ["atomic_write", "sha256_file", "versions"]


def read_file_pair(path: Path, fmt: str, version: int, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON meta, tensors) of a ``NAME.safetensors`` + ``NAME.json`` pair tagged ``fmt``, checked for
    format, version and integrity (the JSON records the tensor file's SHA-256). ``what`` names the
    kind of file in errors ("checkpoint", "adapter")."""
    tensors_path, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not tensors_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"'{path}' is not a fewshot {what}: need both {tensors_path.name} and {meta_path.name}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{meta_path}' is not a fewshot {what}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"'{meta_path}' is not a fewshot {what}: no '\"format\": \"{fmt}\"' entry")
    if meta.get("format_version", 0) > version:
        raise CheckpointError(f"'{meta_path}' has {what} format version {meta['format_version']}; this fewshot reads ≤ {version}")
    if sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"'{tensors_path}' does not match its JSON (SHA-256 differs): the pair is torn or was edited")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"'{tensors_path}' is not a readable safetensors file: {exc}") from None
    return meta, tensors
