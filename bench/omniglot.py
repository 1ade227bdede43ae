"""Omniglot benchmark: label-free pre-training on background-small1, then Lake et al.'s 20
within-alphabet one-shot runs and seeded 5-way / 20-way 1-shot episodes on the evaluation
alphabets, next to the pixel and random-encoder baselines, plus training throughput.

    python bench/omniglot.py --data ../shared/data            # the default run (≤ 20 min of training)
    python bench/omniglot.py --data ../shared/data --minutes 2 train.steps=400   # a quick look

Prints the tables, then one JSON line with the figures and ``run_dir`` (the checkpoint is in it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from fewshot import api
from fewshot.config import find_recipe, load_config
from fewshot.evaluate.evaluator import evaluate
from fewshot.errors import FewshotError
from fewshot.report import lake_table, results_table, write_report


def pretrain_and_score(config):
    """Pre-train ``config`` and score its encoder on Lake's runs and the configured episodes:
    (TrainResult, EvalReport, wall seconds). Shared by the study scripts."""
    start = time.perf_counter()
    result = api.pretrain(config, progress=sys.stderr.isatty())
    _, method, _ = api.load_pretrained(result.checkpoint)
    report = evaluate(config, method.encoder, None, config.eval.lake_runs, log=lambda m: print(m, file=sys.stderr))
    return result, report, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="data root holding omniglot/ (default: $FEWSHOT_DATA)")
    parser.add_argument("--recipe", default="simclr-omniglot")
    parser.add_argument("--minutes", type=float, default=20.0, help="training-time budget in minutes")
    parser.add_argument("--name", default=None, help="run name (default: bench-omniglot-<timestamp>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args()
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        config = load_config(
            find_recipe(args.recipe),
            [f"name={args.name or 'bench-omniglot-' + stamp}", f"train.max_minutes={args.minutes}", *args.overrides],
        )
        result, report, wall = pretrain_and_score(config)
    except FewshotError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    header = (
        f"{config.method.name} / {config.encoder.name} / views {config.views.name}: {result.step} steps in "
        f"{result.train_seconds / 60:.1f} min of training at {result.views_per_second:.0f} views/s (median); "
        f"{wall / 60:.1f} min start to end"
    )
    write_report(config.run_dir, report, result.history, header)
    print(header)
    print()
    print(lake_table(report.lake_runs))
    print()
    print(results_table(report.results, classifier="proto-cosine"))
    summary = {
        "run_dir": str(config.run_dir),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "steps": result.step,
        "train_minutes": round(result.train_seconds / 60, 2),
        "wall_minutes": round(wall / 60, 2),
        "views_per_second": round(result.views_per_second, 1),
        "lake_runs": {enc: round(v["accuracy"], 4) for enc, v in report.lake_runs.items()},
        "episodes": [
            {k: r[k] for k in ("encoder", "classifier", "way", "shot", "accuracy", "ci95")} for r in report.results
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
