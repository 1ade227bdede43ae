"""The one trainer: resume gives the same weights, NaN stops and keeps the last good checkpoint."""

import pytest
import torch

from fewshot import api
from fewshot.errors import CheckpointError, TrainingDiverged
from fewshot.train import trainer
from fewshot.train.checkpoint import load_checkpoint
from conftest import pretrain_interrupted

TINY = ["data.image_size=16", "train.steps=6", "train.batch_size=32", "train.checkpoint_every=3",
        "train.log_every=1", "train.warmup_steps=2", "method.projection_hidden=32", "method.projection_dim=16",
        "encoder.options={width: 8}"]


def _config(tmp_path, name, *extra):
    return api.load_config(overrides=[f"out={tmp_path}", f"name={name}", *TINY, *extra])


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.safetensors").prefixed("model")


@pytest.mark.parametrize(
    "method",
    [
        [],  # simclr
        # MoCo's queue, pointer and key encoder, BYOL's target must come back from the checkpoint.
        # 96 keys, not 64: with 64 keys per step a queue of 64 is rewritten whole and its pointer stays at 0.
        ["method=moco", "method.queue_size=96"],
        ["method=byol", "method.predictor_hidden=32"],
        # R2-D2's learned λ, scale and bias are parameters with optimizer state too.
        ["method=protonet"],
        ["method=r2d2"],
    ],
    ids=["simclr", "moco", "byol", "protonet", "r2d2"],
)
def test_resumed_run_matches_uninterrupted(tmp_path, monkeypatch, method):
    full = api.pretrain(_config(tmp_path, "full", *method), progress=False)
    assert full.step == 6

    pretrain_interrupted(monkeypatch, _config(tmp_path, "cut", *method))
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").step == 3

    resumed = api.pretrain(_config(tmp_path, "cut", *method), resume=True, progress=False)
    assert resumed.step == 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the history carries on across the interruption
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=0)


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
    with pytest.raises(TrainingDiverged, match="step 4.*step 3"):
        api.pretrain(_config(tmp_path, "nan"), progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.safetensors").step == 3


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
