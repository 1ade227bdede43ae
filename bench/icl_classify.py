"""General-purpose in-context classification (Kirsch et al. 2022, GPICL) on a CPU: the transition from
memorising a few tasks to learning-to-learn, and the state-size plot.

Runs of ``configs/icl-classify.yaml`` (8×8 digits, 5-way tasks = a random projection + a random labelling,
prompts of 26 samples), each trained for ``--steps`` steps through the one trainer:

1. the transition: ``--pools`` task-pool sizes (2^p tasks, or ``fresh``: a new task every prompt), each scored
   on its training tasks, on unseen tasks (fresh projections and labellings of the training images), on
   fresh tasks of held-out digit images (next to nearest prototype, 1-NN and logistic regression fitted on
   each prompt's samples before the query), and on Omniglot 5-way 5-shot episodes (8×8, never trained on)
   through the episode runner, next to nearest prototype, 1-NN and logistic regression on the same
   episodes and features;
2. the state size: on fresh tasks, LSTMs of hidden size ``--lstm-sizes`` and the transformer, accuracy
   against parameters.

Accuracy is the mean over a prompt's samples 20-25 (20-25 labeled samples before each; ``--from-position``)
± 95% CI over ``--prompts`` seeded evaluation prompts. Targets (issue 15): with ≤ 2^4 tasks, training tasks ≥ 80% and unseen tasks
within 10 points of chance; with fresh tasks, held-out images within 5 points of the training tasks and
Omniglot ≥ 80% of nearest prototype. Plots in ``--out``; one JSON line at the end. A run folder that
already holds a checkpoint is evaluated, not retrained.

    OMP_NUM_THREADS=1 python bench/icl_classify.py                 # the defaults
    OMP_NUM_THREADS=1 python bench/icl_classify.py --quick         # a smoke run: checks the pipeline, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fewshot import api
from fewshot.data.classification_prompts import classification_tasks, prompt_images, standardised_features
from fewshot.data.registry import OMNIGLOT_DEFAULT
from fewshot.data.sources import load_omniglot, resolve_data_path
from fewshot.evaluate.classifiers import make_classifier
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.runner import fit_predict_episodes, mean_ci95
from fewshot.evaluate.icl_classify import prompt_accuracy, support_baseline_accuracy
from fewshot.methods.icl_classify import InContextClassifier
from fewshot.report import plt, save_figure
from fewshot.run import Run


def train_run(args: argparse.Namespace, name: str, overrides: list[str]) -> tuple[Path, float]:
    """(run folder, training CPU-seconds of this call: about 0 when reused)."""
    config = api.load_config(api.find_recipe("icl-classify"), [
        f"out={args.out}", f"name={name}-{args.steps}-seed{args.seed}", f"train.steps={args.steps}", f"train.seed={args.seed}",
        f"train.warmup_steps={min(50, max(1, args.steps // 10))}", *overrides])
    start = time.process_time()
    api.pretrain_to_completion(config, progress=False)  # a finished run is reused, a stopped one resumed
    return config.run_dir, time.process_time() - start


def omniglot_features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    images = load_omniglot(resolve_data_path(None, OMNIGLOT_DEFAULT), 28)
    return standardised_features(images.images, 8), images.labels


def episode_rows(model, features: torch.Tensor, labels: torch.Tensor, episodes: int) -> dict[str, dict]:
    """5-way 5-shot episodes (15 queries per class) for the model and the simple classifiers, the same episodes."""
    sampler = EpisodeSampler(labels, way=5, shot=5, query=15, seed=0)
    drawn = [sampler.episode(i) for i in range(episodes)]
    makers = {"icl model": lambda i: InContextClassifier(model, seed=i)} if model is not None else {}
    makers.update({name: (lambda i, n=name: make_classifier(n)) for name in ("proto-euclidean", "proto-cosine", "knn", "logreg")})
    rows = {}
    for name, make in makers.items():
        accuracies, _, _ = fit_predict_episodes(make, features.numpy(), drawn)
        mean, ci = mean_ci95(accuracies)
        rows[name] = {"accuracy": mean, "ci95": ci}
    return rows


def score_run(args, run_dir: Path, split, omniglot) -> dict:
    run = Run.open(run_dir)
    model, data = run.encoder().eval(), run.config.data
    n, first = args.prompts, args.from_position
    out = {
        "training tasks": prompt_accuracy(model, classification_tasks(data, split.train, split.train_labels, eval_seed=1), n, first),
        "unseen tasks": prompt_accuracy(model, classification_tasks(data, split.train, split.train_labels, eval_seed=2, fresh_tasks=True), n, first),
        "held-out images": prompt_accuracy(model, classification_tasks(data, split.heldout, split.heldout_labels, eval_seed=3, fresh_tasks=True), n, first),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out["omniglot"] = episode_rows(model, *omniglot, args.episodes)["icl model"]
    return out


def pct(row: dict) -> str:
    return f"{100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f}"


def plot(path: Path, series: dict[str, tuple[list, list[dict]]], xlabel: str, title: str, log_x: bool = True) -> str:
    """One line per series name: (x values, result rows); a one-point series is a lone marker."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, rows) in series.items():
        mean = [100 * r["accuracy"] for r in rows]
        ci = [100 * r["ci95"] for r in rows]
        ax.errorbar(xs, mean, yerr=ci, marker="o" if "transformer" not in name else "s", capsize=3, label=name)
    ax.axhline(20, color="grey", ls=":", lw=1, label="chance (5-way)")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel="accuracy, samples 20-25 (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-icl-classify")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pools", default="16,1024,fresh", help="task-pool sizes for the transition (comma-separated; fresh = none)")
    parser.add_argument("--lstm-sizes", default="16,64,256", help="LSTM hidden sizes for the state-size plot (empty: skip)")
    parser.add_argument("--prompts", type=int, default=1000, help="evaluation prompts per row")
    parser.add_argument("--from-position", type=int, default=20, help="score the samples from this position on (that many labeled samples before)")
    parser.add_argument("--episodes", type=int, default=300, help="Omniglot 5-way 5-shot episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps, prompts and episodes): measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.prompts, args.episodes, args.pools, args.lstm_sizes, args.from_position = 5, 64, 5, "16,fresh", "16", None
        args.out = args.out + "-quick"
    os.makedirs(args.out, exist_ok=True)
    split = prompt_images(api.load_config(api.find_recipe("icl-classify")).data)
    omniglot = omniglot_features(args)
    report: dict = {"steps": args.steps, "seed": args.seed, "runs": {}, "cpu_seconds": {}}
    baselines = episode_rows(None, *omniglot, args.episodes)
    report["omniglot baselines"] = baselines
    recipe = api.load_config(api.find_recipe("icl-classify")).data
    heldout_prompts = classification_tasks(recipe, split.heldout, split.heldout_labels, eval_seed=3, fresh_tasks=True)
    first = recipe.points - 1 if args.from_position is None else args.from_position
    report["prompt baselines"] = {name: support_baseline_accuracy(lambda n=name: make_classifier(n), heldout_prompts, args.prompts, first)
                                  for name in ("proto-euclidean", "proto-cosine", "knn", "logreg")}

    pools = [None if p == "fresh" else int(p) for p in args.pools.split(",") if p]
    for pool in pools:
        name = f"pool-{pool or 'fresh'}"
        run_dir, cpu = train_run(args, name, [f"data.task_pool={'null' if pool is None else pool}"])
        report["cpu_seconds"][name] = cpu
        report["runs"][name] = score_run(args, run_dir, split, omniglot)
    for size in [int(s) for s in args.lstm_sizes.split(",") if s]:
        name = f"lstm-{size}"
        run_dir, cpu = train_run(args, name, ["method.backbone=lstm", f"method.width={size}", "method.depth=1", "data.task_pool=null"])
        report["cpu_seconds"][name] = cpu
        report["runs"][name] = score_run(args, run_dir, split, omniglot)

    proto = baselines["proto-euclidean"]["accuracy"]
    print(f"\nTransition ({args.steps} steps each): accuracy % over samples {args.from_position}-25, 5-way (chance 20)")
    print("| tasks | training tasks | unseen tasks | held-out images | Omniglot 5-way 5-shot |")
    print("|---|---|---|---|---|")
    for pool in pools:
        r = report["runs"][f"pool-{pool or 'fresh'}"]
        print(f"| {pool or 'fresh'} | {pct(r['training tasks'])} | {pct(r['unseen tasks'])} | {pct(r['held-out images'])} | {pct(r['omniglot'])} |")
    print("\nHeld-out digit images, the same prompts, each classifier fitted on the samples before the query: " +
          ", ".join(f"{k} {pct(v)}" for k, v in report["prompt baselines"].items()))
    print("\nOmniglot 5-way 5-shot, the same episodes, 8×8 standardised pixels: " +
          ", ".join(f"{k} {pct(v)}" for k, v in baselines.items()))
    state = [name for name in report["runs"] if name.startswith("lstm")] + (["pool-fresh"] if None in pools else [])
    if state:
        print("\nState size (fresh tasks): | model | parameters | training tasks | held-out images | Omniglot |")
        for name in state:
            r = report["runs"][name]
            print(f"| {name} | {r['parameters']:,} | {pct(r['training tasks'])} | {pct(r['held-out images'])} | {pct(r['omniglot'])} |")

    checks = {}
    small = [p for p in pools if p is not None and p <= 16]
    if small:
        r = report["runs"][f"pool-{small[0]}"]
        checks["memorises: training tasks ≥ 80%"] = r["training tasks"]["accuracy"] >= 0.80
        checks["memorises: unseen tasks within 10 points of chance"] = abs(r["unseen tasks"]["accuracy"] - 0.2) <= 0.10
    if None in pools:
        r = report["runs"]["pool-fresh"]
        checks["generalises: held-out images within 5 points of training tasks"] = abs(r["held-out images"]["accuracy"] - r["training tasks"]["accuracy"]) <= 0.05
        checks["generalises: Omniglot ≥ 80% of nearest prototype"] = r["omniglot"]["accuracy"] >= 0.8 * proto
    report["checks"] = checks
    for k, v in checks.items():
        print(f"{'PASS' if v else 'MISS'}: {k}")

    xs = [p or 2**22 for p in pools]
    report["plots"] = {}
    if pools:
        report["plots"]["transition"] = plot(Path(args.out) / "transition.png", {
        k: (xs, [report["runs"][f"pool-{p or 'fresh'}"][k] for p in pools]) for k in ("training tasks", "unseen tasks", "held-out images", "omniglot")},
            "tasks in training (fresh drawn as 2^22)", "GPICL: memorisation → generalisation")
    if state:
        # LSTMs as lines over their hidden sizes, the transformer as separate markers (not one line through both)
        series = {}
        for model, names in (("LSTM", [n for n in state if n.startswith("lstm")]), ("transformer", [n for n in state if not n.startswith("lstm")])):
            for k in ("training tasks", "omniglot"):
                if names:
                    series[f"{model}: {k}"] = ([report["runs"][n]["parameters"] for n in names], [report["runs"][n][k] for n in names])
        report["plots"]["state"] = plot(Path(args.out) / "state-size.png", series, "parameters", "state size: LSTM hidden 16…256 and the transformer")
    for r in report["runs"].values():
        for k in ("training tasks", "unseen tasks", "held-out images"):
            r[k] = {key: v for key, v in r[k].items() if key != "by_position"}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
