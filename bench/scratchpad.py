"""Why chain-of-thought helps, from scratch (issue 18 item 3): a GPT trained on multi-step sums and products with the
scratchpad in its targets (the intermediate results, one per step, then the answer; Nye et al. 2021) against the
same GPT trained on the answer alone.

Both runs use the ``gpt-scratchpad`` recipe (``data.source=arithmetic``, character tokens) and differ only in
``data.scratchpad``: the same problems (1 … ``--max-train-steps`` steps) in the same order, the same seed, window
(``data.seq_len``), steps and batch, so the same compute; the loss is on the target tokens only. Each is scored
greedily (KV cache, until [EOS]) on held-out problems (``--items`` per length, disjoint from training by a hash
of the question) of 1 … ``--eval-steps`` steps: exact accuracy % ± 95% CI over items (1.96·std/√n). The verdict:
at each length beyond training, is the scratchpad run above the answer-only run by more than both CIs? Prints the
table, saves the plot (``--plot``), ends with one JSON line.

    OMP_NUM_THREADS=1 python bench/scratchpad.py --seed 0 --plot docs/figures/scratchpad.png   # 18.3 CPU-minutes measured, both runs (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from fewshot import api
from fewshot.config import RunConfig
from fewshot.data.registry import load_run_data
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.evaluate.runner import above_beyond_ci95, mean_ci95
from fewshot.evaluate.scratchpad import accuracy_by_steps, plot_accuracy_by_steps, steps_table
from fewshot.io import atomic_write
from fewshot.run import Run
from fewshot.train.trainer import BatchOrder

VARIANTS = {"scratchpad": True, "answer-only": False}


def recipe(args: argparse.Namespace, variant: str) -> RunConfig:
    overrides = [
        f"out={args.out}", f"name={variant}-seed{args.seed}", f"data.scratchpad={str(VARIANTS[variant]).lower()}",
        f"data.max_steps={args.max_train_steps}", f"data.problems={args.problems}", f"data.seq_len={args.seq_len}",
        f"data.random_offsets={str(args.random_offsets).lower()}", f"data.split_seed={args.seed}",
        f"encoder.options.dim={args.dim}", f"encoder.options.depth={args.depth}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.seed={args.seed}", f"train.lr={args.lr}",
        f"train.max_minutes={args.wall_minutes}",
    ]
    return api.load_config(api.find_recipe("gpt-scratchpad"), overrides)


def tokens_seen(config: RunConfig) -> dict[str, int]:
    """Window, non-padding and target tokens of the batches the run's trainer draws (the same BatchOrder)."""
    data = load_run_data(config.data, None, None).pretrain
    order = BatchOrder(len(data), config.train.batch_size, config.train.seed)
    real = target = 0
    for step in range(config.train.steps):
        batch = data.batch(order.indices(step))
        real += int((batch["tokens"] != PAD_ID).sum())
        target += int((batch["targets"] != IGNORE_INDEX).sum())
    return {"window_tokens": config.train.steps * config.train.batch_size * config.data.seq_len, "real_tokens": real, "target_tokens": target}


def train(config: RunConfig) -> dict[str, Any]:
    timing = config.run_dir / "bench_timing.json"
    cpu = time.process_time()
    result = api.pretrain_to_completion(config, progress=False)
    if result is not None:
        stats = {"train_cpu_minutes": round((time.process_time() - cpu) / 60, 2), "train_wall_minutes": round(result.train_seconds / 60, 2)}
        atomic_write(timing, lambda tmp: tmp.write_text(json.dumps(stats)))
    return json.loads(timing.read_text()) if timing.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3600, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="training seed, data split seed and held-out draw")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=160, help="the window both variants are padded to")
    parser.add_argument("--problems", type=int, default=20000)
    parser.add_argument("--max-train-steps", type=int, default=3, help="training problems have 1 … this many steps")
    parser.add_argument("--eval-steps", type=int, default=6, help="held-out problems of 1 … this many steps")
    parser.add_argument("--items", type=int, default=100, help="held-out problems per length (fewer where fewer exist)")
    parser.add_argument("--random-offsets", action=argparse.BooleanOptionalAction, default=True,
                        help="train each sequence at a random start in the window (positions past the training lengths get trained)")
    parser.add_argument("--wall-minutes", type=float, default=60.0, help="wall-clock stop per run (train.max_minutes)")
    parser.add_argument("--out", default="runs/bench-scratchpad")
    parser.add_argument("--plot", default=None, help="PNG path (default: OUT/scratchpad-seedS.png)")
    args = parser.parse_args()

    cpu0 = time.process_time()
    curves, runs = {}, {}
    for variant in VARIANTS:
        config = recipe(args, variant)
        info = train(config)
        run = Run.open(config.run_dir)
        info.update(step=run.step, final_loss=run.history[-1]["loss"] if run.history else None,
                    parameters=sum(p.numel() for p in run.encoder().parameters()), **tokens_seen(config))
        model = run.method().language_model()
        curves[variant] = accuracy_by_steps(model, range(1, args.eval_steps + 1), args.items, args.seed, config.data.heldout_fraction)
        runs[variant] = info
    cpu_minutes = (time.process_time() - cpu0) / 60

    print(f"\nheld-out accuracy % ± 95% CI by number of steps (training: 1 … {args.max_train_steps}; seed {args.seed})")
    print(steps_table(curves, args.max_train_steps))
    print("\nrun          steps  params   window tokens   real tokens  target tokens  final loss  train CPU-min")
    for variant, info in runs.items():
        print(f"{variant:<12} {info['step']:5d}  {info['parameters']:7,}  {info['window_tokens']:13,}  {info['real_tokens']:12,}  "
              f"{info['target_tokens']:13,}  {info['final_loss']:10.4f}  {info.get('train_cpu_minutes', float('nan')):6.2f}")
    print("\nthe scratchpad run's first error per held-out problem (walking the gold steps in order):")
    for row in curves["scratchpad"]:
        print(f"{row['steps']:4d}  " + ", ".join(f"{k} {v}" for k, v in sorted(row["first_errors"].items(), key=lambda kv: -kv[1])))
    pad, direct = curves["scratchpad"], curves["answer-only"]
    verdict = {str(a["steps"]): above_beyond_ci95(a, b) for a, b in zip(pad, direct) if a["steps"] > args.max_train_steps}
    pooled = {}
    for variant, rows in curves.items():  # every item beyond training, pooled (each length weighted by its items)
        flags = [100.0 * (k < r["correct"]) for r in rows if r["steps"] > args.max_train_steps for k in range(r["items"])]
        mean, ci = mean_ci95(flags)
        pooled[variant] = {"accuracy": mean, "ci95": ci}
    print(f"\nbeyond training, per length: scratchpad above answer-only by more than both CIs: {verdict}")
    print("beyond training, pooled: " + ", ".join(f"{v} {p['accuracy']:.1f} ± {p['ci95']:.1f}" for v, p in pooled.items())
          + f" → scratchpad above beyond the CIs: {above_beyond_ci95(pooled['scratchpad'], pooled['answer-only'])}")
    plot = plot_accuracy_by_steps(curves, (1, args.max_train_steps), args.plot or f"{args.out}/scratchpad-seed{args.seed}.png",
                                  f"GPT from scratch, {args.steps} steps × {args.batch}, seed {args.seed}")
    print(f"plot: {plot}; bench CPU-minutes (training + scoring) {cpu_minutes:.1f}")
    print(json.dumps({"seed": args.seed, "steps": args.steps, "max_train_steps": args.max_train_steps, "curves": curves, "runs": runs,
                      "beyond_training_per_length": verdict, "beyond_training_pooled": pooled,
                      "scratchpad_wins_beyond_training": above_beyond_ci95(pooled["scratchpad"], pooled["answer-only"]),
                      "cpu_minutes": round(cpu_minutes, 2), "plot": plot}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
