"""What benches share about their training runs: bring a run to its steps, reusing a finished one."""

from __future__ import annotations

import time

from fewshot import api
from fewshot.config import RunConfig
from fewshot.run import Run
from fewshot.train.trainer import checkpoint_path


def train(config: RunConfig) -> float | None:
    """Bring the run to its steps (a finished one is reused); the CPU seconds this process spent, None when reused."""
    if checkpoint_path(config.run_dir).exists() and Run.open(config.run_dir).step >= config.train.steps:
        return None
    cpu = time.process_time()
    api.pretrain_to_completion(config, progress=False)
    return time.process_time() - cpu
