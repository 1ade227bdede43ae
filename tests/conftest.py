"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


def restart_from_scratch(config, resume: bool = False, progress: bool = True):
    """A broken "resume", kept as a negative control: it drops the run folder and trains again from
    step 0. Seeded, it still ends with the uninterrupted run's weights; :func:`resume_problems` must see it."""
    import shutil

    from fewshot import api

    if resume:
        shutil.rmtree(config.run_dir)
    return api.pretrain(config, resume=False, progress=progress)


def resume_problems(monkeypatch: pytest.MonkeyPatch, config_for, pretrain=None) -> list[str]:
    """What is wrong with resuming runs of the recipe ``config_for(name)`` (6 steps, a checkpoint every 3);
    empty if nothing. ``pretrain(config, resume, progress)`` is the resume under test (``api.pretrain``).

    "full" runs uninterrupted; "cut" stops at step 4 and resumes from its step-3 checkpoint; "altered" is
    a copy of "cut" whose checkpoint has one weight shifted, resumed too. A resume must run only the 3
    steps left, end with the full run's weights and history, and end elsewhere from the altered
    checkpoint: equal weights alone cannot tell a resume from seeded training from scratch.
    """
    import shutil

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from fewshot import api
    from fewshot.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    pretrain = pretrain or api.pretrain
    weights = lambda name: load_checkpoint(config_for(name).run_dir).prefixed("model")  # noqa: E731

    full = api.pretrain(config_for("full"), progress=False)
    pretrain_interrupted(monkeypatch, config_for("cut"))
    cut_dir = config_for("cut").run_dir
    kept = load_checkpoint(cut_dir)
    assert (full.step, kept.step) == (6, 3), "the recipe must run 6 steps with a checkpoint every 3"

    # The altered copy: one encoder weight shifted by 0.01 (a fresh checkpoint pair, so its SHA-256 matches).
    altered_dir = config_for("altered").run_dir
    shutil.copytree(cut_dir, altered_dir)
    key = next(k for k in sorted(kept.tensors) if k.startswith("model.encoder.") and k.endswith("weight"))
    tensors = {**kept.tensors, key: kept.tensors[key] + 0.01}
    meta = {k: kept.meta[k] for k in ("optimizer", "history", "train_seconds")}
    save_checkpoint(altered_dir / "checkpoints" / "last", Checkpoint(kept.config, kept.step, tensors, meta))

    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
    try:
        resumed = pretrain(config_for("cut"), resume=True, progress=False)
        ran = len(steps)
        pretrain(config_for("altered"), resume=True, progress=False)
    finally:
        handle.remove()

    problems = []
    if ran != full.step - kept.step:
        problems.append(f"resume ran {ran} optimizer steps, not the {full.step - kept.step} left after step {kept.step}")
    a, b, c = weights("full"), weights("cut"), weights("altered")
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        problems.append("resumed weights differ from the uninterrupted run's")
    if a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a):
        problems.append(f"resuming with '{key}' shifted by 0.01 ends with the uninterrupted run's weights: the checkpoint is not read")
    if [(h["step"], h["loss"]) for h in resumed.history] != [(h["step"], h["loss"]) for h in full.history]:
        problems.append("the resumed history differs from the uninterrupted run's")
    return problems


def owned(name: str, overrides: list[str]) -> list[str]:
    """The ``method.*`` overrides that method ``name``'s config has a field for (each method owns its
    config: MoCo has no predictor), and every other override."""
    from fewshot.methods import METHODS

    fields = METHODS[name].config_class.model_fields
    return [o for o in overrides if not o.startswith("method.") or o.split("=")[0].split(".")[1] in fields]


def save_tiny_hf_gpt2(folder: Path, corpus: str, n_positions: int = 256, eos_token: str | None = None) -> Path:
    """A random 2-layer GPT-2 (32 wide) and a 400-id BPE tokenizer trained on ``corpus`` (``eos_token`` its EOS, if
    given), saved as a Hugging Face folder. Weights are drawn at std 0.3 so that logits are well separated and greedy
    ties cannot hide a difference."""
    import transformers

    from fewshot.data.tokenizer import train_tokenizer

    transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(corpus, 400), eos_token=eos_token).save_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=400, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def changed_by_training(config, data) -> tuple[set[str], "object"]:
    """Train ``config`` on ``data`` through the one trainer and reopen the saved run: the state-dict keys whose tensors
    differ from the method's initial state, and the run. The initial state is rebuilt the way the trainer builds it
    (seeded with ``train.seed`` just before), so a key is in the set only if training moved it."""
    from fewshot.methods import build_method
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    torch.manual_seed(config.train.seed)
    before = build_method(config).state_dict()
    pretrain(config, data, progress=False)
    run = Run.open(config.run_dir)
    after = run.method().state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}, run

