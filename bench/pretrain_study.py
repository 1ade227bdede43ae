"""Pre-training studies on Omniglot background-small1 → Lake's 20 runs and 20-way 1-shot episodes.

Every run gets the same number of *epochs* (passes over the 2,720 images), not the same minutes:
the machine is shared, so equal epochs keep the comparison free of timing noise and equal in
views seen; each row also shows its training minutes and views/s. Each run has its own full
warm-up + cosine schedule (warm-up = 5% of its steps), as in SimCLR's epoch study (Chen et al.
2020, Fig. 9).

    python bench/pretrain_study.py --study batch    # SimCLR batch 32…512 vs MoCo b64 / BYOL b64
    python bench/pretrain_study.py --study epochs   # SimCLR b256 at 5…80 epochs
    python bench/pretrain_study.py --study meta     # SimCLR vs episodic ProtoNet vs R2-D2
    python bench/pretrain_study.py --study reconstruction --epochs 20 --finetune 100
        # each autoencoder bottleneck vs MAE vs SimCLR, frozen (prototypes, logistic regression)
        # and fine-tuned (every weight, a fixed number of steps per 20-way 1-shot episode)

Results are appended to ``runs/<study>/results.jsonl`` (a rerun skips finished rows); the table
and a plot (``docs/figures/<study>.png``) are written from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omniglot import pretrain_and_score  # noqa: E402

from fewshot.config import find_recipe, load_config  # noqa: E402
from fewshot.errors import FewshotError  # noqa: E402

IMAGES = 2720  # Omniglot images_background_small1

# (label, recipe, batch, overrides) per study; the epoch budget comes from --epochs.
STUDIES: dict[str, list[tuple[str, str, int, list[str]]]] = {
    "batch": [
        *[(f"SimCLR b{b}", "simclr-omniglot", b, []) for b in (32, 64, 128, 256, 512)],
        ("MoCo v2 b64 (K=4096)", "moco-omniglot", 64, []),
        ("BYOL b64", "byol-omniglot", 64, []),
    ],
    "reconstruction": [  # MAE and SimCLR first: the rows the lecture's claim is about
        ("MAE (ViT-tiny, 75% masked)", "mae-omniglot", 0, []),
        ("SimCLR b256", "simclr-omniglot", 256, []),
        ("AE: dimension (code 64)", "ae-omniglot", 0, []),
        ("AE: information (denoising)", "ae-denoise-omniglot", 0, []),
        ("AE: sparsity (top-k)", "ae-sparse-omniglot", 0, []),
        ("AE: information (code noise)", "ae-noise-omniglot", 0, []),
        ("AE: capacity (linear decoder)", "ae-weak-omniglot", 0, []),
    ],
    "meta": [
        ("SimCLR b256", "simclr-omniglot", 256, []),
        ("ProtoNet (episodic)", "protonet-omniglot", 0, []),
        ("R2-D2 (ridge head)", "r2d2-omniglot", 0, []),
    ],
}
EPOCHS_GRID = (5, 10, 20, 40, 80)


def runs_for(study: str, epochs: int) -> list[tuple[str, str, int, list[str], int]]:
    if study == "epochs":
        return [(f"SimCLR b256, {e} epochs", "simclr-omniglot", 256, [], e) for e in EPOCHS_GRID]
    return [(*row, epochs) for row in STUDIES[study]]


def finetuned(config, encoder, episodes: int, steps: int) -> dict:
    """Full fine-tuning per 20-way 1-shot episode on Lake's evaluation pool (the frozen columns'
    episodes, same seed): a cosine head from the prototypes, then ``steps`` AdamW steps on every weight."""
    from fewshot.adapt.runner import AdaptSettings, run_adaptation
    from fewshot.data.lake import load_lake_runs
    from fewshot.data.sources import resolve_data_path
    from fewshot.evaluate.evaluator import lake_pool

    pool = lake_pool(load_lake_runs(resolve_data_path(config.eval.lake_runs, ""), config.data.image_size))
    settings = AdaptSettings(steps=steps, lr=1e-4)  # 1e-3 on every weight of a 20-image task overshoots (bench/adapt.py smoke run)
    return run_adaptation(encoder, pool.images, pool.labels, "full", {}, 20, 1, 1, episodes, settings, config.eval.seed)


def run_row(study: str, label: str, recipe: str, batch: int, overrides: list[str], epochs: int,
            finetune_episodes: int = 0, finetune_steps: int = 20) -> dict:
    base = load_config(find_recipe(recipe))
    batch = batch or base.train.batch_size  # 0 = the recipe's own batch
    steps = math.ceil(epochs * IMAGES / batch)
    slug = label.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
    config = load_config(
        find_recipe(recipe),
        [
            f"name={study}-{slug}", f"out=runs/{study}", f"train.batch_size={batch}", f"train.steps={steps}",
            f"train.warmup_steps={max(1, steps // 20)}", f"train.checkpoint_every={steps}", "eval.baselines=false",
            *overrides,
        ],
    )
    result, report, wall = pretrain_and_score(config)
    proto = {(r["way"], r["shot"]): r for r in report.results if r["classifier"] == "proto-cosine"}
    logreg = {(r["way"], r["shot"]): r for r in report.results if r["classifier"] == "logreg"}
    extra = {}
    if logreg:
        extra.update(way20_logreg=logreg[(20, 1)]["accuracy"], way20_logreg_ci=logreg[(20, 1)]["ci95"])
    if finetune_episodes:
        from fewshot import api

        _, method, _ = api.load_pretrained(result.checkpoint)
        ft = finetuned(config, method.encoder, finetune_episodes, finetune_steps)
        extra.update(way20_ft=ft["accuracy"], way20_ft_ci=ft["ci95"], ft_episodes=ft["episodes"], ft_steps=ft["steps"],
                     ft_seconds=round(ft["seconds_per_episode"], 2))
    return {
        "label": label, "recipe": recipe, "batch": batch, "epochs": epochs, "steps": result.step,
        "train_minutes": round(result.train_seconds / 60, 2), "views_per_s": round(result.views_per_second),
        "lake": report.lake_runs["pretrained"]["accuracy"],
        "way20": proto[(20, 1)]["accuracy"], "way20_ci": proto[(20, 1)]["ci95"],
        "way5": proto[(5, 1)]["accuracy"], "way5_ci": proto[(5, 1)]["ci95"], **extra,
    }


def table(rows: list[dict]) -> str:
    if any("way20_ft" in r for r in rows):
        lines = [
            "| run | epochs | steps | Lake's 20 runs | 20-way 1-shot, prototypes | 20-way 1-shot, logreg | 20-way 1-shot, fine-tuned |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ft = f"{100 * r['way20_ft']:.1f} ± {100 * r['way20_ft_ci']:.1f}" if "way20_ft" in r else "–"
            lines.append(
                f"| {r['label']} | {r['epochs']} | {r['steps']:,} | {100 * r['lake']:.1f} | {100 * r['way20']:.1f} ± {100 * r['way20_ci']:.1f} "
                f"| {100 * r['way20_logreg']:.1f} ± {100 * r['way20_logreg_ci']:.1f} | {ft} |"
            )
        return "\n".join(lines)
    lines = [
        "| run | batch | epochs | steps | train min | views/s | Lake's 20 runs | 5-way 1-shot | 20-way 1-shot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['batch']} | {r['epochs']} | {r['steps']:,} | {r['train_minutes']:.1f} | {r['views_per_s']:,} "
            f"| {100 * r['lake']:.1f} | {100 * r['way5']:.1f} ± {100 * r['way5_ci']:.1f} | {100 * r['way20']:.1f} ± {100 * r['way20_ci']:.1f} |"
        )
    return "\n".join(lines)


def plot(study: str, rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if study in ("batch", "epochs"):
        key = "batch" if study == "batch" else "epochs"
        line = [r for r in rows if r["label"].startswith("SimCLR")]
        for metric, name in (("lake", "Lake's 20 runs"), ("way20", "20-way 1-shot")):
            ax.plot([r[key] for r in line], [100 * r[metric] for r in line], marker="o", label=f"SimCLR, {name}")
        for r, colour in zip([r for r in rows if not r["label"].startswith("SimCLR")], ("C2", "C3", "C4")):
            ax.axhline(100 * r["way20"], color=colour, linestyle="--", label=f"{r['label']}, 20-way 1-shot")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (images)" if study == "batch" else "epochs (log scale)")
    else:
        names = [r["label"] for r in rows]
        columns = [("way20", "prototypes")] + ([("way20_ft", "fine-tuned")] if any("way20_ft" in r for r in rows) else [])
        width = 0.8 / len(columns)
        for j, (key, name) in enumerate(columns):
            xs = [i + j * width for i in range(len(rows))]
            ax.bar(xs, [100 * r.get(key, 0) for r in rows], width, yerr=[100 * r.get(key + "_ci", 0) for r in rows],
                   capsize=3, label=f"20-way 1-shot, {name}")
        ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(rows))], names, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=["batch", "epochs", "meta", "reconstruction"], required=True)
    parser.add_argument("--finetune", type=int, default=0, help="also fine-tune every weight on this many 20-way 1-shot episodes")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40, help="epochs per run (batch and meta studies)")
    parser.add_argument("--data", help="data root holding omniglot/ (default: $FEWSHOT_DATA)")
    parser.add_argument("--only", help="run only rows whose label contains this text")
    args = parser.parse_args()
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    out = Path("runs") / args.study / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["label"]: json.loads(line) for line in out.read_text().splitlines()} if out.exists() else {}
    rows = []
    for label, recipe, batch, overrides, epochs in runs_for(args.study, args.epochs):
        if label not in done and (args.only is None or args.only in label):
            try:
                done[label] = run_row(args.study, label, recipe, batch, overrides, epochs, args.finetune, args.finetune_steps)
            except FewshotError as exc:
                print(f"bench: error in '{label}': {exc}", file=sys.stderr)
                return 2
            with out.open("a") as f:
                f.write(json.dumps(done[label]) + "\n")
            print(json.dumps(done[label]), file=sys.stderr)
        if label in done:
            rows.append(done[label])
    print(table(rows))
    plot(args.study, rows, Path("docs/figures") / f"{args.study}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
