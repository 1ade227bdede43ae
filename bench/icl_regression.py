"""In-context linear regression (Garg et al. 2022) at d = 5 on a CPU: a small causal transformer trained on
seeded prompts, its error curve next to the closed forms on the same evaluation prompts.

Two runs, of ``--steps`` and ``--noisy-steps`` steps (``--steps 0``: as many as ``--minutes`` of training CPU time allows, by a
timing of a few bare steps; ``--wall-minutes`` is the hard stop, since the CPU is shared): noiseless prompts and prompts with label noise σ = ``--noise``. Garg et al.'s curriculum,
scaled to d = 5: from 1 active dimension and 3 points, + 1 and + 2 every ``--curriculum-every`` steps. Then squared error ÷ d against k (mean ± 95% CI over ``--prompts`` seeded
evaluation prompts) for the model, least squares, ridge (λ = σ²), one gradient step at η*, averaging,
3-NN and zero; the Must-show targets checked with their numbers; one JSON line at the end. A run folder
that already holds a checkpoint is evaluated, not retrained; ``--runs clean`` / ``--runs noisy`` train one of the two (in parallel processes),
and a last call without it prints the table of both.

    OMP_NUM_THREADS=1 python bench/icl_regression.py     # 10,000 + 2,000 steps of 256 prompts: ≈ 18 CPU-minutes
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewshot import api
from fewshot.config import RunConfig
from fewshot.data.tasks import regression_tasks
from fewshot.evaluate.regression import curve_table, evaluate_prompt_model, plot_error_curves
from fewshot.io import atomic_write
from fewshot.methods import build_method
from fewshot.run import Run
from fewshot.train.trainer import checkpoint_path


def seconds_per_step(config: RunConfig, steps: int = 4) -> float:
    """Mean CPU time of a full-length training step (batch drawn, forward, backward, AdamW) after one warm-up step."""
    torch.manual_seed(0)
    method = build_method(config)
    data = regression_tasks(config.data)
    opt = torch.optim.AdamW(method.parameters(), lr=config.train.lr)
    for i in range(steps + 1):
        if i == 1:
            start = time.process_time()
        loss, _ = method(data.batch(torch.arange(i * config.train.batch_size, (i + 1) * config.train.batch_size)), torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.process_time() - start) / steps


def recipe(args: argparse.Namespace, name: str, noise: float, steps: int | None = None) -> RunConfig:
    overrides = [
        f"out={args.out}", f"name={name}", f"data.noise={noise}", f"data.dim={args.dim}", f"data.points={args.points}",
        f"method.width={args.width}", f"method.depth={args.depth}", f"method.heads={args.heads}", f"train.batch_size={args.batch}",
        f"method.slot_embedding={str(args.slot_embedding).lower()}", f"method.tokens={args.tokens}",
        f"train.lr={args.lr}", f"train.seed={args.seed}", f"data.curriculum_dims={args.curriculum_dims}",
        f"data.curriculum_points={args.curriculum_points}", f"data.curriculum_every={args.curriculum_every}",
    ]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.max_minutes={args.wall_minutes}", f"train.warmup_steps={min(200, steps // 10)}"]
    return api.load_config(api.find_recipe("icl-regression"), overrides)


def train_or_load(args: argparse.Namespace, name: str, noise: float) -> tuple[Run, dict]:
    config = recipe(args, name, noise)
    info: dict = {"run": name, "noise": noise}
    timing = config.run_dir / "bench_timing.json"
    if not checkpoint_path(config.run_dir).exists():
        wanted = args.noisy_steps if noise > 0 and args.noisy_steps else args.steps
        if wanted:
            steps = wanted
        else:
            step_s = seconds_per_step(config)
            steps = max(100, int(0.95 * 60 * args.minutes / step_s))
            print(f"{name}: {step_s:.3f} CPU s/step at full length → {steps} steps in {args.minutes} CPU min", flush=True)
        cpu = time.process_time()
        result = api.pretrain(recipe(args, name, noise, steps), progress=False)
        cpu = time.process_time() - cpu
        stats = {"planned_steps": steps, "train_cpu_minutes": round(cpu / 60, 2), "train_wall_minutes": round(result.train_seconds / 60, 2)}
        atomic_write(timing, lambda tmp: tmp.write_text(json.dumps(stats)))
    if timing.exists():
        info.update(json.loads(timing.read_text()))
    run = Run.open(config.run_dir)
    params = sum(p.numel() for p in run.encoder().parameters())
    info.update(step=run.step, final_loss=run.history[-1]["loss"] if run.history else None, parameters=params)
    return run, info


def at(rows: list[dict], k: int) -> float:
    return rows[k]["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.5, help="training CPU-minutes per run (two runs)")
    parser.add_argument("--wall-minutes", type=float, default=90.0, help="wall-clock stop per run (train.max_minutes)")
    parser.add_argument("--steps", type=int, default=10000,
                        help="training steps of the noiseless run, and of the noisy one without --noisy-steps (0: as many as --minutes allows by a timing of a few bare steps, which "
                             "under-counts the trainer's own cost, ~2× on a shared CPU)")
    parser.add_argument("--noisy-steps", type=int, default=2000,
                        help="training steps of the noisy run (its targets, far below least squares and nearer ridge at k = d, "
                             "are met early; the CPU budget goes to the noiseless run's k = d precision)")
    parser.add_argument("--runs", choices=["clean", "noisy", "both"], default="both", help="train only this run (evaluate both)")
    parser.add_argument("--curriculum-dims", type=int, default=1)
    parser.add_argument("--curriculum-points", type=int, default=3)
    parser.add_argument("--curriculum-every", type=int, default=200)
    parser.add_argument("--out", default="runs/bench-icl", help="folder of the two run folders")
    parser.add_argument("--noise", type=float, default=0.5, help="σ of the noisy run")
    parser.add_argument("--prompts", type=int, default=2000, help="evaluation prompts (seed 0)")
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--points", type=int, default=11, help="pairs per prompt: k = 0 … points − 1")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", choices=["paired", "interleaved"], default="paired",
                        help="paired: one token (x_i, y_{i-1}) per pair; interleaved: Garg et al.'s x, y, x, y, … tokens")
    parser.add_argument("--slot-embedding", action=argparse.BooleanOptionalAction, default=False,
                        help="x-slot / y-slot embedding for interleaved tokens (not in Garg et al.)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    d = args.dim

    report: dict = {"dim": d, "prompts": args.prompts, "runs": {}}
    for kind, name, noise in (("clean", "clean", 0.0), ("noisy", f"noise-{args.noise}", args.noise)):
        if args.runs not in ("both", kind):
            continue
        run, info = train_or_load(args, name, noise)
        curves = evaluate_prompt_model(run.encoder(), run.config.data, args.prompts, seed=0)
        err, diff = curves["error"], curves["difference"]
        plot = plot_error_curves(err, d, str(run.path / "curves.png"), f"d = {d}, σ = {noise}: {info['step']} steps")
        print(f"\n{name} ({info['step']} steps, {info['parameters']:,} parameters): squared error / d ± 95% CI, {args.prompts} prompts")
        print(curve_table(err))
        print("squared prediction difference / d to the model:\n" + curve_table(diff))
        ks = range(1, min(2 * d, len(err["model"]) - 1) + 1)
        checks: dict = {}
        if noise == 0:
            gap = {k: at(err["model"], k) - at(err["least-squares"], k) for k in ks}
            checks["max_gap_to_least_squares_k_le_2d"] = max(abs(g) for g in gap.values())
            checks["within_0.1_of_least_squares_every_k_le_2d"] = all(abs(g) <= 0.1 for g in gap.values())
            checks["gap_at_2d"] = gap[2 * d]
            checks["within_0.05_at_2d"] = abs(gap[2 * d]) <= 0.05
            checks["averaging_vs_(d+1)/k"] = {k: (round(at(err["averaging"], k), 3), round((d + 1) / k, 3)) for k in ks}
            checks["3nn_over_model_at_2d"] = at(err["3-nn"], 2 * d) / max(at(err["model"], 2 * d), 1e-9)
        else:
            checks["at_k_eq_d"] = {name: round(at(err[name], d), 3) for name in ("model", "least-squares", "ridge")}
            checks["model_far_below_least_squares_at_d"] = at(err["model"], d) < 0.5 * at(err["least-squares"], d)
            checks["difference_at_d"] = {name: round(at(diff[name], d), 4) for name in ("least-squares", "ridge")}
            checks["closer_to_ridge_than_least_squares_at_d"] = at(diff["ridge"], d) < at(diff["least-squares"], d)
        print("targets:", json.dumps(checks))
        report["runs"][name] = {**info, "plot": plot, "checks": checks, "error": err, "difference": diff}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
