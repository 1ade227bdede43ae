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
    """Bring the run to its steps (a finished one of the same settings is reused; one of other settings is refused:
    :func:`fewshot.api.pretrain_to_completion`); the CPU seconds this process spent, None when reused."""
    cpu = time.process_time()
    result = api.pretrain_to_completion(config, progress=False)
    return None if result is None else time.process_time() - cpu


def recorded_cpu_seconds(config: RunConfig) -> float | None:
    """The training loop's CPU seconds a finished run's checkpoint records, summed over its sessions (what a bench
    reports for a run it reused); None for a checkpoint written before fewshot recorded them."""
    if not checkpoint_path(config.run_dir).exists():
        return None
    seconds = Run.open(config.run_dir).checkpoint.meta.get("cpu_seconds")
    return None if seconds is None else float(seconds)


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
