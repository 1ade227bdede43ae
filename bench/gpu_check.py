"""The GPU path, checked on a lent GPU: precision, memory format, a DDP launch, and that bf16 still learns.

1. Throughput: SimCLR on digits (``bench/throughput.py``'s Conv-4 and views, batch ``--batch``) for each of
   fp32 (``32-true``) and bf16 autocast (``bf16-mixed``), with and without ``channels_last``; the settings take
   turns, ``--trials`` each, and the table gives the median views/s (both views counted) of each.
2. Does bf16 learn as fp32 does: the simclr-digits recipe at both precisions, then the evaluator's 5-way 1- and
   5-shot episodes on the five held-out digits, next to pixels and the random encoder.
3. A DDP launch through the CLI (``train.strategy=ddp``, every visible GPU; NCCL): the checkpoint's step, and
   that each rank's process ended.
4. The transformer and vision–language recipes at bf16 autocast (``--vl-steps``; 0 skips): a small scene pool and
   scene corpus, then clip-scenes, gpt-scenes, Frozen and Flamingo (over those two runs) and MAE on digits, each's
   first and last logged loss (finite, falling) and steps/s.

On a machine without a GPU it runs on the CPU (``--quick``: a smoke run that measures nothing). One JSON line at
the end.

    python bench/gpu_check.py                 # a few GPU-minutes on one H200 (docs/benchmarks.md)
    OMP_NUM_THREADS=2 python bench/gpu_check.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewshot import api
from fewshot.train.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import fewshot_views_per_second  # noqa: E402  (the same SimCLR work as the CPU throughput bench)

PRECISIONS = ("32-true", "bf16-mixed")


def learns(out: str, precision: str, steps: int, episodes: int, accelerator: str) -> dict:
    cfg = api.load_config(api.find_recipe("simclr-digits"), [f"out={out}", f"name=digits-{precision}", f"train.steps={steps}",
                                                            f"train.precision={precision}", f"train.accelerator={accelerator}",
                                                            "train.devices=1", f"eval.episodes={episodes}"])
    started = time.perf_counter()
    result = api.pretrain(cfg, progress=False)
    seconds = time.perf_counter() - started
    report = api.evaluate_run(result.run_dir)
    final_loss = result.history[-1]["loss"]
    accuracy = {f"{r['encoder']} {r['shot']}-shot": f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"
                for r in report.results if r["classifier"] == "proto-cosine"}
    return {"precision": precision, "steps": result.step, "train_s": round(seconds, 1), "final_loss": round(final_loss, 4),
            "views_per_s": round(result.views_per_second), "5-way proto-cosine": accuracy}


def ddp_launch(out: str, steps: int, accelerator: str) -> dict:
    devices = max(1, torch.cuda.device_count()) if accelerator == "gpu" else 2
    cmd = [sys.executable, "-m", "fewshot.cli", "pretrain", "--json", f"out={out}", "name=ddp", "train.strategy=ddp",
           f"train.accelerator={accelerator}", f"train.devices={devices}", f"train.steps={steps}", "train.batch_size=64",
           f"train.checkpoint_every={steps}", "data.image_size=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ckpt = Path(out) / "ddp" / "checkpoints" / "last.safetensors"
    return {"devices": devices, "returncode": done.returncode, "checkpoint_step": load_checkpoint(ckpt).step if ckpt.exists() else None,
            "stderr_tail": done.stderr.strip().splitlines()[-1:] if done.returncode else []}


def vl_path(out: str, steps: int, accelerator: str, precision: str) -> dict:
    """clip-scenes, gpt-scenes, frozen-scenes, flamingo-scenes (and mae-digits) for ``steps`` each: first / last loss, steps/s."""
    from fewshot.data.scenes import write_scenes
    from reused_runs import scene_lm_config

    root = Path(out) / "vl"
    pool = root / "scenes"
    write_scenes(pool, 2000, 32, (1, 2), 0)
    run = [f"train.accelerator={accelerator}", "train.devices=1", f"train.precision={precision}", f"train.steps={steps}",
              f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 10)}", f"train.warmup_steps={max(1, steps // 10)}"]
    lm = scene_lm_config(root, steps, 2000, 800, 0, run)  # writes its scene corpus, also the pairs tokenizers' text
    pairs = [f"data.path={pool / 'manifest.tsv'}", f"data.corpus={lm.data.path}", f"out={root}"]
    configs = {"clip-scenes": api.load_config(api.find_recipe("clip-scenes"), [*pairs, "name=clip", *run]), "gpt-scenes": lm}
    configs["frozen-scenes"] = api.load_config(api.find_recipe("frozen-scenes"), [*pairs, "name=frozen", *run,
                                                                                 f"method.lm.init={configs['gpt-scenes'].run_dir}"])
    configs["flamingo-scenes"] = api.load_config(api.find_recipe("flamingo-scenes"), [
        *pairs, "name=flamingo", *run, f"method.lm.init={configs['gpt-scenes'].run_dir}",
        f"method.image.init={configs['clip-scenes'].run_dir}", "method.episodes=2", "method.text_distill=1.0", "method.gate_lr_scale=10"])
    configs["mae-digits"] = api.load_config(api.find_recipe("mae-digits"), [f"out={root}", "name=mae", *run])
    rows = {}
    for name, config in configs.items():
        started = time.perf_counter()
        result = api.pretrain(config, progress=False)
        losses = [h["loss"] for h in result.history]
        rows[name] = {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "finite": all(map(math.isfinite, losses)),
                      "steps_per_s": round(result.step / (time.perf_counter() - started), 1)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per throughput trial")
    p.add_argument("--batch", type=int, default=512, help="pairs per step in the throughput trials")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--learn-steps", type=int, default=300, help="simclr-digits steps at each precision")
    p.add_argument("--episodes", type=int, default=600, help="evaluation episodes per setting")
    p.add_argument("--vl-steps", type=int, default=100, help="steps of each transformer / vision-language recipe at bf16 (0: skip)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny steps, batches and episodes")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.trials, args.learn_steps, args.episodes, args.vl_steps = 4, 16, 1, 4, 10, min(args.vl_steps, 3)
    gpu = torch.cuda.is_available()
    accelerator = "gpu" if gpu else "cpu"
    device = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"torch {torch.__version__} on {device}" + (f", bf16 supported: {torch.cuda.is_bf16_supported()}" if gpu else ""))
    out = tempfile.mkdtemp(prefix="gpu-check-")
    rates: dict[str, list[float]] = {}
    for trial in range(args.trials):
        for precision in PRECISIONS:
            for channels_last in (False, True):
                key = f"{precision}{' channels_last' if channels_last else ''}"
                overrides = [f"train.batch_size={args.batch}", f"train.precision={precision}", f"train.accelerator={accelerator}", "train.devices=1"]
                rates.setdefault(key, []).append(fewshot_views_per_second(args.steps, out, trial, channels_last, overrides, tag=f"{precision}-"))
    medians = {key: round(statistics.median(v)) for key, v in rates.items()}
    print(f"\nSimCLR views/s (batch {args.batch}, median of {args.trials} trials of {args.steps} steps)")
    for key, rate in medians.items():
        print(f"  {key:28s} {rate:>10,d}   (trials: {', '.join(f'{r:,.0f}' for r in rates[key])})")
    learned = [learns(out, precision, args.learn_steps, args.episodes, accelerator) for precision in PRECISIONS]
    print(f"\nsimclr-digits, {args.learn_steps} steps, then {args.episodes} episodes on the held-out digits")
    for row in learned:
        print(f"  {row['precision']:12s} loss {row['final_loss']:.4f}  {row['views_per_s']:,} views/s  {row['train_s']} s")
        print("    " + ";  ".join(f"{k} {v}" for k, v in row["5-way proto-cosine"].items()))
    ddp = ddp_launch(out, 6 if args.quick else 50, accelerator)
    print(f"\nDDP launch on {ddp['devices']} {accelerator} device(s): exit {ddp['returncode']}, checkpoint step {ddp['checkpoint_step']} {ddp['stderr_tail']}")
    vl = vl_path(out, args.vl_steps, accelerator, "bf16-mixed") if args.vl_steps else {}
    if vl:
        print(f"\nbf16 autocast, {args.vl_steps} steps each")
        for name, row in vl.items():
            print(f"  {name:16s} loss {row['first_loss']:.4f} → {row['last_loss']:.4f}  finite: {row['finite']}  {row['steps_per_s']} steps/s")
    print(json.dumps({"device": device, "torch": torch.__version__, "views_per_s": medians, "learns": learned, "ddp": ddp, "bf16_recipes": vl}))


if __name__ == "__main__":
    main()
