"""The one training loop every method runs through, on Lightning Fabric.

Read top to bottom: set up Fabric → build the method → restore a checkpoint if resuming →
for each step: batch → views + loss inside the method → backward → optimizer → hook → log →
checkpoint. CPU here; the same config on 1..N GPUs or nodes (DDP), bf16 where the GPU has it.

Steps count optimizer updates: "step N" is the state after N updates, everywhere — the history
row N (which logs the loss update N minimised), the checkpoint of step N, and the error that says
step N was not applied (so the run stopped at step N − 1).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from tqdm.auto import tqdm

from fewshot.config import RunConfig, TrainConfig, config_from_dict
from fewshot.data.types import TrainingData
from fewshot.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from fewshot.methods import build_method
from fewshot.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_weights,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time in the training loop, all threads, summed over resumes
    global_rank: int = 0  # under DDP every process returns; only rank 0 should report

    @property
    def views_per_second(self) -> float:
        """Median training throughput over the logged intervals (both views of a pair counted)."""
        rates = [h["views_per_s"] for h in self.history if h.get("views_per_s")]
        return statistics.median(rates) if rates else 0.0


def resolve_precision(train: TrainConfig) -> str:
    """bf16 autocast only where the device has bf16 units; on CPU it is 5× slower than fp32."""
    if train.precision != "auto":
        return train.precision
    on_gpu = train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr · min_lr_ratio`` at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


class BatchOrder:
    """Seeded epoch permutations: step s of any run with the same seed sees the same images,
    so a resumed run continues exactly where it stopped. Each rank takes its own slice."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch < 1:
            raise DataError(f"batch_size {batch_size} × {world} device(s) is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = (i * self.world + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size]


def use_sync_batchnorm(train: TrainConfig, world_size: int, device: torch.device) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm: under DDP each process would otherwise normalise
    with its own slice's statistics, and the update would differ from one process on the joined batch.
    torch (2.14) has SyncBatchNorm only for GPUs: on CPU its forward raises "SyncBatchNorm expected
    input tensor to be on GPU", so auto (None) leaves CPU runs per-process and ``true`` there is an error."""
    if world_size == 1:
        return False
    if device.type == "cpu":
        if train.sync_batchnorm:
            raise ConfigError(
                "train.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU; "
                "set train.sync_batchnorm=false (each process then normalises with its own batch's statistics)"
            )
        return False
    return train.sync_batchnorm is not False


def nonfinite_ranks(fabric: Fabric, loss: torch.Tensor) -> int:
    """How many processes hold a NaN or ±inf loss. Every rank learns the count (one small all-reduce), so one rank's NaN
    stops them all: a rank raising alone would leave the others waiting forever in the gradient all-reduce."""
    bad = (~torch.isfinite(loss.detach())).float()
    return int(fabric.all_reduce(bad, reduce_op="sum").item()) if fabric.world_size > 1 else int(bad.item())


def first_non_finite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or ±inf, else None.

    Fast path: a NaN or ±inf entry makes the total norm NaN or inf, and the norm takes one fused
    kernel per device and dtype and one host sync. Only a non-finite norm (or one that overflowed
    from huge finite entries) is looked into tensor by tensor."""
    named = [(name, t.detach()) for name, t in named if t is not None and t.is_floating_point()]
    if not named or torch.isfinite(torch.nn.utils.get_total_norm([t for _, t in named])):
        return None
    return next((name for name, t in named if not torch.isfinite(t).all()), None)


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.safetensors"


def _state_tensors(method: torch.nn.Module, optimizer: torch.optim.Optimizer, view_gen: torch.Generator):
    optim_tensors, optim_scalars = optimizer_to_flat(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
    tensors.update(optim_tensors)
    tensors["rng.views"] = view_gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, optim_scalars


def pretrain(
    config: RunConfig,
    data: TrainingData,
    resume: bool = False,
    progress: bool = True,
    fabric: Fabric | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Pre-train ``config.method`` on ``data`` and write checkpoints to ``config.run_dir``.

    With ``resume=True`` the run continues from ``run_dir/checkpoints/last`` (using the
    checkpoint's own config) and ends with the same weights as an uninterrupted run;
    ``checkpoint`` is that file when the caller has already read it (``Run.open``).
    """
    run_dir = config.run_dir
    ckpt_path = checkpoint_path(run_dir)
    restored: Checkpoint | None = None
    if resume:
        restored = checkpoint or (load_checkpoint(ckpt_path) if ckpt_path.exists() else None)
        if restored is None:
            raise CheckpointError(f"cannot resume: no checkpoint at '{ckpt_path}'")
        stored = config_from_dict(restored.config)
        # Only how long to run may change on resume; everything that shapes the weights is the stored run's.
        stored.train.max_minutes = config.train.max_minutes
        config = stored
    elif ckpt_path.exists():
        raise CheckpointError(f"run folder '{run_dir}' already holds a checkpoint; pass --resume to continue it or choose another name")
    train = config.train

    if fabric is None:
        fabric = Fabric(
            accelerator=train.accelerator,
            devices=train.devices,
            num_nodes=train.num_nodes,
            strategy=train.strategy,
            precision=resolve_precision(train),
            loggers=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
        )
        fabric.launch()
    torch.manual_seed(train.seed)
    method = build_method(config)  # after seeding, so the initial weights depend only on the seed
    if use_sync_batchnorm(train, fabric.world_size, fabric.device):
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # same state_dict keys: checkpoints stay plain
    missing = [key for key in method.inputs if key not in data.keys]
    if missing:
        raise ConfigError(
            f"method '{config.method.name}' reads {', '.join(missing)} from each batch, but data.source={config.data.source} "
            f"gives only {', '.join(sorted(data.keys))}" + (" (the pre-training data is unlabeled)" if "labels" in missing else "")
        )
    if train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    # Frozen parameters (MoCo's and BYOL's EMA targets) move only through after_step.
    trainable = [(name, p) for name, p in method.named_parameters() if p.requires_grad]
    scales: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in trainable:
        scales.setdefault(float(method.lr_scale(name)), []).append(p)
    groups = [{"params": params, "lr_scale": scale} for scale, params in scales.items()]
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    view_gen = torch.Generator().manual_seed(train.seed + 7919 * fabric.global_rank)

    start_step, history, train_seconds, cpu_seconds, saved_step = 0, [], 0.0, 0.0, 0
    if restored is not None:
        load_weights(method, restored.prefixed("model"), f"checkpoint '{ckpt_path}'", f"method '{config.method.name}'")
        view_gen.set_state(restored.tensors["rng.views"])
        torch.set_rng_state(restored.tensors["rng.torch"])
        start_step = saved_step = restored.step
        history = list(restored.meta.get("history", []))
        train_seconds = float(restored.meta.get("train_seconds", 0.0))
        cpu_seconds = float(restored.meta.get("cpu_seconds", 0.0))  # 0 for a checkpoint older than the key
    raw_method = method
    method, optimizer = fabric.setup(method, optimizer)
    if restored is not None:
        optimizer.load_state_dict(optimizer_from_flat(restored.prefixed("optim"), restored.meta["optimizer"]))

    order = BatchOrder(len(data), train.batch_size, train.seed, fabric.global_rank, fabric.world_size)
    # A GradScaler (fp16) skips steps with non-finite gradients itself; its scaled gradients may be inf.
    check_gradients = getattr(fabric.strategy.precision, "scaler", None) is None

    def diverged(what: str) -> TrainingDiverged:
        kept = f"the last good checkpoint (step {saved_step}) is kept at '{ckpt_path}'" if saved_step else "no checkpoint had been written yet"
        return TrainingDiverged(f"{what}; training stopped and {kept}")

    def save(step: int) -> Path:
        # Every rank checks (their states are equal under DDP), so all stop together, before anything is written.
        tensors, optim_scalars = _state_tensors(raw_method, optimizer, view_gen)
        bad = first_non_finite(tensors.items())
        if bad is not None:
            raise diverged(f"'{bad}' is not finite after step {step}, so step {step} was not saved")
        if fabric.is_global_zero:
            meta = {"optimizer": optim_scalars, "history": history, "train_seconds": train_seconds, "cpu_seconds": cpu_seconds}
            save_checkpoint(ckpt_path, Checkpoint(config.model_dump(mode="json"), step, tensors, meta))
        fabric.barrier()
        return ckpt_path

    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.model_dump_json(indent=1))
    bar = tqdm(total=train.steps, initial=start_step, disable=not (progress and fabric.is_global_zero), unit="step", dynamic_ncols=True)
    views_per_step = raw_method.views_per_sample * train.batch_size * fabric.world_size
    method.train()
    step, window_start, window_steps, session_start, session_cpu = start_step, time.perf_counter(), 0, time.perf_counter(), time.process_time()
    for step in range(start_step, train.steps):
        idx = order.indices(step)
        # Only the keys the method declares: a label-free method never receives the labels.
        batch = fabric.to_device({key: value for key, value in data.batch(idx).items() if key in raw_method.inputs})
        lr = learning_rate(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a group restored from a checkpoint older than lr_scale lacks the key
        loss, logs = method(batch, view_gen)
        bad_ranks = nonfinite_ranks(fabric, loss)
        if bad_ranks and fabric.world_size > 1:
            raise diverged(f"loss became non-finite on {bad_ranks} of {fabric.world_size} processes in step {step + 1}, which was not applied")
        if bad_ranks:
            raise diverged(f"loss became {loss.item()} in step {step + 1}, which was not applied")
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        if check_gradients:  # a finite loss can still have NaN gradients (0·inf, sqrt at 0, a bad op)
            bad = first_non_finite([*((f"gradient of {n}", p.grad) for n, p in trainable), *((f"parameter {n}", p) for n, p in trainable)])
            if bad is not None:
                raise diverged(f"{bad} is not finite in step {step + 1}, which was not applied")
        optimizer.step()
        raw_method.after_step(step, train.steps)
        window_steps += 1

        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": loss.item(), "lr": lr, "views_per_s": views_per_step * window_steps / elapsed, **logs}
            history.append(row)
            fabric.log_dict(row, step=done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", views_s=f"{row['views_per_s']:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        bar.update(1)
        out_of_time = train.max_minutes is not None and train_seconds + time.perf_counter() - session_start > 60 * train.max_minutes
        if done % train.checkpoint_every == 0 or done == train.steps or out_of_time:
            train_seconds += time.perf_counter() - session_start
            cpu_seconds += time.process_time() - session_cpu
            session_start, session_cpu = time.perf_counter(), time.process_time()
            save(done)
            saved_step = done
        if out_of_time:
            break
    bar.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    final_step = step + 1 if train.steps > start_step else start_step
    return TrainResult(run_dir, ckpt_path, final_step, history, train_seconds, cpu_seconds, fabric.global_rank)
