"""Files on the ground floor: atomic writes, content hashes and the versions a file records.

Checkpoints, adapter files and downloads all go through these, so a crash mid-write never leaves
a half-written file under the final name, and a file can be checked against the hash it was written with.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fewshot.version import __version__


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
