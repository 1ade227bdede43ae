"""What benches share about their training runs: bring a run to its steps, reusing a finished one."""

from __future__ import annotations

import time
from pathlib import Path

from fewshot import api
from fewshot.config import RunConfig
from fewshot.data.vl_prompts import write_scene_corpus
from fewshot.run import Run
from fewshot.train.trainer import checkpoint_path


def train(config: RunConfig) -> float | None:
    """Bring the run to its steps (a finished one is reused); the CPU seconds this process spent, None when reused."""
    if checkpoint_path(config.run_dir).exists() and Run.open(config.run_dir).step >= config.train.steps:
        return None
    cpu = time.process_time()
    api.pretrain_to_completion(config, progress=False)
    return time.process_time() - cpu


def scene_lm_config(out: Path, steps: int, captions: int = 20000, episodes: int = 8000, seed: int = 0,
                    overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The caption LM the scene benches share: OUT/scene-corpus-C-E.txt (``fewshot data scene-corpus``, written when
    absent) and the gpt-scenes recipe at ``steps``, named gpt-scenes-STEPS (so a finished run is reused)."""
    corpus = Path(out) / f"scene-corpus-{captions}-{episodes}.txt"
    if not corpus.is_file():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        write_scene_corpus(corpus, captions, episodes, seed)
    return api.load_config(api.find_recipe("gpt-scenes"), [
        f"data.path={corpus}", f"out={out}", f"name=gpt-scenes-{steps}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
        f"train.warmup_steps={min(25, steps // 10)}", *overrides])
