"""The one trainer: resume gives the same weights, NaN stops and keeps the last good checkpoint."""

import re

import pytest
import torch

from fewshot import api
from fewshot.errors import CheckpointError, ConfigError, TrainingDiverged
from fewshot.train import trainer
from fewshot.train.checkpoint import load_checkpoint
from conftest import pretrain_interrupted, restart_from_scratch, resume_problems

TINY = ["data.image_size=16", "train.steps=6", "train.batch_size=32", "train.checkpoint_every=3",
        "train.log_every=1", "train.warmup_steps=2", "method.projection_hidden=32", "method.projection_dim=16",
        "encoder.options={width: 8}"]


def _config(tmp_path, name, *extra):
    return api.load_config(overrides=[f"out={tmp_path}", f"name={name}", *TINY, *extra])


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.safetensors").prefixed("model")


# The last case is the negative control: a "resume" that trains again from step 0 must be caught.
@pytest.mark.parametrize(
    "method, pretrain, caught",
    [
        ([], None, []),  # simclr
        # MoCo's queue, pointer and key encoder, BYOL's target must come back from the checkpoint.
        # 96 keys, not 64: with 64 keys per step a queue of 64 is rewritten whole and its pointer stays at 0.
        (["method=moco", "method.queue_size=96"], None, []),
        (["method=byol", "method.predictor_hidden=32"], None, []),
        # R2-D2's learned λ, scale and bias are parameters with optimizer state too.
        (["method=protonet"], None, []),
        (["method=r2d2"], None, []),
        ([], restart_from_scratch, ["resume ran 6 optimizer steps, not the 3", "the checkpoint is not read"]),
    ],
    ids=["simclr", "moco", "byol", "protonet", "r2d2", "restart-from-scratch-is-caught"],
)
def test_resume_runs_only_the_remaining_steps_from_the_checkpoint(tmp_path, monkeypatch, method, pretrain, caught):
    problems = resume_problems(monkeypatch, lambda name: _config(tmp_path, name, *method), pretrain)
    assert len(problems) == len(caught) and all(want in got for want, got in zip(caught, problems)), problems


@pytest.mark.parametrize("variant", ["scales kept", "scales dropped on resume"])  # the second: the control that a lost scale is caught
def test_a_run_with_two_learning_rate_groups_resumes_to_the_same_weights(tmp_path, monkeypatch, variant):
    """Method.lr_scale splits the trained parameters into AdamW groups (Flamingo's gates): a resume must restore each
    group's scale with its moments, or the remaining steps move the scaled parameters at the wrong rate."""
    from fewshot.methods.contrastive import SimCLR
    from fewshot.train.checkpoint import optimizer_from_flat

    monkeypatch.setattr(SimCLR, "lr_scale", lambda self, name: 4.0 if name.startswith("projector.") else 1.0)
    resume = None
    if variant == "scales dropped on resume":
        def without_scales(tensors, scalars):
            state = optimizer_from_flat(tensors, scalars)
            for group in state["param_groups"]:
                group.pop("lr_scale")
            return state

        def resume(config, resume=False, progress=True):
            monkeypatch.setattr(trainer, "optimizer_from_flat", without_scales)
            return api.pretrain(config, resume=resume, progress=progress)
    problems = resume_problems(monkeypatch, lambda name: _config(tmp_path, name), resume)
    groups = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors").meta["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 4.0]
    if variant == "scales kept":
        assert problems == []
    else:
        assert "resumed weights differ from the uninterrupted run's" in problems, problems


def test_training_changes_weights_and_logs(tmp_path):
    cfg = _config(tmp_path, "run")
    result = api.pretrain(cfg, progress=False)
    assert len(result.history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.views_per_second > 0
    assert list((tmp_path / "run" / "logs").rglob("metrics.csv")), "CSV log missing"
    assert list((tmp_path / "run" / "tensorboard").rglob("events.*")), "TensorBoard log missing"
    torch.manual_seed(cfg.train.seed)
    init = trainer.build_method(cfg).state_dict()
    trained = _weights(tmp_path / "run")
    assert any(not torch.equal(init[k], trained[k]) for k in init if init[k].is_floating_point())


def test_existing_run_is_not_overwritten(tmp_path):
    api.pretrain(_config(tmp_path, "run"), progress=False)
    before = (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        api.pretrain(_config(tmp_path, "run"), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").read_bytes() == before


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        api.pretrain(_config(tmp_path, "none"), resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from fewshot.methods.contrastive import SimCLR

    real_loss = SimCLR.loss
    calls = {"n": 0}

    def loss_then_nan(self, z1, z2, labels):
        calls["n"] += 1
        out = real_loss(self, z1, z2, labels)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(SimCLR, "loss", loss_then_nan)
    # Step N = N optimizer updates done: the 5th loss is step 5's, which is not applied.
    with pytest.raises(TrainingDiverged, match=r"loss became nan in step 5, which was not applied; .*checkpoint \(step 3\)"):
        api.pretrain(_config(tmp_path, "nan"), progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.safetensors").step == 3


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose update would poison every weight."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture(scope="module")
def clean_step_3(tmp_path_factory):
    """Every tensor of a clean run's step-3 checkpoint (the same recipe, stopped at step 4)."""
    tmp_path = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as monkeypatch:
        pretrain_interrupted(monkeypatch, _config(tmp_path, "clean"))
    return load_checkpoint(tmp_path / "clean" / "checkpoints" / "last.safetensors").tensors


# Step 6 is a checkpoint step. "gradient": a finite loss with NaN gradients (seen before the update);
# "buffer": an infinite BatchNorm running variance, which no gradient sees (seen before the save).
# Unchecked is the old trainer (loss checked only), the negative control: it writes the bad tensors.
@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked-writes-them"])
@pytest.mark.parametrize("inject", ["gradient", "buffer"])
def test_non_finite_tensors_never_reach_a_checkpoint(tmp_path, monkeypatch, clean_step_3, inject, checked):
    from fewshot.methods.contrastive import SimCLR

    if inject == "gradient":
        real_loss, calls = SimCLR.loss, []

        def nan_gradient_in_step_6(self, z1, z2, labels):
            calls.append(1)
            out = real_loss(self, z1, z2, labels)
            return _NanGradient.apply(out) if len(calls) == 6 else out

        monkeypatch.setattr(SimCLR, "loss", nan_gradient_in_step_6)
        expected = r"gradient of .* is not finite in step 6, which was not applied"
    else:

        def inf_running_var_after_step_5(self, step, total_steps):
            if step + 1 == 5:
                next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))

        monkeypatch.setattr(SimCLR, "after_step", inf_running_var_after_step_5)
        expected = r"'model\.encoder\..*running_var' is not finite after step 6, so step 6 was not saved"
    if not checked:
        monkeypatch.setattr(trainer, "first_non_finite", lambda named: None)

    error = None
    try:
        api.pretrain(_config(tmp_path, "bad"), progress=False)
    except TrainingDiverged as exc:
        error = str(exc)
    kept = load_checkpoint(tmp_path / "bad" / "checkpoints" / "last.safetensors")
    non_finite = [k for k, v in kept.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if checked:
        assert error is not None and re.search(expected + r"; training stopped and the last good checkpoint \(step 3\)", error), error
        assert kept.step == 3 and non_finite == []
        assert kept.tensors.keys() == clean_step_3.keys()
        for k, v in kept.tensors.items():
            assert torch.equal(v, clean_step_3[k]), k
    else:
        assert error is None and kept.step == 6 and non_finite, "the unchecked trainer should have written them"


def test_first_non_finite_names_the_tensor_and_is_not_fooled_by_overflow():
    huge = torch.tensor([1e30, 1e30])  # finite, but its norm overflows float32: the fast path's false alarm
    named = [("a", torch.ones(2)), ("b", huge), ("i", torch.tensor([2**62])), ("none", None)]
    assert trainer.first_non_finite(named) is None
    assert trainer.first_non_finite([*named, ("c", torch.tensor([0.0, float("inf")])), ("d", torch.tensor([float("nan")]))]) == "c"
    assert trainer.first_non_finite([*named, ("d", torch.tensor([float("nan")], dtype=torch.float64))]) == "d"


def test_learning_rate_schedule():
    cfg = api.load_config(overrides=["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"])
    lrs = [trainer.learning_rate(s, cfg.train) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 89 / 90)).item()))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_batch_order_covers_each_epoch_once_per_rank():
    world = 2
    orders = [trainer.BatchOrder(20, 4, seed=3, rank=r, world=world) for r in range(world)]
    seen = torch.cat([o.indices(s) for s in range(orders[0].per_epoch) for o in orders])
    assert len(seen) == 16 and len(set(seen.tolist())) == 16  # disjoint across ranks and steps
    assert torch.equal(trainer.BatchOrder(20, 4, seed=3).indices(5), trainer.BatchOrder(20, 4, seed=3).indices(5))


def test_sync_batchnorm_under_ddp_on_gpus_only():
    """Auto (None) syncs under DDP on GPUs; on CPU torch has no SyncBatchNorm (tests/test_distributed.py
    shows its error), so auto stays per-process there and an explicit true is a one-line error."""
    train = api.load_config().train
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [trainer.use_sync_batchnorm(train, w, d) for w, d in [(1, cpu), (1, gpu), (2, cpu), (2, gpu)]] == [False, False, False, True]
    assert not trainer.use_sync_batchnorm(train.model_copy(update={"sync_batchnorm": False}), 2, gpu)
    with pytest.raises(ConfigError, match="train.sync_batchnorm=true needs GPUs"):
        trainer.use_sync_batchnorm(train.model_copy(update={"sync_batchnorm": True}), 2, cpu)


def test_sync_batchnorm_conversion_keeps_plain_checkpoints(tmp_path, monkeypatch):
    """Where it applies, the trainer converts every BatchNorm and its checkpoint still loads into plain
    BatchNorm (on one process SyncBatchNorm falls back to BatchNorm, so CPU can run it)."""
    converted = []
    real = torch.nn.SyncBatchNorm.convert_sync_batchnorm

    def spy(module, process_group=None):
        out = real(module, process_group)
        converted.append(sum(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules()))
        return out

    monkeypatch.setattr(trainer, "use_sync_batchnorm", lambda train, world_size, device: True)
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "convert_sync_batchnorm", spy)
    api.pretrain(_config(tmp_path, "sync", "train.steps=2"), progress=False)
    assert converted and converted[-1] >= 5  # the outermost call (it recurses): 4 in Conv-4, 1 in the projector
    _, method, ckpt = api.load_pretrained(tmp_path / "sync")
    assert ckpt.step == 2 and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.modules())


def test_ddp_on_two_cpu_processes(tmp_path):
    """The same recipe under DDP (gloo, 2 processes): each rank trains on its own slice; rank 0 writes."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fewshot.cli", "pretrain", "--json", f"out={tmp_path}", "name=ddp", *TINY,
           "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # one result, from rank 0
    assert json.loads(lines[0])["step"] == 6
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors").step == 6


def _reuse_when_any_checkpoint(config, progress=False):
    """The broken rule pretrain_to_completion replaces: any checkpoint counts as a finished run."""
    from fewshot.train.trainer import checkpoint_path

    return None if checkpoint_path(config.run_dir).exists() else api.pretrain(config, progress=progress)


@pytest.mark.parametrize("finish, completes", [(api.pretrain_to_completion, True), (_reuse_when_any_checkpoint, False)])
def test_a_run_stopped_partway_is_resumed_not_reused(tmp_path, finish, completes):
    from fewshot.run import Run

    base = ["method=simclr", "data.source=digits", "data.holdout_classes=5", "train.batch_size=8", "train.warmup_steps=1",
            f"out={tmp_path}", "name=r", "train.steps=4"]
    api.pretrain(api.load_config(overrides=[*base, "train.max_minutes=0.00001"]), progress=False)  # stops after its first step
    config = api.load_config(overrides=base)
    assert Run.open(config.run_dir).step == 1
    finish(config, progress=False)
    assert (Run.open(config.run_dir).step == 4) is completes
    if completes:
        assert api.pretrain_to_completion(config, progress=False) is None  # finished: reused, not retrained


def _reuse_whatever_its_settings(config, progress=False):
    """The broken rule the settings check replaces: a finished run is reused whatever settings trained it."""
    from fewshot.run import Run
    from fewshot.train.trainer import checkpoint_path

    if checkpoint_path(config.run_dir).exists() and Run.open(config.run_dir).step >= config.train.steps:
        return None
    return api.pretrain_to_completion(config, progress=progress)


@pytest.mark.parametrize("finish, refuses", [(api.pretrain_to_completion, True), (_reuse_whatever_its_settings, False)])
def test_a_run_of_other_settings_is_refused_not_reused(tmp_path, finish, refuses):
    """A bench rerun with other overrides must not score the old run as the new one: the folder is refused in one
    line naming the setting, and its checkpoint is untouched; settings that do not shape the weights (log and
    checkpoint cadence, a time limit) still reuse it. The broken rule (reuse by step count alone) is the control."""
    from fewshot.train.trainer import checkpoint_path

    base = ["method=simclr", "data.source=digits", "data.holdout_classes=5", "train.batch_size=8", "train.warmup_steps=1",
            f"out={tmp_path}", "name=r", "train.steps=2"]
    api.pretrain(api.load_config(overrides=base), progress=False)
    stored = checkpoint_path(api.load_config(overrides=base).run_dir).read_bytes()
    assert api.pretrain_to_completion(api.load_config(overrides=[*base, "train.log_every=1", "train.checkpoint_every=1",
                                                                 "train.max_minutes=5"]), progress=False) is None
    other = api.load_config(overrides=[*base, "train.lr=0.5"])
    if refuses:
        with pytest.raises(CheckpointError, match=r"holds a run of other settings \(train\.lr: 0\.\d+ there, 0\.5 asked\)") as err:
            finish(other, progress=False)
        assert "\n" not in str(err.value)
    else:
        assert finish(other, progress=False) is None  # the old run silently stands in for the one asked for
    assert checkpoint_path(other.run_dir).read_bytes() == stored


@pytest.mark.parametrize("variant", ["stored value read", "stored value ignored"])
def test_training_cpu_seconds_add_up_over_resumes(tmp_path, monkeypatch, variant):
    """The checkpoint keeps the training loop's CPU seconds summed over sessions (what a bench reports for a run it
    reuses): a resume adds its own to the stored figure. The stored figure is set to 1000 s before resuming, so the
    sum is > 1000; a trainer that ignores the stored figure (the control) ends with this session's alone."""
    import dataclasses

    from fewshot.train.checkpoint import Checkpoint, save_checkpoint
    from fewshot.train.trainer import checkpoint_path

    base = ["method=simclr", "data.source=digits", "data.holdout_classes=5", "train.batch_size=8", "train.warmup_steps=1",
            f"out={tmp_path}", "name=r", "train.steps=3"]
    first = api.pretrain(api.load_config(overrides=[*base, "train.max_minutes=0.00001"]), progress=False)  # stops after step 1
    path = checkpoint_path(first.run_dir)
    kept = load_checkpoint(path)
    assert first.step == 1 and kept.meta["cpu_seconds"] == first.cpu_seconds > 0
    path.unlink(), path.with_suffix(".json").unlink()
    save_checkpoint(path, Checkpoint(kept.config, kept.step, kept.tensors, {**kept.meta, "cpu_seconds": 1000.0}))
    if variant == "stored value ignored":
        real = api._pretrain

        def ignoring(*args, checkpoint=None, **kwargs):
            meta = {k: v for k, v in checkpoint.meta.items() if k != "cpu_seconds"}
            return real(*args, checkpoint=dataclasses.replace(checkpoint, meta=meta), **kwargs)

        monkeypatch.setattr(api, "_pretrain", ignoring)
    result = api.pretrain(api.load_config(overrides=base), resume=True, progress=False)
    total = load_checkpoint(path).meta["cpu_seconds"]
    assert result.step == 3 and total == result.cpu_seconds
    assert (total > 1000.0) == (variant == "stored value read")


_ONE_RANK_NAN = '''
import sys
import torch
from fewshot import api
from fewshot.methods.contrastive import SimCLR
from fewshot.train import trainer

real_loss, calls = SimCLR.loss, {"n": 0}

def loss_nan_on_rank_one(self, z1, z2, labels):
    calls["n"] += 1
    out = real_loss(self, z1, z2, labels)
    return out * float("nan") if calls["n"] == 5 and torch.distributed.get_rank() == 1 else out

SimCLR.loss = loss_nan_on_rank_one
if sys.argv[2] == "each rank checks alone":  # negative control: the check before this trainer's, local to each rank
    trainer.nonfinite_ranks = lambda fabric, loss: int(not torch.isfinite(loss))
try:
    api.pretrain(api.load_config(overrides=[f"out={sys.argv[1]}", "name=ddp-nan", *sys.argv[3:]]), progress=False)
except Exception as err:  # each rank says how it stopped
    print(f"rank {torch.distributed.get_rank()} stopped: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
    sys.exit(3)
'''


@pytest.mark.parametrize("variant", ["as built", "each rank checks alone"])
def test_a_nan_on_one_ddp_rank_stops_every_rank(tmp_path, variant):
    """Under DDP (gloo, 2 processes) rank 1's loss turns NaN in step 5: both ranks stop on the trainer's check, with the
    same one-line error, and step 3's checkpoint is kept. The negative control, each rank checking only its own loss,
    leaves rank 0 in the next collective: on gloo it crashes there when rank 1 exits (NCCL would wait)."""
    import subprocess
    import sys

    script = tmp_path / "one_rank_nan.py"
    script.write_text(_ONE_RANK_NAN)
    cmd = [sys.executable, str(script), str(tmp_path), variant, *TINY, "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        out = proc.stdout
    except subprocess.TimeoutExpired as err:  # a hang: no rank finished
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    message = "TrainingDiverged: loss became non-finite on 1 of 2 processes in step 5, which was not applied"
    both = all(f"rank {r} stopped: {message}" in out for r in (0, 1))
    assert both == (variant == "as built"), out[-2000:]
    if variant == "as built":
        assert load_checkpoint(tmp_path / "ddp-nan" / "checkpoints" / "last.safetensors").step == 3
