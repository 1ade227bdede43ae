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


def pretrain_interrupted(monkeypatch: pytest.MonkeyPatch, config, at_step: int = 4) -> None:
    """Run ``api.pretrain(config)`` and stop it like Ctrl-C when step ``at_step`` begins, leaving the
    checkpoint of the last ``checkpoint_every`` boundary behind for a resume test."""
    from fewshot import api
    from fewshot.train import trainer

    real_lr = trainer.learning_rate

    def interrupt(step, train):
        if step == at_step:
            raise KeyboardInterrupt
        return real_lr(step, train)

    monkeypatch.setattr(trainer, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.pretrain(config, progress=False)
    monkeypatch.setattr(trainer, "learning_rate", real_lr)
