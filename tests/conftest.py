"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data root (holding ``omniglot/...``): ``$FEWSHOT_DATA`` if set, else
    ``<repo>/../shared/data``. Skips the test when neither exists."""
    tried = []
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        tried.append(Path(env).expanduser())
    tried.append(REPO_ROOT.parent / "shared" / "data")
    for path in tried:
        if path.is_dir():
            return path
    pytest.skip(f"real data not found (tried {', '.join(str(p) for p in tried)}); set FEWSHOT_DATA to run it")
