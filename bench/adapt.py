"""Adaptation study: every registered adaptation method on the same seeded episodes, from one
pre-trained checkpoint, with a fixed number of steps per episode (cf. Liu et al. 2022, T-Few, fig. 2:
accuracy against parameters updated).

Data sets (``--datasets``):

- ``omniglot``: 5-way 5-shot episodes on Omniglot classes. With the default file
  (background-small1) the classes are the checkpoint's held-out split (seed ``data.split_seed``);
  a run that pre-trained on all of that file (``pretrain_on_all``) saw them without labels, and the
  row says so (``seen``). Pass ``--omniglot images_evaluation.zip`` for unseen alphabets.
- ``lake``: Lake et al.'s evaluation-alphabet pool (:func:`fewshot.evaluate.evaluator.lake_pool`):
  two drawings per class, so 5-way **1**-shot with 1 query; never seen in pre-training.
- ``digits``: the five held-out digits of the quickstart split (5-way 5-shot).

Methods that do not fit the encoder (prompts and bottleneck adapters need a ViT: ``EncoderMismatch``) are
listed as n/a; any other error (a bad option, bad data) stops the script with its one-line message.

    python bench/adapt.py --checkpoint runs/simclr-omniglot --data ../shared/data
    python bench/adapt.py --checkpoint runs/q --episodes 3 --steps 2 --datasets digits   # a smoke run

Prints a markdown table (accuracy ± 95% CI, trainable parameters, bytes per task, seconds per
episode), writes the plot of accuracy against parameters a task stores (``--plot``), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fewshot import api
from fewshot.adapt import ADAPT_METHODS, AdaptSettings, run_adaptation
from fewshot.adapt.bases import method_options
from fewshot.data.registry import load_run_data
from fewshot.data.lake import load_lake_runs
from fewshot.data.sources import load_omniglot, resolve_data_path
from fewshot.errors import ConfigError, EncoderMismatch, FewshotError
from fewshot.evaluate.evaluator import LAKE_DEFAULT, lake_pool

OMNIGLOT_DEFAULT = "omniglot/images_background_small1.zip"


def datasets(config, names, omniglot_path, way, shot, query):
    """name → (images, labels, way, shot, query, note) for each requested data set."""
    out = {}
    size = config.data.image_size
    if "omniglot" in names:
        path = resolve_data_path(omniglot_path, OMNIGLOT_DEFAULT)
        run_path = resolve_data_path(config.data.path, OMNIGLOT_DEFAULT) if config.data.source == "omniglot" else None
        if run_path is not None and path.resolve() == run_path.resolve():
            data = config.data.model_copy(update={"pretrain_on_all": False})
            held = load_run_data(data).evaluation
            note = "seen unlabeled in pre-training" if config.data.pretrain_on_all else "held-out split"
        else:
            held, note = load_omniglot(path, size), f"all classes of {path.name}"
        out["omniglot"] = (held.images, held.labels, way, shot, query, note)
    if "lake" in names:
        pool = lake_pool(load_lake_runs(resolve_data_path(None, LAKE_DEFAULT), size))
        out["lake"] = (pool.images, pool.labels, way, 1, 1, "Lake's evaluation alphabets, 1-shot")
    if "digits" in names:
        digits = config.data.model_copy(update={"source": "digits", "path": None, "holdout_classes": 5, "pretrain_on_all": False})
        held = load_run_data(digits).evaluation
        note = "held-out digits" + (" (pre-trained on the other five)" if config.data.source == "digits" else "")
        out["digits"] = (held.images, held.labels, min(way, 5), shot, query, note)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        pts = [r for r in rows if r["dataset"] == dataset and "accuracy" in r]
        xs = [r["trainable_params"] + r["head_params"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        err = [100 * (r["ci95"] if r["ci95"] == r["ci95"] else 0) for r in pts]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=dataset)
        for x, y, r in zip(xs, ys, pts):
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters trained and stored per task (method + head, log scale)")
    ax.set_ylabel("accuracy (%) ± 95% CI")
    ax.set_title("Adapting a pre-trained encoder with a few labels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    parser.add_argument("--data", help="data root (sets FEWSHOT_DATA)")
    parser.add_argument("--methods", nargs="*", default=list(ADAPT_METHODS), help="registered names (default: all)")
    parser.add_argument("--method-options", default="{}", help='JSON, per method, e.g. \'{"lora": {"r": 8}}\'')
    parser.add_argument("--datasets", nargs="*", default=["omniglot", "digits"], choices=["omniglot", "lake", "digits"])
    parser.add_argument("--omniglot", help="Omniglot zip or folder (default: background-small1 under FEWSHOT_DATA)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="AdamW steps per episode")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--plot", default="adapt_accuracy_vs_params.png", help="where the plot goes")
    args = parser.parse_args()
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    try:
        per_method = json.loads(args.method_options)
        unknown = sorted(set(args.methods) - set(ADAPT_METHODS))
        if unknown:
            raise ConfigError(f"unknown adaptation method(s) {', '.join(unknown)}; known: {', '.join(ADAPT_METHODS)}")
        config, pretrained, ckpt = api.load_pretrained(args.checkpoint)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
        base = pretrained.encoder.to(device).eval()
        sha = str(ckpt.meta.get("tensors_sha256", ""))
        settings = AdaptSettings(steps=args.steps, lr=args.lr, head_lr=args.head_lr)
        sets = datasets(config, args.datasets, args.omniglot, args.way, args.shot, args.query)
    except FewshotError as exc:
        print(f"bench/adapt.py: error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for dataset, (images, labels, way, shot, query, note) in sets.items():
        for method in args.methods:
            row = {"dataset": dataset, "note": note, "method": method}
            try:
                options = method_options(method, per_method.get(method), config)
                row.update(run_adaptation(base, images, labels, method, options, way, shot, query, args.episodes, settings, args.seed, sha))
            except EncoderMismatch as exc:  # only "does not fit this encoder" is n/a; a bad option is an error
                row["skipped"] = str(exc)
            except FewshotError as exc:
                print(f"bench/adapt.py: error: {dataset} {method}: {exc}", file=sys.stderr)
                return 2
            rows.append(row)
            print(f"{dataset} {method}: " + (f"{100 * row['accuracy']:.1f}%" if "accuracy" in row else "n/a"), file=sys.stderr)
            print(json.dumps(row), file=sys.stderr)  # each row as it comes: a long study interrupted keeps what it measured
    enc = f"{config.encoder.name} ({sum(p.numel() for p in base.parameters())} parameters)"
    print(f"Checkpoint {args.checkpoint}: {config.method.name} / {enc}; {args.episodes} episodes, {args.steps} steps each, seed {args.seed}\n")
    print("| data | episodes | method | accuracy (%) | trainable params | + head | bytes / task | s / episode |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "accuracy" not in r:
            print(f"| {r['dataset']} | | {r['method']} | n/a ({r['skipped'][:60]}) | | | | |")
            continue
        print(f"| {r['dataset']} ({r['note']}) | {r['way']}-way {r['shot']}-shot | {r['method']} | {100 * r['accuracy']:.1f} ± "
              f"{100 * r['ci95']:.1f} | {r['trainable_params']:,} | {r['head_params']:,} | {r['bytes_per_task']:,} | {r['seconds_per_episode']:.2f} |")
    if any("accuracy" in r for r in rows):
        plot(rows, args.plot)
        print(f"\nplot: {Path(args.plot).resolve()}")
    print(json.dumps({"checkpoint": str(args.checkpoint), "device": str(device), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
