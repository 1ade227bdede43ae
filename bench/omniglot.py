"""Omniglot benchmark: label-free pre-training on background-small1, then Lake et al.'s 20
within-alphabet one-shot runs and seeded 20-way 1-shot episodes on the evaluation alphabets,
next to the training-free baselines a user would try (raw pixels, normalised pixels, Lake's
modified Hausdorff distance, MHD on normalised ink) and the random encoder; test-time options
(TTA, and the transductive hub correction and one-to-one assignment) in a table of their own;
the purity of nearest neighbours and k-means clusters of the background images against their
true characters (labels measured, never trained on); training throughput.

    python bench/omniglot.py --data ../shared/data                  # the default run (the recipe's steps)
    python bench/omniglot.py --data ../shared/data train.steps=400  # a quick look

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

LAKE_ITEMS = 400


def pretrain_and_score(config):
    """Pre-train ``config`` and score its encoder on Lake's runs and the configured episodes:
    (TrainResult, EvalReport, wall seconds). Shared by the study scripts."""
    start = time.perf_counter()
    result = api.pretrain(config, progress=sys.stderr.isatty())
    _, method, _ = api.load_pretrained(result.checkpoint)
    report = evaluate(config, method.encoder, None, config.eval.lake_runs, log=lambda m: print(m, file=sys.stderr))
    return result, report, time.perf_counter() - start


def background_purity(config, checkpoint) -> dict[str, dict[str, float]]:
    """1-NN and k-means purity of the pre-training images' features against their characters:
    the normalised pixels (where pixel neighbours start) and the trained encoder's r."""
    from fewshot.data.registry import load_source
    from fewshot.data.normalize import normalize_characters
    from fewshot.evaluate.evaluator import embed_images
    from fewshot.evaluate.purity import cluster_purity, neighbour_purity
    from fewshot.objectives.neighbors import spherical_kmeans

    data = config.data
    images = load_source(data)
    if not images.labeled:
        return {}
    _, method, _ = api.load_pretrained(checkpoint)
    native = load_source(data.model_copy(update={"normalize": False, "image_size": data.normalize_from}))
    feats = {
        "normalised pixels": normalize_characters(native.images, data.image_size, data.normalize_spread, data.normalize_max_stretch, data.normalize_blur).flatten(1),
        "pretrained r": embed_images(method.encoder, images.images, config.eval.batch_size),
    }
    k = len(images.classes)
    out = {}
    for name, f in feats.items():
        _, assign = spherical_kmeans(f, k, iters=30, generator=torch.Generator().manual_seed(0))
        out[name] = {"neighbour": neighbour_purity(f, images.labels), "cluster": cluster_purity(assign, images.labels)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="data root holding omniglot/ (default: $FEWSHOT_DATA)")
    parser.add_argument("--recipe", default="nnclr-omniglot")
    parser.add_argument("--minutes", type=float, default=None, help="optional cap on training minutes (default: none; train.steps decides)")
    parser.add_argument("--name", default=None, help="run name (default: bench-omniglot-<timestamp>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args()
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        config = load_config(
            find_recipe(args.recipe),
            [f"name={args.name or 'bench-omniglot-' + stamp}", f"train.max_minutes={args.minutes or 'null'}", *args.overrides],
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
    purity = background_purity(config, result.checkpoint)
    inductive = {k: v for k, v in report.lake_runs.items() if "+" not in k}
    test_time = {k: v for k, v in report.lake_runs.items() if "+" in k}
    print(header)
    print()
    print("Inductive (each test item scored alone):")
    print(lake_table(inductive))
    main, bar = inductive.get("pretrained"), inductive.get("mhd-normalized")
    if main and bar:
        p = main["accuracy"]
        se = (p * (1 - p) / LAKE_ITEMS) ** 0.5
        print(f"pretrained vs MHD on normalised ink: {100 * (p - bar['accuracy']):+.1f} points (binomial SE of the headline {100 * se:.1f})")
    print()
    rows = [r for r in report.results if "+" not in r["encoder"] and r["classifier"] in ("proto-cosine", "nn-mhd")]
    print(results_table(rows))
    if test_time:
        print()
        print("Test-time options (apart from the headline; hub and hungarian are transductive):")
        print(lake_table(test_time))
        print(results_table([r for r in report.results if "+" in r["encoder"]]))
    print()
    print("Purity on background-small1 against the true characters (measured, never trained on):")
    print("| features | 1-NN purity | k-means purity (k = 136) |\n|---|---|---|")
    for name, row in purity.items():
        print(f"| {name} | {100 * row['neighbour']:.1f} | {100 * row['cluster']:.1f} |")
    summary = {
        "run_dir": str(config.run_dir),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "steps": result.step,
        "train_minutes": round(result.train_seconds / 60, 2),
        "wall_minutes": round(wall / 60, 2),
        "views_per_second": round(result.views_per_second, 1),
        "lake_runs": {enc: round(v["accuracy"], 4) for enc, v in report.lake_runs.items()},
        "episodes": [
            {k: r[k] for k in ("encoder", "classifier", "way", "shot", "episodes", "accuracy", "ci95")} for r in report.results
        ],
        "purity": purity,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
