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

Results are appended to ``runs/<study>/results.jsonl``. A rerun reuses a row only if its key matches:
the SHA-256 of the row's full config (less name/out), its fine-tuning settings and the code version
(git commit, plus a hash of uncommitted changes under src/, bench/ and configs/); without git nothing
is reused. The table and a plot (``docs/figures/<study>.png``) are written from the rows of this run.

With ``--finetune N`` the fine-tuned column is scored on the first N episodes of the frozen columns'
seed, and the frozen prototypes are scored again on exactly those N episodes (column "prototypes,
same episodes"), so the two are compared on the same episodes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
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
REPO = Path(__file__).resolve().parents[1]

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


def finetuned(config, encoder, episodes: int, steps: int) -> tuple[dict, dict]:
    """Full fine-tuning per 20-way 1-shot episode on Lake's evaluation pool (the first ``episodes`` of
    the frozen columns' episodes, same seed): a cosine head from the prototypes, then ``steps`` AdamW
    steps on every weight. Returns (fine-tuned row, frozen prototypes on the same episodes)."""
    from fewshot.adapt.fitting import AdaptSettings, run_adaptation
    from fewshot.data.lake import load_lake_runs
    from fewshot.data.sources import resolve_data_path
    from fewshot.evaluate.evaluator import lake_pool

    pool = lake_pool(load_lake_runs(resolve_data_path(config.eval.lake_runs, ""), config.data.image_size))
    settings = AdaptSettings(steps=steps, lr=1e-4)  # 1e-3 on every weight of a 20-image task overshoots (bench/adapt.py smoke run)
    tuned = run_adaptation(encoder, pool.images, pool.labels, "full", {}, 20, 1, 1, episodes, settings, config.eval.seed)
    # Zero steps of the linear probe = the frozen encoder's nearest (cosine) prototype, on these episodes.
    frozen = run_adaptation(encoder, pool.images, pool.labels, "linear-probe", {}, 20, 1, 1, episodes, AdaptSettings(steps=0), config.eval.seed)
    return tuned, frozen


def code_version() -> str | None:
    """The git commit of the checkout, plus a hash of uncommitted changes under src/, bench/ and
    configs/; None without git (then no cached row is trusted)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src", "bench", "configs"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (f"+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else "")


def row_config(study: str, label: str, recipe: str, batch: int, overrides: list[str], epochs: int):
    base = load_config(find_recipe(recipe))
    batch = batch or base.train.batch_size  # 0 = the recipe's own batch
    steps = math.ceil(epochs * IMAGES / batch)
    slug = label.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
    return load_config(
        find_recipe(recipe),
        [
            f"name={study}-{slug}", f"out=runs/{study}", f"train.batch_size={batch}", f"train.steps={steps}",
            f"train.warmup_steps={max(1, steps // 20)}", f"train.checkpoint_every={steps}", "eval.baselines=false",
            *overrides,
        ],
    )


def row_key(config, finetune_episodes: int, finetune_steps: int, version: str | None) -> str | None:
    """What a cached row must match to be reused: the config (less where it is written), the
    fine-tuning settings and the code version; None (never reused) without a code version."""
    if version is None:
        return None
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in ("name", "out")}
    blob = json.dumps({"config": settings, "finetune": [finetune_episodes, finetune_steps], "code": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_row(config, label: str, recipe: str, epochs: int, finetune_episodes: int = 0, finetune_steps: int = 20) -> dict:
    result, report, wall = pretrain_and_score(config)
    batch = config.train.batch_size
    proto = {(r["way"], r["shot"]): r for r in report.results if r["classifier"] == "proto-cosine"}
    logreg = {(r["way"], r["shot"]): r for r in report.results if r["classifier"] == "logreg"}
    extra = {}
    if logreg:
        extra.update(way20_logreg=logreg[(20, 1)]["accuracy"], way20_logreg_ci=logreg[(20, 1)]["ci95"])
    if finetune_episodes:
        from fewshot import api

        _, method, _ = api.load_pretrained(result.checkpoint)
        ft, frozen = finetuned(config, method.encoder, finetune_episodes, finetune_steps)
        extra.update(way20_ft=ft["accuracy"], way20_ft_ci=ft["ci95"], ft_episodes=ft["episodes"], ft_steps=ft["steps"],
                     ft_seconds=round(ft["seconds_per_episode"], 2), way20_ft_frozen=frozen["accuracy"], way20_ft_frozen_ci=frozen["ci95"])
    return {
        "label": label, "recipe": recipe, "batch": batch, "epochs": epochs, "steps": result.step,
        "train_minutes": round(result.train_seconds / 60, 2), "views_per_s": round(result.views_per_second),
        "lake": report.lake_runs["pretrained"]["accuracy"],
        "way20": proto[(20, 1)]["accuracy"], "way20_ci": proto[(20, 1)]["ci95"],
        "way5": proto[(5, 1)]["accuracy"], "way5_ci": proto[(5, 1)]["ci95"], **extra,
    }


def table(rows: list[dict]) -> str:
    if any("way20_ft" in r for r in rows):
        n = next(r["ft_episodes"] for r in rows if "way20_ft" in r)
        lines = [
            "| run | epochs | steps | Lake's 20 runs | 20-way 1-shot, prototypes | 20-way 1-shot, logreg "
            f"| prototypes, the {n} fine-tuning episodes | fine-tuned, the same {n} episodes |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def cell(r, key):
            return f"{100 * r[key]:.1f} ± {100 * r[key + '_ci']:.1f}" if key in r else "–"

        for r in rows:
            lines.append(
                f"| {r['label']} | {r['epochs']} | {r['steps']:,} | {100 * r['lake']:.1f} | {cell(r, 'way20')} "
                f"| {cell(r, 'way20_logreg')} | {cell(r, 'way20_ft_frozen')} | {cell(r, 'way20_ft')} |"
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
    cached = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["key"]: r for r in cached if r.get("key")}  # rows of older versions (no key) are never reused
    version = code_version()
    if version is None:
        print("bench: no git checkout, so no cached row is reused", file=sys.stderr)
    rows = []
    for label, recipe, batch, overrides, epochs in runs_for(args.study, args.epochs):
        if args.only is not None and args.only not in label:
            continue
        try:
            config = row_config(args.study, label, recipe, batch, overrides, epochs)
            key = row_key(config, args.finetune, args.finetune_steps, version)
            if key is None or key not in done:
                # a new config or code version gets its own run folder: never the folder of a stale row
                config = config.model_copy(update={"name": f"{config.name}-{(key or os.urandom(8).hex())[:10]}"})
                row = run_row(config, label, recipe, epochs, args.finetune, args.finetune_steps)
                row.update(key=key, code_version=version)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr)
                if key is not None:
                    done[key] = row
            else:
                row = done[key]
        except FewshotError as exc:
            print(f"bench: error in '{label}': {exc}", file=sys.stderr)
            return 2
        rows.append(row)
    print(table(rows))
    plot(args.study, rows, Path("docs/figures") / f"{args.study}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
